"""The optimizer protocol: an ``init`` / ``update`` pair, its state types, schedules and reprs.

An optimizer is a :class:`GradientTransformation`: ``init(params)`` builds a
state, ``update(grads, state, params)`` turns gradients into additive updates
and a new state. Nothing is changed in place, so a step is a pure function that
``torch.func.grad``, ``torch.func.vmap`` and ``torch.compile`` can see through.

Every transform built here is an instance of a module-level :class:`Transform`
class whose bound ``init`` / ``update`` the :class:`GradientTransformation`
holds: it prints as the call that built it, pickles and ``torch.save``\\ s, and
checks its hyperparameters once, when it is built; ``update`` does no checking.

``grads`` may lack names that ``init`` saw (a parameter that got no gradient,
``p.grad is None`` in torch): such a parameter gets no update and its state,
step count included, is left as it was (torch.optim's rule).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import Hyper as Hyper, check_hyper
from .._errors import FparamsError, FparamsTypeError, FparamsValueError
from .._types import TensorDict, Updates

#: The state of an optimizer: a NamedTuple of dicts of tensors, or a tuple of such states.
OptState = Any

#: A hyperparameter that may change per step: a number, a tensor, a list of per-step values
#: (numbers or tensors) or a callable of the step (see :class:`Schedule`).
Scheduled = Union[float, Tensor, Sequence[Union[float, Tensor]], Callable[[Tensor], Any], "Schedule"]

#: A learning rate: a :data:`Scheduled` hyperparameter or a dict of per-parameter rates.
Rate = Union[Scheduled, Mapping[str, Tensor]]


class InitFn(Protocol):
    """``init(params) -> state``."""

    def __call__(self, params: TensorDict) -> OptState: ...


class UpdateFn(Protocol):
    """``update(grads, state, params=None) -> (updates, new_state)``."""

    def __call__(
        self, grads: TensorDict, state: OptState, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure optimizer: ``init(params) -> state`` and ``update(grads, state, params=None)``.

    ``update`` returns ``(updates, new_state)``; the updates are *added* to the
    params with ``fparams.apply_updates(params, updates)``. ``grads`` may lack
    names: those params get no update and keep their state.

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.sgd(lr=0.1)
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = opt.update({"w": torch.ones(2)}, opt.init(params))
        >>> fparams.apply_updates(params, updates)
        {'w': tensor([0.9000, 0.9000])}
    """

    init: InitFn
    update: UpdateFn

    def __repr__(self) -> str:
        owner = getattr(self.init, "__self__", None)
        if isinstance(owner, Transform) and getattr(self.update, "__self__", None) is owner:
            return repr(owner)
        return f"GradientTransformation(init={self.init!r}, update={self.update!r})"


class Transform:
    """Base of every transform here: hyperparameters checked once, ``init``/``update`` methods.

    Subclasses set ``name`` and implement ``init`` and ``update``; ``shown``
    is what the repr lists (the call that built it).
    """

    name = "transform"

    def __init__(self, **shown: object) -> None:
        self.shown = shown

    def init(self, params: TensorDict) -> OptState:
        """The starting state for ``params`` (errors name this transform)."""
        try:
            return self._init(params)
        except FparamsError as err:
            raise self._named(err) from None

    def update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, OptState]:
        """``(updates, new_state)`` for ``grads``; names absent from ``grads`` keep their state."""
        try:
            return self._update(grads, state, params)
        except FparamsError as err:
            raise self._named(err) from None

    def _named(self, err: FparamsError) -> FparamsError:
        if err.function is None:
            err.function = f"optim.{self.name}"
        return err

    def _init(self, params: TensorDict) -> OptState:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def check_state(self, state: object, *kinds: type) -> None:
        """``state`` is the NamedTuple this transform's ``init`` returns (one ``type`` test)."""
        if type(state) not in kinds:
            raise FparamsTypeError(
                f"`state` must be the {kinds[0].__name__} that this transform's init() returned; "
                f"got {type(state).__name__}."
            )

    def as_transformation(self) -> GradientTransformation:
        """The :class:`GradientTransformation` of this transform's bound methods."""
        return GradientTransformation(self.init, self.update)

    def __repr__(self) -> str:
        return format_call(self.name, **self.shown)


class EmptyState(NamedTuple):
    """The state of a transform that keeps none (``add_decayed_weights`` ...)."""


class CountState(NamedTuple):
    """The state of a stateless transform whose hyperparameter is a schedule: steps per name."""

    step: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


