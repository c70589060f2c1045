"""Pure transforms over dicts of tensors.

Each function returns a new dict and leaves its inputs as they were: the
dicts, the tensors, their values and their ``_version`` counters. They compose
with ``torch.func.grad``, ``torch.func.vmap`` and ``torch.compile``.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Tuple

import torch
from torch import Tensor

from ._checks import check_dict, check_keys, check_lr, check_rate_keys, check_rate_shapes, check_shapes
from ._filters import mask
from ._types import LR, Filter, Grads, TensorDict, Updates

_NOT_PARAMS = "Every key must name a parameter."


def clone(tensors: TensorDict) -> Dict[str, Tensor]:
    """A copy of every tensor that stays in the autograd graph (``t.clone()``).

    Examples:
        >>> import torch, fparams
        >>> p = {"w": torch.ones(2, requires_grad=True)}
        >>> c = fparams.clone(p)
        >>> c["w"].sum().backward(); p["w"].grad
        tensor([1., 1.])
    """
    check_dict("fparams.clone", "tensors", tensors)
    return {k: t.clone() for k, t in tensors.items()}


def detach(tensors: TensorDict, requires_grad: bool = False) -> Dict[str, Tensor]:
    """The tensors cut from the autograd graph (sharing their storage).

    With ``requires_grad=True`` every floating-point result is a fresh leaf
    that requires grad (the start of a new graph).

    Examples:
        >>> import torch, fparams
        >>> p = {"w": torch.ones(2, requires_grad=True) * 2}
        >>> fparams.detach(p)["w"].requires_grad
        False
    """
    check_dict("fparams.detach", "tensors", tensors)
    if not requires_grad:
        return {k: t.detach() for k, t in tensors.items()}
    return {k: t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for k, t in tensors.items()}


def apply_updates(params: TensorDict, updates: Updates) -> Dict[str, Tensor]:
    """``p + u`` for every name in ``updates``; other params pass through.

    Examples:
        >>> import torch, fparams
        >>> fparams.apply_updates({"w": torch.ones(2)}, {"w": torch.full((2,), 0.5)})
        {'w': tensor([1.5000, 1.5000])}
    """
    check_dict("fparams.apply_updates", "params", params)
    check_dict("fparams.apply_updates", "updates", updates)
    check_keys("fparams.apply_updates", "updates", updates, params, missing_ok=True, fix=_NOT_PARAMS)
    check_shapes("fparams.apply_updates", "updates", updates, params)
    return {k: (p + updates[k] if k in updates else p) for k, p in params.items()}


def _lr_for(lr: LR) -> Callable[[str], object]:
    if isinstance(lr, Mapping):
        return lr.__getitem__
    return lambda _k: lr


def sgd_step(params: TensorDict, grads: Grads, lr: LR) -> Dict[str, Tensor]:
    """One gradient step ``p - lr * g`` for every name in ``grads``.

    ``lr`` is a number, a tensor (it may require grad: a learned rate), or a
    dict with one tensor per name in ``grads`` (Meta-SGD). Params without a
    gradient pass through.

    Examples:
        >>> import torch, fparams
        >>> fparams.sgd_step({"w": torch.ones(2)}, {"w": torch.ones(2)}, lr=0.1)
        {'w': tensor([0.9000, 0.9000])}
    """
    where = "fparams.sgd_step"
    check_dict(where, "params", params)
    check_dict(where, "grads", grads)
    check_keys(where, "grads", grads, params, missing_ok=True, fix=_NOT_PARAMS)
    check_shapes(where, "grads", grads, params)
    rates = check_lr(where, lr)
    if rates is not None:
        check_rate_keys(where, rates, grads, params)
    check_rate_shapes(where, lr, {k: params[k] for k in grads})
    rate = _lr_for(lr)
    return {k: (p - rate(k) * grads[k] if k in grads else p) for k, p in params.items()}  # type: ignore[operator]


def map_params(fn: Callable[..., Tensor], tensors: TensorDict, *rest: TensorDict) -> Dict[str, Tensor]:
    """``{k: fn(tensors[k], *(r[k] for r in rest))}``; every dict must have the same keys.

    Examples:
        >>> import torch, fparams
        >>> fparams.map_params(torch.mul, {"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)})
        {'w': tensor([3., 3.])}
    """
    where = "fparams.map_params"
    check_dict(where, "tensors", tensors)
    for i, other in enumerate(rest):
        check_dict(where, f"rest[{i}]", other)
        if other.keys() != tensors.keys():
            check_keys(where, f"rest[{i}]", other, tensors, fix="Every dict must have the keys of `tensors`.")
    return {k: fn(t, *(other[k] for other in rest)) for k, t in tensors.items()}


def partition(tensors: TensorDict, filter: Filter) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Split a dict in two: the entries ``filter`` selects, and the rest.

    ``filter`` is a glob (``"head.*"``), a compiled regex (``re.search``), an
    iterable of those, or a predicate ``fn(name, tensor) -> bool``. A pattern
    that matches no name raises ``ValueError``.

    Examples:
        >>> import torch, fparams
        >>> p = {"body.w": torch.ones(1), "head.w": torch.zeros(1)}
        >>> head, body = fparams.partition(p, "head.*")
        >>> sorted(head), sorted(body)
        (['head.w'], ['body.w'])
    """
    check_dict("fparams.partition", "tensors", tensors)
    chosen = mask("fparams.partition", tensors, filter)
    picked: Dict[str, Tensor] = {}
    rest: Dict[str, Tensor] = {}
    for (k, t), keep in zip(tensors.items(), chosen):
        (picked if keep else rest)[k] = t
    return picked, rest


def combine(*dicts: TensorDict) -> Dict[str, Tensor]:
    """Merge dicts with disjoint keys (the inverse of :func:`partition`).

    Examples:
        >>> import torch, fparams
        >>> sorted(fparams.combine({"a": torch.ones(1)}, {"b": torch.ones(1)}))
        ['a', 'b']
    """
    out: Dict[str, Tensor] = {}
    for i, d in enumerate(dicts):
        check_dict("fparams.combine", f"dicts[{i}]", d)
        clash = sorted(k for k in d if k in out)
        if clash:
            raise ValueError(
                f"fparams.combine: key(s) {', '.join(repr(k) for k in clash)} appear in more than one "
                f"dict; combine merges disjoint dicts such as the two halves of partition()."
            )
        out.update(d)
    return out


def zeros_like(tensors: TensorDict) -> Dict[str, Tensor]:
    """A dict of zeros shaped like ``tensors`` (a starting state for updates).

    Examples:
        >>> import torch, fparams
        >>> fparams.zeros_like({"w": torch.ones(2)})
        {'w': tensor([0., 0.])}
    """
    check_dict("fparams.zeros_like", "tensors", tensors)
    return {k: torch.zeros_like(t) for k, t in tensors.items()}
