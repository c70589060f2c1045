"""learn2learn's module API as thin shims over the engine.

``clone_module``, ``detach_module`` and ``update_module`` keep learn2learn
0.2's names, signatures and behaviour. Each one takes the module's state
(:func:`fparams.split`), transforms it as dicts or tensor by tensor, and writes
the result back: into a structural copy (``clone_module``) or, as the API
documents, into the module itself (``detach_module``, ``update_module``).
Where learn2learn prints and carries on, these raise.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ._checks import (
    check_flag,
    check_hyper,
    check_instance,
    check_rate_fits,
    check_rate_shapes,
    describe,
    rate_may_overflow,
)
from ._errors import FparamsTypeError, FparamsValueError, public
from ._kernels import check_double_backward
from ._state import TensorMemo, Tree, rebuild, rewrite, tree, unique_params
from ._transforms import _cast


def _clone_param(name: str, t: Tensor) -> Tensor:
    return t.clone()


def _clone_buffer(name: str, t: Tensor) -> Tensor:
    # Buffers outside the graph (running statistics) are shared, as in learn2learn.
    return t.clone() if t.requires_grad else t


@public("clone_module")
def clone_module(module: Any, memo: Optional[TensorMemo] = None) -> Any:
    """A copy of ``module`` whose parameters are ``clone()``s still in the graph.

    Gradients taken through the clone reach the original's parameters. Tied
    parameters stay tied; buffers that require grad are cloned, the others are
    shared with the original; a submodule reachable twice is copied once; RNN
    flat weights point at the cloned tensors. A value that is not a Module
    (``None`` in a ModuleList, say) is returned as it is. The original module
    is not changed.

    Args:
        module: the module to clone.
        memo: optional ``{id(tensor): (tensor, clone)}`` shared between calls,
            to keep tensors tied across several cloned modules.

    Examples:
        >>> import torch, fparams
        >>> net = torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
        >>> clone = fparams.clone_module(net)
        >>> clone(torch.randn(5, 20)).pow(2).mean().backward()
        >>> net[0].weight.grad is not None
        True
    """
    _check_memo(memo)
    if not isinstance(module, nn.Module):
        return module
    return rebuild(module, _clone_param, _clone_buffer, memo)


def _detacher(keep_requires_grad: bool) -> Callable[[str, Tensor], Tensor]:
    def detach(name: str, t: Tensor) -> Tensor:
        if not t.requires_grad:
            return t
        if keep_requires_grad and t.grad_fn is None:
            # A leaf is cut from every graph already: keep the tensor itself, as
            # learn2learn's in-place detach_() does, so an optimizer holding it
            # still drives the module.
            return t
        flag = keep_requires_grad
        if isinstance(t, nn.Parameter):
            return nn.Parameter(t.detach(), requires_grad=flag)
        return t.detach().requires_grad_(flag)

    return detach


@public("detach_module")
def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Detach every parameter, and every buffer that requires grad, in place.

    The module's tensor slots are replaced by detached tensors (sharing
    storage); nothing is returned. With ``keep_requires_grad=True`` the
    detached tensors require grad where the old ones did, so the module starts
    a fresh graph.

    Examples:
        >>> import torch, fparams
        >>> net = torch.nn.Linear(20, 2)
        >>> clone = fparams.clone_module(net)
        >>> fparams.detach_module(clone)
        >>> clone.weight.requires_grad
        False
    """
    check_instance("module", module, nn.Module, "a torch.nn.Module")
    check_flag("keep_requires_grad", keep_requires_grad)
    detach = _detacher(keep_requires_grad)
    rewrite(module, detach, detach)


def _param_name(module: nn.Module, i: int) -> str:
    # Names only for error messages: building one per parameter on every
    # update would cost more than the checks themselves.
    return list(module.named_parameters())[i][0]


def _what(module: nn.Module, arg: str, i: int) -> str:
    """``"the gradient for parameter '0.weight'"``: entry ``i`` of ``arg``, in a message."""
    return f"the {_NOUN[arg]} for parameter {_param_name(module, i)!r}"


_NOUN = {"updates": "update", "grads": "gradient", "lrs": "learning rate"}


