"""The optimizer protocol: an ``init`` / ``update`` pair, its state types and reprs.

An optimizer is a :class:`GradientTransformation`: ``init(params)`` builds a
state, ``update(grads, state, params)`` turns gradients into additive updates
and a new state. Nothing is changed in place, so a step is a pure function that
``torch.func.grad``, ``torch.func.vmap`` and ``torch.compile`` can see through.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .._checks import Hyper, check_dict, check_keys
from .._types import TensorDict, Updates

#: The state of an optimizer: a NamedTuple of a step count and dicts of tensors,
#: or a tuple of such states (one per transform of a :func:`chain`).
OptState = Any


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
    params with ``fparams.apply_updates(params, updates)``.

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
        text = _description(self)
        if text is None:
            return f"GradientTransformation(init={self.init!r}, update={self.update!r})"
        return text


#: What each optimizer built here prints as: ``init -> (weakref to update, text)``. Kept
#: outside the NamedTuple, which stays a plain one (torch.compile traces plain NamedTuples).
_DESCRIPTIONS: weakref.WeakKeyDictionary[Any, Tuple[Any, str]] = weakref.WeakKeyDictionary()


def described(init: InitFn, update: UpdateFn, text: str) -> GradientTransformation:
    """``GradientTransformation(init, update)`` that prints as ``text`` (the call that built it)."""
    _DESCRIPTIONS[init] = (weakref.ref(update), text)
    return GradientTransformation(init, update)


def _description(opt: GradientTransformation) -> Optional[str]:
    try:
        entry = _DESCRIPTIONS.get(opt.init)
    except TypeError:  # an init that cannot be weakly referenced: not one of ours
        return None
    return entry[1] if entry is not None and entry[0]() is opt.update else None


class EmptyState(NamedTuple):
    """The state of a transform that keeps none (``add_decayed_weights`` ...)."""


def check_grads(where: str, grads: object, expected: Mapping[str, object]) -> None:
    """``grads`` is a dict with exactly the names the state was initialised with."""
    check_dict(where, "grads", grads)
    assert isinstance(grads, Mapping)
    if grads.keys() != expected.keys():
        check_keys(
            where,
            "grads",
            grads,
            expected,
            fix="The state was initialised with other names: call init() with the params that get "
            "gradients (fparams.partition(params, filter) splits them off).",
        )


def check_params(where: str, params: Optional[TensorDict], grads: Mapping[str, object]) -> TensorDict:
    """``params`` is given and has every name in ``grads``."""
    if params is None:
        raise TypeError(
            f"{where}: `params` is required because the update reads the parameters; "
            f"call update(grads, state, params)."
        )
    check_dict(where, "params", params)
    check_keys(
        where, "params", params, grads, unexpected_ok=True, fix="Pass the params the gradients belong to."
    )
    return params


def is_nonzero(value: Hyper) -> bool:
    """Whether a hyperparameter needs its transform: a tensor always does (no reading its value)."""
    return isinstance(value, Tensor) or value != 0


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


def init_step(params: TensorDict) -> Tensor:
    """A step count of zero, an int64 scalar on the params' device."""
    device = next(iter(params.values())).device if params else None
    return torch.zeros((), dtype=torch.int64, device=device)


def bias_correction(decay: Hyper, step: Tensor) -> Tensor:
    """``1 - decay ** step`` as a scalar tensor in float64 (float32 where the device has no float64).

    Like torch.optim, which computes it in Python floats: in float32,
    ``1 - 0.999`` is already off by 1e-5, which would show in every update.
    A 0-dim float64 tensor does not promote the float32 tensors it meets.
    """
    dtype = torch.float32 if step.device.type == "mps" else torch.float64
    return 1 - decay ** step.to(dtype)


def ema(average: Tensor, value: Tensor, decay: Hyper) -> Tensor:
    """``decay * average + (1 - decay) * value``, one fused ``lerp`` when ``decay`` is a number."""
    if isinstance(decay, Tensor):
        return average + (1 - decay) * (value - average)
    return torch.lerp(average, value, 1 - decay)


def ema_square(average: Tensor, value: Tensor, decay: Hyper) -> Tensor:
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
