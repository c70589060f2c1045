"""Pure transforms over dicts of tensors.

Each function returns a new dict and leaves its inputs as they were: the
dicts, the tensors, their values and their ``_version`` counters. They compose
with ``torch.func.grad``, ``torch.func.vmap`` and ``torch.compile``.

Parameters keep their dtype: an update (or ``lr * grad``) of another dtype of
the same kind is cast to its parameter's dtype where it is added
(:func:`_cast`, the one place), so a bfloat16 model stays bfloat16 under
float32 updates and a float64 rate dict leaves float32 params float32. An
update that cannot be cast without changing its kind (a float update into an
integer tensor, a complex one into a real one) is refused.

Each public function checks its input once and hands off to a private
implementation (``_apply_updates``, ``_sgd_step``, ``_partition``) that fparams'
own code calls, so its errors carry the name of the function the user called.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Tuple

import torch
from torch import Tensor

from ._checks import (
    check_castable,
    check_dict,
    check_flag,
    check_keys,
    check_lr,
    check_rate_fits,
    check_rate_keys,
    check_rate_shapes,
    check_shapes,
    check_tensors,
)
from ._errors import FparamsTypeError, FparamsValueError, public
from ._filters import mask
from ._types import LR, Filter, Grads, TensorDict, Updates

_NOT_PARAMS = "Every key must name a parameter."


def _cast(update: Tensor, param: Tensor) -> Tensor:
    """``update`` in ``param``'s dtype: the one place where the dtype rule is applied."""
    return update if update.dtype == param.dtype else update.to(param.dtype)


@public("clone")
def clone(tensors: TensorDict) -> Dict[str, Tensor]:
    """A copy of every tensor that stays in the autograd graph (``t.clone()``).

    Args:
        tensors: a dict of tensors (params or buffers).

    Returns:
        A new dict of clones, keyed like ``tensors``.

    Examples:
        >>> import torch, fparams
        >>> p = {"w": torch.ones(2, requires_grad=True)}
        >>> c = fparams.clone(p)
        >>> c["w"].sum().backward(); p["w"].grad
        tensor([1., 1.])
    """
    check_dict("tensors", tensors)
    check_tensors("tensors", tensors)
    return {k: t.clone() for k, t in tensors.items()}


@public("detach")
def detach(tensors: TensorDict, requires_grad: bool = False) -> Dict[str, Tensor]:
    """The tensors cut from the autograd graph (sharing their storage).

    Args:
        tensors: a dict of tensors.
        requires_grad: make every floating-point result a fresh leaf that
            requires grad (the start of a new graph).

    Returns:
        A new dict of detached tensors, keyed like ``tensors``.

    Examples:
        >>> import torch, fparams
        >>> p = {"w": torch.ones(2, requires_grad=True) * 2}
        >>> fparams.detach(p)["w"].requires_grad
        False
    """
    check_dict("tensors", tensors)
    check_tensors("tensors", tensors)
    check_flag("requires_grad", requires_grad)
    if not requires_grad:
        return {k: t.detach() for k, t in tensors.items()}
    return {k: t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for k, t in tensors.items()}


def check_updates(params: object, updates: object, arg: str = "updates") -> None:
    """What :func:`apply_updates` requires of its input (``arg`` names the updates)."""
    check_dict("params", params)
    check_dict(arg, updates)
    assert isinstance(params, Mapping) and isinstance(updates, Mapping)  # for mypy
    check_tensors("params", params)
    check_keys(arg, updates, params, missing_ok=True, fix=_NOT_PARAMS)
    check_shapes(arg, updates, params)
    check_castable(arg, updates, params)


@public("apply_updates")
def apply_updates(params: TensorDict, updates: Updates) -> Dict[str, Tensor]:
    """``p + u`` for every name in ``updates``; other params pass through.

    Each parameter keeps its dtype: an update of another floating-point dtype
    is cast to the parameter's before it is added (a float32 update to a
    bfloat16 parameter gives a bfloat16 parameter); one that cannot be cast
    within its kind (complex into real, float into integer) raises a
    ``TypeError``.

    Args:
        params: the parameters, a dict of tensors.
        updates: additive updates for some or all of them, each of its
            parameter's shape.

    Returns:
        A new dict of parameters, keyed like ``params``.

    Examples:
        >>> import torch, fparams
        >>> fparams.apply_updates({"w": torch.ones(2)}, {"w": torch.full((2,), 0.5)})
        {'w': tensor([1.5000, 1.5000])}
    """
    check_updates(params, updates)
    return _apply_updates(params, updates)


def _apply_updates(params: TensorDict, updates: TensorDict) -> Dict[str, Tensor]:
    """:func:`apply_updates` without its checks (for callers that checked once)."""
    return {k: (p + _cast(updates[k], p) if k in updates else p) for k, p in params.items()}


def _lr_for(lr: LR) -> Callable[[str], object]:
    if isinstance(lr, Mapping):
        return lr.__getitem__
    return lambda _k: lr


def check_sgd(params: object, grads: object, lr: object) -> None:
    """What :func:`sgd_step` requires of its input."""
    check_updates(params, grads, "grads")
    assert isinstance(params, Mapping) and isinstance(grads, Mapping)  # for mypy
    rates = check_lr(lr)
    scaled = {k: params[k] for k in grads}
    if rates is not None:
        check_rate_keys(rates, grads, params)
    check_rate_shapes(lr, scaled)
    check_rate_fits(lr, scaled)
    if rates is not None:
        tensors = {k: r for k, r in rates.items() if k in scaled and isinstance(r, Tensor)}
        check_castable("lr", tensors, scaled)


