"""Small gradient transformations that the named optimizers are chains of.

Each factory returns a :class:`GradientTransformation` over the bound methods
of a module-level class (so it pickles). Their formulas are ``torch.optim``'s,
written without in-place operations, with step counts kept per parameter as
tensors (torch's ``state["step"]``) so that no Python control flow depends on
data and a parameter that gets its first gradient late is bias-corrected as
torch does it. ``grads`` may lack names: those params get no update and keep
their state.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Type

import torch
from torch import Tensor

from .._checks import check_lr
from .._errors import FparamsTypeError, FparamsValueError, public
from .._types import TensorDict, Updates
from ._base import (
    CountState,
    EmptyState,
    GradientTransformation,
    OptState,
    Rate,
    Schedule,
    Scheduled,
    Transform,
    at,
    check_grads,
    hyper,
    init_steps,
    is_nonzero,
    need_params,
    unknown_name,
)

# -- the two kinds of transform: per-parameter rules with state, and stateless maps ----------


class PerParam(Transform):
    """A rule applied to each parameter on its own, with per-name state slots and a step count.

    Subclasses set ``state_type`` (a NamedTuple whose first field is ``step``,
    then one dict per slot), ``init_slots(p)``, ``scalars(step)`` (what depends
    only on the step, which counts this update from 1: bias corrections,
    scheduled hyperparameters) and ``rule(g, p, scalars, slots)``. A slot value
    of None is not stored. Parameters that have taken the same steps share one
    step tensor, so ``scalars`` runs once per update, not once per parameter.
    """

    state_type: Type[Any] = NamedTuple
    reads_params = False

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:  # pragma: no cover
        raise NotImplementedError

    def scalars(self, step: Tensor) -> Any:
        """What the rule needs that depends only on the step (the step itself by default)."""
        return step

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        raise NotImplementedError  # pragma: no cover

    def _init(self, params: TensorDict) -> OptState:
        n = len(self.state_type._fields) - 1
        slots: List[Dict[str, Tensor]] = [{} for _ in range(n)]
        for k, p in params.items():
            for i, v in enumerate(self.init_slots(p)):
                if v is not None:
                    slots[i][k] = v
        return self.state_type(init_steps(params), *slots)

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:
        self.check_state(state, self.state_type)
        ps = need_params(params) if self.reads_params else None
        steps = dict(state.step)
        slots = [dict(s) for s in state[1:]]
        updates = {}
        # (old step, new step, its scalars); by identity (`is`, not id(): torch.compile guards on id)
        shared: List[Tuple[Tensor, Tensor, Any]] = []
        for k, g in grads.items():
            old_step = steps.get(k)
            if old_step is None:
                raise unknown_name(k)
            hit = next((h for h in shared if h[0] is old_step), None)
            if hit is None:
                new_step = old_step + 1
                hit = (old_step, new_step, self.scalars(new_step))
                shared.append(hit)
            old = tuple(s.get(k) for s in slots)
            updates[k], new = self.rule(g, None if ps is None else ps[k], hit[2], old)
            steps[k] = hit[1]
            for s, v in zip(slots, new):
                if v is not None:
                    s[k] = v
        return updates, self.state_type(steps, *slots)


class Stateless(Transform):
    """A map ``(g, p, step) -> u`` per name; it counts steps only where a hyperparameter is a schedule."""

    reads_params = False

    def __init__(self, **shown: object) -> None:
        super().__init__(**shown)
        self.scheduled = any(isinstance(v, Schedule) for v in shown.values())

    def map(self, g: Tensor, p: Any, step: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _init(self, params: TensorDict) -> OptState:
        return CountState(init_steps(params)) if self.scheduled else EmptyState()

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:
        self.check_state(state, CountState if self.scheduled else EmptyState)
        ps = need_params(params) if self.reads_params else None
        if not self.scheduled:
            zero = _ZERO
            return {k: self.map(g, None if ps is None else ps[k], zero) for k, g in grads.items()}, state
        steps = dict(state.step)
        updates = {}
        for k, g in grads.items():
            updates[k] = self.map(g, None if ps is None else ps[k], steps[k])
            steps[k] = steps[k] + 1
        return updates, CountState(steps)


_ZERO = torch.zeros((), dtype=torch.int64)


class _Identity(Stateless):
    name = "identity"

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:
        self.check_state(state, EmptyState)
        return dict(grads), state


class _AddDecayedWeights(Stateless):
    name = "add_decayed_weights"
    reads_params = True

    def __init__(self, weight_decay: Any) -> None:
        super().__init__(weight_decay=weight_decay)
        self.weight_decay = weight_decay

    def map(self, g: Tensor, p: Any, step: Tensor) -> Tensor:
        out: Tensor = g + at(self.weight_decay, step) * p
        return out


class _ScaleByLearningRate(Stateless):
    name = "scale_by_learning_rate"

    def __init__(self, lr: Any, per_name: Optional[Dict[str, Any]]) -> None:
        super().__init__(lr=lr)
        self.lr, self.per_name = lr, per_name

    def _init(self, params: TensorDict) -> OptState:
        if self.per_name is not None:
            missing = sorted(k for k in params if k not in self.per_name)
            if missing:
                raise FparamsValueError(
                    "`lr` is a dict of per-parameter rates but has no rate for: "
                    + ", ".join(repr(k) for k in missing)
                    + ". Give one rate per parameter that gets a gradient."
                )
        return super()._init(params)

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:
        self.check_state(state, CountState if self.scheduled else EmptyState)
        if self.per_name is not None:
            return {k: -self.per_name[k] * g for k, g in grads.items()}, state
        if not self.scheduled:
            lr = self.lr
            return {k: -lr * g for k, g in grads.items()}, state
        return super()._update(grads, state, params)

    def map(self, g: Tensor, p: Any, step: Tensor) -> Tensor:
        out: Tensor = -at(self.lr, step) * g
        return out


@public("optim.identity")
def identity() -> GradientTransformation:
    """Pass the updates through unchanged: the placeholder of a switched-off transform.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.identity()
        >>> opt.update({"w": torch.ones(1)}, opt.init({"w": torch.ones(1)}))
        ({'w': tensor([1.])}, EmptyState())
    """
    return _Identity().as_transformation()


@public("optim.add_decayed_weights")
def add_decayed_weights(weight_decay: Scheduled) -> GradientTransformation:
    """``g + weight_decay * p``: L2 weight decay (or, after a rescaling, decoupled decay).

    ``update`` needs ``params``. ``weight_decay`` may be a schedule.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.add_decayed_weights(0.1)
        >>> params = {"w": torch.full((2,), 2.0)}
        >>> opt.update({"w": torch.ones(2)}, opt.init(params), params)[0]
        {'w': tensor([1.2000, 1.2000])}
    """
    return _AddDecayedWeights(hyper("weight_decay", weight_decay)).as_transformation()


@public("optim.scale_by_learning_rate")
def scale_by_learning_rate(lr: Rate) -> GradientTransformation:
    """``-lr * u``: turn a descent direction into an update.

    ``lr`` is a number, a tensor (a learned rate), a dict with one rate per
    parameter name (Meta-SGD style), or a schedule (a list of per-step rates
    or a callable of the step).

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.scale_by_learning_rate(torch.tensor(0.5, requires_grad=True))
        >>> updates, _ = opt.update({"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}))
        >>> updates["w"].sum().backward()  # the rate gets a meta-gradient
    """
    return _scale_by_lr(lr).as_transformation()


def _scale_by_lr(lr: Any) -> _ScaleByLearningRate:
    if isinstance(lr, (list, tuple, Schedule)) or (callable(lr) and not isinstance(lr, Tensor)):
        return _ScaleByLearningRate(hyper("lr", lr), None)
    per_name = check_lr(lr)
    return _ScaleByLearningRate(lr, None if per_name is None else dict(per_name))


# -- chains -------------------------------------------------------------------------


class _Chain(Transform):
    """Transforms one after the other; ``maximize`` negates the gradients first (torch's flag)."""

    name = "chain"

    def __init__(
        self,
        parts: Tuple[GradientTransformation, ...],
        state_type: Optional[Type[Any]],
        text: str,
        maximize: bool = False,
    ) -> None:
        super().__init__()
        self.parts, self.state_type, self.text, self.maximize = parts, state_type, text, maximize
        self.name = text[: text.index("(")]

    def _init(self, params: TensorDict) -> OptState:
        from .._checks import check_dict

        check_dict("params", params)
        states = [t.init(params) for t in self.parts]
        return self.state_type(*states) if self.state_type is not None else tuple(states)

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:
        check_grads(grads, params)
        kind = self.state_type or tuple
        if type(state) is not kind or len(state) != len(self.parts):
            raise FparamsTypeError(
                f"`state` must be the {kind.__name__} of {len(self.parts)} states that this "
                f"chain's init() returned; got {type(state).__name__}."
            )
        updates: TensorDict = {k: -g for k, g in grads.items()} if self.maximize else grads
        new_state = []
        for t, s in zip(self.parts, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        packed = self.state_type(*new_state) if self.state_type is not None else tuple(new_state)
        return dict(updates), packed

    def __repr__(self) -> str:
        return self.text


def _check_parts(transforms: Tuple[Any, ...]) -> None:
    for i, t in enumerate(transforms):
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise FparamsTypeError(
                f"transform {i} must have `init` and `update` methods (a GradientTransformation such "
                f"as fparams.optim.trace(0.9)); got {type(t).__name__}."
            )


@public("optim.chain")
def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other; the state is a tuple of theirs.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.chain(optim.add_decayed_weights(0.5), optim.scale_by_learning_rate(0.1))
        >>> opt
        chain(add_decayed_weights(weight_decay=0.5), scale_by_learning_rate(lr=0.1))
        >>> params = {"w": torch.ones(2)}
        >>> opt.update({"w": torch.ones(2)}, opt.init(params), params)[0]
        {'w': tensor([-0.1500, -0.1500])}
    """
    _check_parts(transforms)
    text = "chain(" + ", ".join(repr(t) for t in transforms) + ")"
    return _Chain(tuple(transforms), None, text).as_transformation()


@public("optim.named_chain")
def named_chain(state_type: Type[Any], **transforms: GradientTransformation) -> GradientTransformation:
    """:func:`chain` whose state is a ``state_type``, a NamedTuple with one field per transform.

    Its state has the same fields whatever the hyperparameters, so
    ``state.adam.mu`` replaces positional access, and a saved state fits an
    optimizer built with other hyperparameter values. A transform that a
    hyperparameter switches off is kept in its place as :func:`identity`.
    The named optimizers (:func:`fparams.optim.adam` ...) are named chains.

    Examples:
        >>> import typing, torch, fparams.optim as optim
        >>> class DecayThenScale(typing.NamedTuple):
        ...     decay: optim.EmptyState
        ...     lr: optim.EmptyState
        >>> opt = optim.named_chain(
        ...     DecayThenScale, decay=optim.add_decayed_weights(0.5), lr=optim.scale_by_learning_rate(0.1)
        ... )
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
        >>> state.lr
        EmptyState()
    """
    return build_named(state_type, transforms)


def build_named(
    state_type: Type[Any],
    transforms: Dict[str, GradientTransformation],
    text: Optional[str] = None,
    maximize: bool = False,
) -> GradientTransformation:
    """:func:`named_chain`; ``text`` (the named optimizer's call) replaces its repr."""
    fields = getattr(state_type, "_fields", None)
    if not isinstance(state_type, type) or not isinstance(fields, tuple):
        raise FparamsTypeError(f"`state_type` must be a NamedTuple class; got {state_type!r}.")
    if list(transforms) != list(fields):
        raise FparamsValueError(
            f"the transforms must be given by the fields of {state_type.__name__}, in "
            f"order: {', '.join(fields)}; got {', '.join(transforms) or 'none'}."
        )
    _check_parts(tuple(transforms.values()))
    if text is None:
        text = (
            f"named_chain({state_type.__name__}, "
            + ", ".join(f"{k}={t!r}" for k, t in transforms.items())
            + ")"
        )
    return _Chain(tuple(transforms.values()), state_type, text, maximize).as_transformation()


def make_decay(weight_decay: Any) -> GradientTransformation:
    """``add_decayed_weights`` where the decay is nonzero, else ``identity()`` (checked)."""
    wd = hyper("weight_decay", weight_decay)
    return _AddDecayedWeights(wd).as_transformation() if is_nonzero(wd) else _Identity().as_transformation()


def make_lr(lr: Any) -> GradientTransformation:
    """The checked ``scale_by_learning_rate(lr)``."""
    return _scale_by_lr(lr).as_transformation()