def _check_list(module: nn.Module, arg: str, values: object, count: int, holder: str = "model") -> List[Any]:
    """``values`` as a list with one entry per tensor of ``module.parameters()``."""
    if isinstance(values, Tensor):
        raise FparamsTypeError(
            f"`{arg}` must be a list with one tensor per parameter; got a single tensor. "
            f"Wrap it in a list: {arg}=[{arg[0]}]."
        )
    if isinstance(values, (str, Mapping)) or not isinstance(values, Iterable):
        raise FparamsTypeError(
            f"`{arg}` must be a list with one entry per tensor of {holder}.parameters(); "
            f"got {describe(values)}."
        )
    entries = list(values)
    if len(entries) != count:
        raise FparamsValueError(
            f"got {len(entries)} {arg} for {count} parameters; give one {_NOUN[arg]} (or None) per "
            f"tensor of {holder}.parameters(), in that order."
            + ("" if arg == "updates" else " (learn2learn prints a warning and truncates)")
        )
    return entries


def _check_entries(
    module: nn.Module, arg: str, params: Sequence[Tensor], values: Sequence[Optional[object]]
) -> Dict[int, Tensor]:
    """``{id(param): value}`` for the entries that are not None, each a tensor of the parameter's
    shape whose dtype casts to the parameter's."""
    found: Dict[int, Tensor] = {}
    for i, (p, u) in enumerate(zip(params, values)):
        if u is None:
            continue
        if not isinstance(u, Tensor):
            raise FparamsTypeError(
                f"{_what(module, arg, i)} is {describe(u)}; `{arg}` must hold tensors (or None to skip)."
            )
        if u.shape != p.shape:
            raise FparamsValueError(
                f"{_what(module, arg, i)} has shape {tuple(u.shape)} but the parameter has shape "
                f"{tuple(p.shape)}."
            )
        if u.dtype != p.dtype and not torch.can_cast(u.dtype, p.dtype):
            raise FparamsTypeError(
                f"{_what(module, arg, i)} has dtype {u.dtype}, which cannot be cast to the parameter's "
                f"dtype {p.dtype}; parameters keep their dtype."
            )
        found[id(p)] = u
    return found


def _add_update_attr(name: str, t: Tensor) -> Tensor:
    u = getattr(t, "update", None)
    if u is None:
        return t
    # Consumed, as learn2learn does: a tensor that another module also holds
    # (a shared buffer, a weight tied across modules) is never updated twice,
    # and the update's graph is not kept alive by the old tensor.
    t.update = None  # type: ignore[attr-defined]
    return t + _cast(u, t)


def _write(
    module: nn.Module, found: Dict[int, Tensor], memo: Optional[TensorMemo], modules: Tree
) -> nn.Module:
    """Replace each parameter ``p`` that has an update ``u`` in ``found`` by ``p + u``, in place.

    Every shim's update goes through here, so the check that a second-order step has a double
    backward (the user's own forward through fused attention has none) is made here once.
    """
    check_double_backward(found.values(), "user")

    def param(name: str, t: Tensor) -> Tensor:
        u = found.get(id(t))
        return t if u is None else t + _cast(u, t)

    rewrite(module, param, _add_update_attr, memo, modules)
    return module


@public("update_module")
def update_module(
    module: nn.Module,
    updates: Optional[Sequence[Optional[Tensor]]] = None,
    memo: Optional[TensorMemo] = None,
) -> nn.Module:
    """Replace each parameter ``p`` by ``p + u``, in place, keeping the graph.

    ``updates`` has one tensor (or ``None``, to skip) per tensor of
    ``module.parameters()``, in that order. With ``updates=None`` the
    ``.update`` attribute learn2learn's API places on parameters and buffers is
    used instead. Tied parameters stay tied and RNN flat weights are
    refreshed. Each parameter keeps its dtype: an update of another
    floating-point dtype is cast to the parameter's (one that cannot be, such
    as a complex update to a real parameter, raises ``TypeError``).

    Args:
        module: the module to update (changed in place).
        updates: one tensor or None per tensor of ``module.parameters()``.
        memo: optional ``{id(tensor): (tensor, new)}`` shared between calls,
            to keep tensors tied across several modules.

    Returns:
        ``module``.

    Raises:
        ValueError: the number of updates differs from the number of
            parameters, or an update's shape differs from its parameter's.
        TypeError: an update is neither a tensor nor ``None``.

    Examples:
        >>> import torch, fparams
        >>> model = torch.nn.Linear(3, 1)
        >>> error = model(torch.randn(4, 3)).pow(2).mean()
        >>> grads = torch.autograd.grad(error, model.parameters(), create_graph=True)
        >>> model = fparams.update_module(model, updates=[-0.1 * g for g in grads])
        >>> model.weight.grad_fn is not None
        True
    """
    check_instance("module", module, nn.Module, "a torch.nn.Module")
    _check_memo(memo)
    return _update_module(module, updates, memo)