@public("sgd_step")
def sgd_step(params: TensorDict, grads: Grads, lr: LR) -> Dict[str, Tensor]:
    """One gradient step ``p - lr * g`` for every name in ``grads``.

    Params without a gradient pass through. Each parameter keeps its dtype:
    ``lr * g`` is cast to the parameter's dtype before it is subtracted (a
    float64 rate dict leaves float32 params float32).

    Args:
        params: the parameters, a dict of tensors.
        grads: gradients for some or all of them, each of its parameter's shape.
        lr: a number (finite, >= 0, within the params' dtype), a tensor (it
            may require grad: a learned rate), or a dict with one number or
            tensor per name in ``grads`` (Meta-SGD).

    Returns:
        A new dict of parameters, keyed like ``params``.

    Examples:
        >>> import torch, fparams
        >>> fparams.sgd_step({"w": torch.ones(2)}, {"w": torch.ones(2)}, lr=0.1)
        {'w': tensor([0.9000, 0.9000])}
    """
    check_sgd(params, grads, lr)
    return _sgd_step(params, grads, lr)


def _sgd_step(params: TensorDict, grads: TensorDict, lr: LR) -> Dict[str, Tensor]:
    """:func:`sgd_step` without its checks (for callers that checked once)."""
    rate = _lr_for(lr)
    return {
        k: (p - _cast(rate(k) * grads[k], p) if k in grads else p)  # type: ignore[operator]
        for k, p in params.items()
    }


@public("map_params")
def map_params(fn: Callable[..., Tensor], tensors: TensorDict, *rest: TensorDict) -> Dict[str, Tensor]:
    """``{k: fn(tensors[k], *(r[k] for r in rest))}``; every dict must have the same keys.

    Args:
        fn: a function of one tensor from each dict.
        tensors: the first dict.
        *rest: more dicts with the keys of ``tensors``.

    Returns:
        A new dict keyed like ``tensors``.

    Examples:
        >>> import torch, fparams
        >>> fparams.map_params(torch.mul, {"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)})
        {'w': tensor([3., 3.])}
    """
    if not callable(fn):
        raise FparamsTypeError(f"`fn` must be a function of one tensor per dict; got {type(fn).__name__}.")
    check_dict("tensors", tensors)
    check_tensors("tensors", tensors)
    for i, other in enumerate(rest):
        check_dict(f"rest[{i}]", other)
        if other.keys() != tensors.keys():
            check_keys(f"rest[{i}]", other, tensors, fix="Every dict must have the keys of `tensors`.")
        check_tensors(f"rest[{i}]", other)
    return {k: fn(t, *(other[k] for other in rest)) for k, t in tensors.items()}


@public("partition")
def partition(tensors: TensorDict, filter: Filter) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Split a dict in two: the entries ``filter`` selects, and the rest.

    Args:
        tensors: a dict of tensors.
        filter: a glob (``"head.*"``), a compiled regex (``re.search``), an
            iterable of those, or a predicate ``fn(name, tensor) -> bool``. A
            pattern that matches no name raises ``ValueError``.

    Returns:
        ``(selected, rest)``, two dicts in the order of ``tensors``.

    Examples:
        >>> import torch, fparams
        >>> p = {"body.w": torch.ones(1), "head.w": torch.zeros(1)}
        >>> head, body = fparams.partition(p, "head.*")
        >>> sorted(head), sorted(body)
        (['head.w'], ['body.w'])
    """
    return _partition(tensors, filter)


def _partition(tensors: TensorDict, filter: Filter) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """:func:`partition`, for fparams' own callers (errors then carry the caller's public name)."""
    check_dict("tensors", tensors)
    chosen = mask(tensors, filter)
    picked: Dict[str, Tensor] = {}
    rest: Dict[str, Tensor] = {}
    for (k, t), keep in zip(tensors.items(), chosen):
        (picked if keep else rest)[k] = t
    return picked, rest


@public("combine")
def combine(*dicts: TensorDict) -> Dict[str, Tensor]:
    """Merge dicts with disjoint keys (the inverse of :func:`partition`).

    Args:
        *dicts: dicts of tensors, no key in more than one.

    Returns:
        One new dict with every entry.

    Examples:
        >>> import torch, fparams
        >>> sorted(fparams.combine({"a": torch.ones(1)}, {"b": torch.ones(1)}))
        ['a', 'b']
    """
    out: Dict[str, Tensor] = {}
    for i, d in enumerate(dicts):
        check_dict(f"dicts[{i}]", d)
        clash = sorted(k for k in d if k in out)
        if clash:
            raise FparamsValueError(
                f"key(s) {', '.join(repr(k) for k in clash)} appear in more than one "
                f"dict; combine merges disjoint dicts such as the two halves of partition()."
            )
        out.update(d)
    return out


@public("zeros_like")
def zeros_like(tensors: TensorDict) -> Dict[str, Tensor]:
    """A dict of zeros shaped like ``tensors`` (a starting state for updates).

    Args:
        tensors: a dict of tensors.

    Returns:
        A new dict of zero tensors of the same shapes, dtypes and devices.

    Examples:
        >>> import torch, fparams
        >>> fparams.zeros_like({"w": torch.ones(2)})
        {'w': tensor([0., 0.])}
    """
    check_dict("tensors", tensors)
    check_tensors("tensors", tensors)
    return {k: torch.zeros_like(t) for k, t in tensors.items()}