# -- schedules: per-step hyperparameters ------------------------------------------------


class Schedule:
    """A hyperparameter that changes with the step (higher's ``override``).

    Built from a sequence (one value per step; steps past its end use the last
    value) or a callable of the step (a 0-dim int64 tensor, 0 on the first
    update). Tensor values keep their graph, so a learned schedule gets
    meta-gradients. The step is the parameter's own count of updates (torch's
    per-parameter ``state["step"]``).

    Examples:
        >>> import torch
        >>> from fparams.optim import Schedule
        >>> s = Schedule([0.1, 0.01])
        >>> float(s(torch.tensor(0))), float(s(torch.tensor(5)))
        (0.1, 0.01)
    """

    def __init__(self, values: Union[Sequence[Hyper], Callable[[Tensor], Any]], name: str = "value") -> None:
        self.fn: Optional[Callable[[Tensor], Any]] = None
        self.values: Optional[Tensor] = None
        self.given = values
        if callable(values):
            self.fn = values
            return
        if not isinstance(values, (list, tuple)) or not values:
            raise FparamsTypeError(
                f"`{name}` as a schedule must be a non-empty list of per-step values or a callable "
                f"of the step; got {type(values).__name__}."
            )
        for i, v in enumerate(values):
            check_hyper(f"{name}[{i}]", v)
        dtype = next((v.dtype for v in values if isinstance(v, Tensor)), torch.float64)
        self.values = torch.stack(
            [v if isinstance(v, Tensor) else torch.tensor(v, dtype=dtype) for v in values]
        )

    def __call__(self, step: Tensor) -> Any:
        if self.fn is not None:
            return self.fn(step)
        assert self.values is not None
        index = step.clamp(max=self.values.shape[0] - 1).to(self.values.device)
        return self.values[index]

    def __repr__(self) -> str:
        if self.fn is not None:
            return f"Schedule({getattr(self.fn, '__name__', type(self.fn).__name__)})"
        return f"Schedule({len(self.given)} steps)"  # type: ignore[arg-type]


def hyper(name: str, value: object, high: float = float("inf"), high_closed: bool = False) -> Any:
    """Check a hyperparameter once: a number, a tensor, or a schedule (list or callable) of them."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (list, tuple)) or (callable(value) and not isinstance(value, Tensor)):
        return Schedule(value, name)
    check_hyper(name, value, high, high_closed)
    return value


def at(value: Any, step: Tensor) -> Any:
    """A hyperparameter's value at ``step`` (0-based): schedules are evaluated, the rest returned."""
    return value(step) if isinstance(value, Schedule) else value


def is_nonzero(value: object) -> bool:
    """Whether a hyperparameter needs its transform: a tensor or schedule always does."""
    return not isinstance(value, numbers.Real) or value != 0


# -- how optimizers and their states print ------------------------------------------


def format_hyper(value: object) -> str:
    """A hyperparameter as a repr shows it: numbers as Python writes them, tensors briefly."""
    if isinstance(value, Tensor):
        grad = ", requires_grad=True" if value.requires_grad else ""
        if value.dim() == 0:
            try:
                return f"tensor({value.item():.4g}{grad})"
            except RuntimeError:  # under a transform: no value to read
                pass
        return f"tensor(shape={tuple(value.shape)}{grad})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {format_hyper(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(format_hyper(v) for v in value) + ")"
    return repr(value)


def format_call(name: str, **hyper: object) -> str:
    """``"adam(lr=0.01, betas=(0.9, 0.999))"``."""
    return f"{name}(" + ", ".join(f"{k}={format_hyper(v)}" for k, v in hyper.items()) + ")"


def _summary(value: object) -> str:
    # A state field: a tensor as dtype[shape] (a step count as its value), a dict of
    # tensors by name (the first few), other states recursively.
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.is_floating_point() and not value.requires_grad:
            try:
                return str(int(value))
            except RuntimeError:  # under a transform: no value to read
                pass
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"
    if isinstance(value, Mapping):
        items = [f"{k!r}: {_summary(v)}" for k, v in list(value.items())[:3]]
        if len(value) > 3:
            items.append(f"... {len(value)} tensors")
        return "{" + ", ".join(items) + "}"
    return repr(value)


def state_repr(state: Tuple[Any, ...]) -> str:
    """A NamedTuple state as its field names with shapes, not tensor values."""
    fields = getattr(state, "_fields", ())
    return f"{type(state).__name__}(" + ", ".join(f"{f}={_summary(v)}" for f, v in zip(fields, state)) + ")"