def _update_module(
    module: nn.Module, updates: Optional[Sequence[Optional[Tensor]]], memo: Optional[TensorMemo] = None
) -> nn.Module:
    """:func:`update_module` for fparams' own callers (errors carry the caller's public name)."""
    if updates is None:
        rewrite(module, _add_update_attr, _add_update_attr, memo)
        return module
    modules = tree(module)
    params = unique_params(modules)
    entries = _check_list(module, "updates", updates, len(params), holder="module")
    found = _check_entries(module, "updates", params, entries)
    return _write(module, found, memo, modules)


def _check_memo(memo: object) -> None:
    if memo is not None and not isinstance(memo, dict):
        raise FparamsTypeError(
            f"`memo` must be None or a dict shared between calls (start with {{}}); got {describe(memo)}."
        )


def _check_module(module: object) -> None:
    check_instance("model", module, nn.Module, "a torch.nn.Module")


def check_rate(lr: object, model: nn.Module, index: Optional[int] = None) -> None:
    """A learning rate as ``adapt`` takes one (a finite number >= 0 or a tensor) that fits the
    dtype of every parameter of ``model`` (or of its ``index``-th one, for ``lrs[index]``)."""
    arg = "lr" if index is None else f"lrs[{index}]"
    check_hyper(arg, lr)
    if rate_may_overflow(lr) or (isinstance(lr, Tensor) and lr.dim() > 0):  # names only if needed
        named = list(model.named_parameters())
        scaled = dict(named if index is None else named[index : index + 1])
        check_rate_fits(lr, scaled, arg)
        check_rate_shapes(lr, scaled)


@public("maml_update")
def maml_update(model: nn.Module, lr: Any, grads: Optional[Sequence[Optional[Tensor]]] = None) -> nn.Module:
    """learn2learn's MAML step on a module, in place: ``p - lr * g``, keeping the graph.

    ``grads`` has one tensor (or ``None``, to skip) per tensor of
    ``model.parameters()``; ``lr`` is a number or a tensor (a learned rate).
    With ``grads=None`` the ``.update`` attributes learn2learn's API places on
    the tensors are applied instead (as :func:`update_module` does). Returns
    ``model``; tied parameters stay tied, RNN flat weights are refreshed, and
    each parameter keeps its dtype.

    Raises:
        ValueError: the number of gradients differs from the number of
            parameters (learn2learn prints a warning and truncates), a
            gradient's shape differs from its parameter's, or ``lr`` is
            negative, not finite or overflows the parameters' dtype.
        TypeError: ``grads`` is not a list, an entry is neither a tensor nor
            ``None``, or ``lr`` is neither a number nor a tensor.

    Examples:
        >>> import torch, fparams
        >>> model = fparams.clone_module(torch.nn.Linear(3, 1))
        >>> loss = model(torch.randn(4, 3)).pow(2).mean()
        >>> grads = torch.autograd.grad(loss, model.parameters(), create_graph=True)
        >>> model = fparams.maml_update(model, lr=0.1, grads=grads)
        >>> model.weight.grad_fn is not None
        True
    """
    _check_module(model)
    modules = tree(model)
    params = unique_params(modules)
    check_rate(lr, model)
    if grads is None:
        return _update_module(model, None)
    found = _check_entries(model, "grads", params, _check_list(model, "grads", grads, len(params)))
    return _write(model, {k: -lr * g for k, g in found.items()}, None, modules)


