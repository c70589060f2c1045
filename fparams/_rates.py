"""Every form of ``adapt``'s ``lr``, turned into one ``GradientTransformation`` up front.

``adapt`` runs one loop over one optimizer. What a user may give as ``lr``
becomes that optimizer here, checked once before the loop:

* an ``fparams.optim`` optimizer (a :class:`~fparams.optim.GradientTransformation`,
  or any object with ``init`` and ``update`` that is not a list or a tuple): as it is;
* a number, a tensor (a learned rate) or a dict of per-parameter rates
  (Meta-SGD): :func:`scaled`, the update ``-lr * g`` of
  ``fparams.optim.sgd(lr)`` (bit for bit, without sgd's momentum buffer,
  which plain steps do not need);
* a list or tuple of such rates, one per step (MAML++): :func:`per_step`,
  whose state counts the steps taken, so a loop split over several calls
  (``adapt(..., state=s)``) goes on with the next rate.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import check_hyper, check_lr, check_rate_keys, check_rate_shapes, describe, keys_text
from ._errors import FparamsTypeError, FparamsValueError
from .optim import EmptyState, GradientTransformation

__all__ = ["PerStepState", "as_transformation", "is_optimizer", "per_step", "scaled"]


def is_optimizer(obj: object) -> bool:
    """Is ``obj`` an optimizer (``init`` + ``update``) rather than a rate or a list of rates?"""
    if isinstance(obj, GradientTransformation):
        return True
    if isinstance(obj, (list, tuple, Mapping, Tensor, numbers.Number)):
        return False
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))


class PerStepState(NamedTuple):
    """The state of :func:`per_step`: how many steps were taken (the index of the next rate).

    Examples:
        >>> import torch
        >>> from fparams._rates import per_step
        >>> opt = per_step([0.1, 0.01])
        >>> opt.init({"w": torch.zeros(1)})
        PerStepState(step=0)
    """

    step: int


def per_step(rates: Sequence[Any]) -> GradientTransformation:
    """Step ``i`` takes ``-rates[i] * g``; each entry a number, a tensor or a dict per name.

    Examples:
        >>> import torch
        >>> from fparams._rates import per_step
        >>> opt = per_step([0.5, 0.25])
        >>> params, g = {"w": torch.ones(1)}, {"w": torch.ones(1)}
        >>> u0, state = opt.update(g, opt.init(params), params)
        >>> u1, state = opt.update(g, state, params)
        >>> u0["w"], u1["w"], state.step
        (tensor([-0.5000]), tensor([-0.2500]), 2)
    """
    parts = [scaled(r) for r in rates]
    empty = EmptyState()

    def init(params: Mapping[str, Tensor]) -> PerStepState:
        return PerStepState(0)

    def update(
        grads: Mapping[str, Tensor], state: PerStepState, params: Optional[Mapping[str, Tensor]] = None
    ) -> Tuple[Dict[str, Tensor], PerStepState]:
        if not isinstance(state, PerStepState) or state.step >= len(parts):
            raise FparamsValueError(
                f"`lr` has {len(parts)} per-step rates, but this is step "
                f"{getattr(state, 'step', '?')}: give one rate per inner step."
            )
        updates, _ = parts[state.step].update(grads, empty, params)
        return updates, PerStepState(state.step + 1)

    return GradientTransformation(init, update)


def scaled(lr: Any) -> GradientTransformation:
    """``-lr * g`` per name (``lr`` a checked number, tensor, or dict by name): sgd's update.

    The arithmetic of ``fparams.optim.scale_by_learning_rate`` (so the same
    numbers as ``fparams.optim.sgd(lr)``), without its per-step checks and
    without registering a description: ``adapt`` builds it on every call,
    also inside ``torch.compile``, which must not trace a weak-reference table.

    Examples:
        >>> import torch
        >>> from fparams._rates import scaled
        >>> opt = scaled(0.5)
        >>> opt.update({"w": torch.ones(1)}, opt.init({"w": torch.ones(1)}))[0]
        {'w': tensor([-0.5000])}
    """
    empty = EmptyState()

    def init(params: Mapping[str, Tensor]) -> EmptyState:
        return empty

    def update(
        grads: Mapping[str, Tensor], state: Any, params: Optional[Mapping[str, Tensor]] = None
    ) -> Tuple[Dict[str, Tensor], Any]:
        if isinstance(lr, Mapping):
            return {k: -lr[k] * g for k, g in grads.items()}, state
        return {k: -lr * g for k, g in grads.items()}, state

    return GradientTransformation(init, update)


def as_transformation(
    lr: Any, steps: int, start: int, trainable: Mapping[str, Tensor], params: Mapping[str, Tensor],
    *, partial: bool = False,
) -> GradientTransformation:
    """``lr`` in any form ``adapt`` takes, as one optimizer, checked against the params.

    ``start`` is the number of steps a given ``state`` has taken already (0 without one).
    A list of per-step rates covers exactly ``start + steps`` steps, or more
    with ``partial`` (the loop goes on in a later call, from the state returned).
    """
    if is_optimizer(lr):
        return lr  # type: ignore[no-any-return]
    if isinstance(lr, (list, tuple)):
        return per_step(_schedule(lr, steps, start, partial, trainable, params))
    return scaled(checked_rate(lr, "lr", trainable, params))


def checked_rate(
    lr: Any, name: str, trainable: Mapping[str, Tensor], params: Mapping[str, Tensor]
) -> Any:
    """One rate (number, tensor or dict), checked: keys, shapes, and that it fits the dtypes.

    ``name`` is ``"lr"``, or ``"lr[i]"`` for an entry of a per-step list.
    """
    if name == "lr":
        rates = check_lr(lr, optimizer_ok=True, per_step_ok=True)
        if rates is not None:
            check_rate_keys(rates, trainable, params)
    else:
        rates = _check_entry(lr, name, trainable, params)
    check_rate_shapes(lr, trainable)
    _check_fits(lr, name, trainable)
    return {k: rates[k] for k in trainable} if rates is not None else lr


def _check_entry(
    lr: Any, name: str, trainable: Mapping[str, Tensor], params: Mapping[str, Tensor]
) -> Optional[Mapping[str, Any]]:
    if isinstance(lr, Mapping):
        for k, v in lr.items():
            check_hyper(f"{name}[{k!r}]", v)
        missing = [k for k in trainable if k not in lr]
        unknown = [k for k in lr if k not in params]
        if missing or unknown:
            raise FparamsValueError(
                f"`{name}` is a dict of per-parameter rates but does not fit the params. "
                f"{keys_text(missing, unknown)} Give one rate per parameter that adapts."
            )
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (Tensor, numbers.Real)):
        raise FparamsTypeError(
            f"`{name}` must be a number, a tensor or a dict of per-parameter rates; got {describe(lr)}."
        )
    check_hyper(name, lr)
    return None


def _schedule(
    lr: Sequence[Any],
    steps: int,
    start: int,
    partial: bool,
    trainable: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
) -> List[Any]:
    if len(lr) < start + steps or (len(lr) > start + steps and not partial):
        runs = f"steps={steps} after the {start} steps of the given `state`" if start else f"steps={steps}"
        raise FparamsValueError(
            f"`lr` is a sequence of {len(lr)} per-step rates but {runs}; give one rate per inner "
            f"step, or a single rate for all of them (more rates than steps only with return_state=True, "
            f"to go on from the state in a later call)."
        )
    for i, entry in enumerate(lr):
        if is_optimizer(entry):
            raise FparamsTypeError(
                f"`lr[{i}]` is an optimizer; per-step rates are numbers, tensors or dicts "
                f"of tensors. Pass a single fparams.optim optimizer as `lr` instead."
            )
    return [checked_rate(entry, f"lr[{i}]", trainable, params) for i, entry in enumerate(lr)]


def _check_fits(lr: Any, name: str, trainable: Mapping[str, Tensor]) -> None:
    """A number rate must be finite in each parameter's dtype (1e39 is inf in float32)."""
    for k, p in trainable.items():
        rate, label = (lr[k], f"{name}[{k!r}]") if isinstance(lr, Mapping) else (lr, name)
        if isinstance(rate, Tensor) or not p.is_floating_point():
            continue
        biggest = torch.finfo(p.dtype).max
        if abs(float(rate)) > biggest:
            raise FparamsValueError(
                f"`{label}` = {rate!r} overflows {p.dtype} (largest {biggest:.4g}), the dtype of "
                f"params[{k!r}]: every step would give inf. Give a smaller rate."
            )