# -- numerics shared by the rules -----------------------------------------------------


def init_steps(params: TensorDict) -> Dict[str, Tensor]:
    """A step count of zero per name: int64 scalars, one tensor shared per device (see ``PerParam``)."""
    zeros: Dict[torch.device, Tensor] = {}
    for p in params.values():
        if p.device not in zeros:
            zeros[p.device] = torch.zeros((), dtype=torch.int64, device=p.device)
    return {k: zeros[p.device] for k, p in params.items()}


def scalar_dtype(device: torch.device) -> torch.dtype:
    """float64 for step-derived scalars (torch.optim uses Python floats); float32 on mps."""
    return torch.float32 if device.type == "mps" else torch.float64


def bias_correction(decay: Any, step: Tensor) -> Tensor:
    """``1 - decay ** step`` as a scalar tensor in float64 (float32 where the device has no float64).

    Like torch.optim, which computes it in Python floats: in float32,
    ``1 - 0.999`` is already off by 1e-5, which would show in every update.
    A 0-dim float64 tensor does not promote the float32 tensors it meets.
    """
    out: Tensor = 1 - decay ** step.to(scalar_dtype(step.device))
    return out


def ema(average: Tensor, value: Tensor, decay: Any) -> Tensor:
    """``decay * average + (1 - decay) * value``, one fused ``lerp`` when ``decay`` is a number."""
    if isinstance(decay, Tensor):
        return average + (1 - decay) * (value - average)
    return torch.lerp(average, value, 1 - decay)


def ema_square(average: Tensor, value: Tensor, decay: Any) -> Tensor:
    """``decay * average + (1 - decay) * value * value``, in torch.optim's order of operations."""
    if isinstance(decay, Tensor):
        return average * decay + (1 - decay) * (value * value)
    return torch.addcmul(average * decay, value, value, value=1 - decay)


def safe_sqrt(t: Tensor) -> Tensor:
    """``t.sqrt()`` whose gradient is 0 (not NaN) where ``t`` is 0 or negative.

    A parameter whose gradient has always been exactly zero (a dead ReLU unit)
    has a zero second moment, and ``sqrt``'s derivative there is infinite:
    times the zero upstream gradient it gives NaN, which would spread through
    every meta-gradient. Clamping at the smallest normal number changes the
    value only where it is below ``sqrt(tiny)`` (1e-19 in float32), far under
    any ``eps`` it is added to.
    """
    return t.clamp_min(torch.finfo(t.dtype).tiny).sqrt()


def need_params(params: Optional[TensorDict]) -> TensorDict:
    """``params``, which an update that reads the parameters requires."""
    if params is None:
        raise FparamsTypeError(
            "`params` is required because the update reads the parameters; call update(grads, state, params)."
        )
    return params


def check_grads(grads: object, state_names: Optional[Mapping[str, Tensor]]) -> None:
    """``grads`` is a dict of tensors named as the params, shapes and dtypes equal (with params given)."""
    if not isinstance(grads, Mapping):
        raise FparamsTypeError(
            f"`grads` must be a dict of tensors keyed by name; got {type(grads).__name__}."
        )
    if state_names is None:
        return
    for k, g in grads.items():
        ref = state_names.get(k)
        if ref is None:
            unknown = sorted(set(grads) - set(state_names))
            raise FparamsValueError(
                "`grads` has names that `params` lacks. Unexpected key(s): "
                + ", ".join(repr(u) for u in unknown)
                + ". Pass the params the gradients belong to."
            )
        if not isinstance(g, Tensor):
            raise FparamsTypeError(f"`grads[{k!r}]` must be a tensor; got {type(g).__name__}.")
        if g.shape != ref.shape or g.dtype != ref.dtype:
            raise FparamsValueError(
                f"`grads[{k!r}]` is {str(g.dtype).replace('torch.', '')}{list(g.shape)} but its parameter "
                f"is {str(ref.dtype).replace('torch.', '')}{list(ref.shape)}; give each gradient its "
                f"parameter's shape and dtype."
            )


def unknown_name(name: object) -> FparamsValueError:
    """The error for a gradient whose name the state was not initialised with."""
    return FparamsValueError(
        f"`grads` has a name the state was not initialised with. Unexpected key(s): {name!r}. "
        "Call init() with every param that may get a gradient (fparams.partition(params, filter) "
        "splits off the others)."
    )