@public("meta_sgd_update")
def meta_sgd_update(
    model: nn.Module,
    lrs: Optional[Sequence[Any]] = None,
    grads: Optional[Sequence[Optional[Tensor]]] = None,
) -> nn.Module:
    """learn2learn's Meta-SGD step on a module, in place: ``p - lr_p * g_p``, keeping the graph.

    ``lrs`` and ``grads`` each hold one entry per tensor of
    ``model.parameters()`` (a rate: a finite number >= 0, or a tensor that
    broadcasts to the parameter's shape; a gradient, or ``None`` to skip).
    Returns ``model``; each parameter keeps its dtype.

    learn2learn also accepts ``lrs=None, grads=None`` and then reads ``.grad``
    and an ``._lr`` attribute it stashed on the parameters earlier; fparams
    keeps no state on tensors, so both are required.

    Raises:
        ValueError: ``lrs`` or ``grads`` is missing, their length differs
            from the number of parameters, or a rate is out of range.
        TypeError: ``lrs`` or ``grads`` is not a list, or an entry has the
            wrong type.

    Examples:
        >>> import torch, fparams
        >>> model = fparams.clone_module(torch.nn.Linear(3, 1))
        >>> lrs = [torch.full_like(p, 0.1, requires_grad=True) for p in model.parameters()]
        >>> loss = model(torch.randn(4, 3)).pow(2).mean()
        >>> grads = torch.autograd.grad(loss, model.parameters(), create_graph=True)
        >>> model = fparams.meta_sgd_update(model, lrs=lrs, grads=grads)
        >>> model(torch.randn(2, 3)).sum().backward()
        >>> lrs[0].grad is not None
        True
    """
    _check_module(model)
    if lrs is None or grads is None:
        missing = [name for name, v in (("lrs", lrs), ("grads", grads)) if v is None]
        raise FparamsValueError(
            f"{' and '.join(f'`{m}`' for m in missing)} missing; give one learning rate and "
            f"one gradient per tensor of model.parameters() (learn2learn reads them from attributes "
            f"stashed on the tensors, which fparams does not keep)."
        )
    modules = tree(model)
    params = unique_params(modules)
    rates = _check_list(model, "lrs", lrs, len(params))
    for i, rate in enumerate(rates):
        check_rate(rate, model, i)
    found = _check_entries(model, "grads", params, _check_list(model, "grads", grads, len(params)))
    by_id = {id(p): rate for p, rate in zip(params, rates)}
    return _write(model, {k: -by_id[k] * g for k, g in found.items()}, None, modules)


@public("clone_parameters")
def clone_parameters(param_list: Sequence[Tensor]) -> List[Tensor]:
    """learn2learn's ``clone_parameters``: ``[p.clone() for p in param_list]``, still in the graph.

    Examples:
        >>> import torch, fparams
        >>> w = torch.ones(2, requires_grad=True)
        >>> (c,) = fparams.clone_parameters([w])
        >>> c.sum().backward(); w.grad
        tensor([1., 1.])
    """
    if isinstance(param_list, (Tensor, Mapping)) or not isinstance(param_list, Iterable):
        raise FparamsTypeError(
            f"`param_list` must be a list of tensors (e.g. "
            f"list(model.parameters())); got {type(param_list).__name__}."
        )
    values = list(param_list)
    for i, p in enumerate(values):
        if not isinstance(p, Tensor):
            raise FparamsTypeError(
                f"`param_list[{i}]` is a {type(p).__name__}, not a tensor."
            )
    return [p.clone() for p in values]


@public("clone_named_parameters")
def clone_named_parameters(param_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """learn2learn's ``clone_named_parameters``: ``{k: p.clone()}``, still in the graph.

    Examples:
        >>> import torch, fparams
        >>> net = torch.nn.Linear(2, 1)
        >>> sorted(fparams.clone_named_parameters(dict(net.named_parameters())))
        ['bias', 'weight']
    """
    if not isinstance(param_dict, Mapping):
        raise FparamsTypeError(
            f"`param_dict` must be a dict of tensors (e.g. "
            f"dict(model.named_parameters())); got {type(param_dict).__name__}."
        )
    bad = sorted(str(k) for k, p in param_dict.items() if not isinstance(p, Tensor))
    if bad:
        raise FparamsTypeError(f"`param_dict` must map names to tensors; the values for {bad} are not.")
    return {k: p.clone() for k, p in param_dict.items()}


# The distribution shims live in their own module; re-exported here, where they were.
from ._distributions import clone_distribution, detach_distribution  # noqa: E402

__all__ = [
    "clone_distribution",
    "clone_module",
    "clone_named_parameters",
    "clone_parameters",
    "detach_distribution",
    "detach_module",
    "maml_update",
    "meta_sgd_update",
    "update_module",
]
