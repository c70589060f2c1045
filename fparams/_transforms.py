"""Pure transforms over dicts of tensors.

Each function returns a new dict and leaves its inputs as they were: the
dicts, the tensors, their values and their ``_version`` counters. They compose
with ``torch.func.grad``, ``torch.func.vmap`` and ``torch.compile``.
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, Mapping, Tuple

import torch
from torch import Tensor

from ._filters import mask
from ._types import LR, Filter, Grads, TensorDict, Updates


def _check_dict(where: str, arg: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{where}: `{arg}` must be a dict of tensors keyed by name; got "
            f"{type(value).__name__}. Use fparams.split(module) to get one."
        )


def key_mismatch(given: Mapping[str, object], expected: Mapping[str, object]) -> str:
    """``"Missing key(s): 'a'. Unexpected key(s): 'b'."``, sorted, for error messages."""
    parts = []
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    if missing:
        parts.append("Missing key(s): " + ", ".join(repr(k) for k in missing) + ".")
    if unexpected:
        parts.append("Unexpected key(s): " + ", ".join(repr(k) for k in unexpected) + ".")
    return " ".join(parts)


def _check_keys(where: str, arg: str, keys: Mapping[str, object], allowed: Mapping[str, object]) -> None:
    extra = [k for k in keys if k not in allowed]
    if extra:
        raise ValueError(
            f"{where}: `{arg}` has key(s) {sorted(extra)} that are not in the params; "
            f"the params have {sorted(allowed)}."
        )


def _check_shapes(where: str, arg: str, given: Mapping[str, object], params: TensorDict) -> None:
    """Every tensor of ``given`` has exactly its parameter's shape (no silent broadcasting)."""
    for k, t in given.items():
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{where}: `{arg}[{k!r}]` is a {type(t).__name__}; give a tensor (or leave the key out)."
            )
        if t.shape != params[k].shape:
            raise ValueError(
                f"{where}: `{arg}[{k!r}]` has shape {tuple(t.shape)} but the parameter has shape "
                f"{tuple(params[k].shape)}."
            )


def check_rate_shapes(where: str, lr: object, params: TensorDict) -> None:
    """A tensor learning rate must broadcast to each parameter's shape without changing it."""
    for k, p in params.items():
        rate = lr[k] if isinstance(lr, Mapping) else lr
        if isinstance(rate, Tensor) and not _keeps_shape(rate.shape, p.shape):
            raise ValueError(
                f"{where}: the learning rate for {k!r} has shape {tuple(rate.shape)}, which would "
                f"change the parameter's shape {tuple(p.shape)}; give a scalar or a tensor of the "
                f"parameter's shape."
            )


def _keeps_shape(rate: torch.Size, shape: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(rate, shape) == shape
    except RuntimeError:  # not broadcastable at all
        return False


def clone(tensors: TensorDict) -> Dict[str, Tensor]:
    """A copy of every tensor that stays in the autograd graph (``t.clone()``).

    Examples:
        >>> import torch, fparams
        >>> p = {"w": torch.ones(2, requires_grad=True)}
        >>> c = fparams.clone(p)
        >>> c["w"].sum().backward(); p["w"].grad
        tensor([1., 1.])
    """
    _check_dict("fparams.clone", "tensors", tensors)
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
    _check_dict("fparams.detach", "tensors", tensors)
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
    _check_dict("fparams.apply_updates", "params", params)
    _check_dict("fparams.apply_updates", "updates", updates)
    _check_keys("fparams.apply_updates", "updates", updates, params)
    _check_shapes("fparams.apply_updates", "updates", updates, params)
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
    _check_dict(where, "params", params)
    _check_dict(where, "grads", grads)
    _check_keys(where, "grads", grads, params)
    _check_shapes(where, "grads", grads, params)
    if isinstance(lr, Mapping):
        missing = [k for k in grads if k not in lr]
        if missing:
            raise ValueError(
                f"{where}: `lr` is a dict but has no rate for {sorted(missing)}; give "
                f"one tensor per parameter that gets a gradient."
            )
    elif not isinstance(lr, (numbers.Real, Tensor)):
        raise TypeError(
            f"{where}: `lr` must be a number, a tensor or a dict of tensors; got {type(lr).__name__}."
        )
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
    _check_dict(where, "tensors", tensors)
    for i, other in enumerate(rest):
        _check_dict(where, f"rest[{i}]", other)
        if other.keys() != tensors.keys():
            missing = sorted(set(tensors) - set(other))
            extra = sorted(set(other) - set(tensors))
            raise ValueError(
                f"{where}: dict {i + 1} does not have the keys of the first dict; "
                f"missing {missing}, unexpected {extra}."
            )
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
    _check_dict("fparams.partition", "tensors", tensors)
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
        _check_dict("fparams.combine", f"dicts[{i}]", d)
        clash = [k for k in d if k in out]
        if clash:
            raise ValueError(
                f"fparams.combine: key(s) {sorted(clash)} appear in more than one dict; "
                f"combine merges disjoint dicts such as the two halves of partition()."
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
    _check_dict("fparams.zeros_like", "tensors", tensors)
    return {k: torch.zeros_like(t) for k, t in tensors.items()}
