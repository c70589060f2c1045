"""learn2learn's module API as thin shims over the engine.

``clone_module``, ``detach_module`` and ``update_module`` keep learn2learn
0.2's names, signatures and behaviour. Each one takes the module's state
(:func:`fparams.split`), transforms it as dicts or tensor by tensor, and writes
the result back: into a structural copy (``clone_module``) or, as the API
documents, into the module itself (``detach_module``, ``update_module``).
Where learn2learn prints and carries on, these raise.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.distributions import Distribution
from torch.distributions.transforms import Transform

from ._checks import check_instance
from ._kernels import check_double_backward
from ._state import TensorMemo, rebuild, rewrite, tree, unique_params

_A_DISTRIBUTION = "a torch.distributions.Distribution"


def _clone_param(name: str, t: Tensor) -> Tensor:
    return t.clone()


def _clone_buffer(name: str, t: Tensor) -> Tensor:
    # Buffers outside the graph (running statistics) are shared, as in learn2learn.
    return t.clone() if t.requires_grad else t


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
    check_instance("fparams.detach_module", "module", module, nn.Module, "a torch.nn.Module")
    detach = _detacher(keep_requires_grad)
    rewrite(module, detach, detach)


def _check_updates(
    module: nn.Module, params: Sequence[Tensor], updates: Sequence[Optional[Tensor]]
) -> Dict[int, Tensor]:
    if len(updates) != len(params):
        raise ValueError(
            f"fparams.update_module: got {len(updates)} updates for {len(params)} parameters; "
            f"give one update (or None) per tensor of module.parameters(), in that order."
        )
    found: Dict[int, Tensor] = {}
    for i, (p, u) in enumerate(zip(params, updates)):
        if u is None:
            continue
        if not isinstance(u, Tensor):
            raise TypeError(
                f"fparams.update_module: the update for parameter {_param_name(module, i)!r} is a "
                f"{type(u).__name__}; updates must be tensors (or None to skip)."
            )
        if u.shape != p.shape:
            raise ValueError(
                f"fparams.update_module: the update for parameter {_param_name(module, i)!r} has shape "
                f"{tuple(u.shape)} but the parameter has shape {tuple(p.shape)}."
            )
        found[id(p)] = u
    return found


def _param_name(module: nn.Module, i: int) -> str:
    # Names only for error messages: building one per parameter on every
    # update would cost more than the checks themselves.
    return list(module.named_parameters())[i][0]


def _add_update_attr(name: str, t: Tensor) -> Tensor:
    u = getattr(t, "update", None)
    if u is None:
        return t
    # Consumed, as learn2learn does: a tensor that another module also holds
    # (a shared buffer, a weight tied across modules) is never updated twice,
    # and the update's graph is not kept alive by the old tensor.
    t.update = None  # type: ignore[attr-defined]
    return t + u


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
    refreshed. Returns the module.

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
    check_instance("fparams.update_module", "module", module, nn.Module, "a torch.nn.Module")
    if updates is None:
        rewrite(module, _add_update_attr, _add_update_attr, memo)
        return module
    if isinstance(updates, Tensor):
        raise TypeError(
            "fparams.update_module: `updates` must be a list with one tensor per parameter; "
            "got a single tensor. Wrap it in a list: updates=[u]."
        )
    modules = tree(module)
    found = _check_updates(module, unique_params(modules), list(updates))
    check_double_backward(found.values(), "user")  # arch: a second-order step needs a double backward

    def param(name: str, t: Tensor) -> Tensor:
        u = found.get(id(t))
        return t if u is None else t + u

    rewrite(module, param, _add_update_attr, memo, modules)
    return module


def _check_module(where: str, module: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: `model` must be a torch.nn.Module; got {type(module).__name__}.")


def _check_list(where: str, name: str, values: object, count: int) -> List[Any]:
    if isinstance(values, Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(
            f"{where}: `{name}` must be a list with one entry per tensor of model.parameters(); "
            f"got {type(values).__name__}."
        )
    if len(values) != count:
        raise ValueError(
            f"{where}: got {len(values)} {name} for {count} parameters; give one per tensor of "
            f"model.parameters(), in that order (learn2learn prints a warning and truncates)."
        )
    return list(values)


def maml_update(model: nn.Module, lr: Any, grads: Optional[Sequence[Optional[Tensor]]] = None) -> nn.Module:
    """learn2learn's MAML step on a module, in place: ``p - lr * g``, keeping the graph.

    ``grads`` has one tensor (or ``None``, to skip) per tensor of
    ``model.parameters()``; ``lr`` is a number or a tensor (a learned rate).
    With ``grads=None`` the ``.update`` attributes learn2learn's API places on
    the tensors are applied instead (as :func:`update_module` does). Returns
    ``model``; tied parameters stay tied, RNN flat weights are refreshed.

    Raises:
        ValueError: the number of gradients differs from the number of
            parameters (learn2learn prints a warning and truncates), or a
            gradient's shape differs from its parameter's.
        TypeError: ``grads`` is not a list, or an entry is neither a tensor nor ``None``.

    Examples:
        >>> import torch, fparams
        >>> model = fparams.clone_module(torch.nn.Linear(3, 1))
        >>> loss = model(torch.randn(4, 3)).pow(2).mean()
        >>> grads = torch.autograd.grad(loss, model.parameters(), create_graph=True)
        >>> model = fparams.maml_update(model, lr=0.1, grads=grads)
        >>> model.weight.grad_fn is not None
        True
    """
    where = "fparams.maml_update"
    _check_module(where, model)
    if grads is None:
        return update_module(model)
    grads = _check_list(where, "grads", grads, len(unique_params(tree(model))))
    return _update(where, model, [None if g is None else -lr * g for g in grads])


def meta_sgd_update(
    model: nn.Module,
    lrs: Optional[Sequence[Any]] = None,
    grads: Optional[Sequence[Optional[Tensor]]] = None,
) -> nn.Module:
    """learn2learn's Meta-SGD step on a module, in place: ``p - lr_p * g_p``, keeping the graph.

    ``lrs`` and ``grads`` each hold one entry per tensor of
    ``model.parameters()`` (a rate tensor of the parameter's shape, or a
    number; a gradient, or ``None`` to skip). Returns ``model``.

    learn2learn also accepts ``lrs=None, grads=None`` and then reads ``.grad``
    and an ``._lr`` attribute it stashed on the parameters earlier; fparams
    keeps no state on tensors, so both are required.

    Raises:
        ValueError: ``lrs`` or ``grads`` is missing, or their length differs
            from the number of parameters.
        TypeError: ``lrs`` or ``grads`` is not a list.

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
    where = "fparams.meta_sgd_update"
    _check_module(where, model)
    if lrs is None or grads is None:
        missing = [name for name, v in (("lrs", lrs), ("grads", grads)) if v is None]
        raise ValueError(
            f"{where}: {' and '.join(f'`{m}`' for m in missing)} missing; give one learning rate and "
            f"one gradient per tensor of model.parameters() (learn2learn reads them from attributes "
            f"stashed on the tensors, which fparams does not keep)."
        )
    count = len(unique_params(tree(model)))
    rates = _check_list(where, "lrs", lrs, count)
    grads = _check_list(where, "grads", grads, count)
    return _update(where, model, [None if g is None else -lr * g for lr, g in zip(rates, grads)])


def _update(where: str, model: nn.Module, updates: List[Optional[Tensor]]) -> nn.Module:
    # update_module's checks, worded for the caller
    try:
        return update_module(model, updates=updates)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("update_module:", f"{where}:", 1)) from None


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
        raise TypeError(
            f"fparams.clone_parameters: `param_list` must be a list of tensors (e.g. "
            f"list(model.parameters())); got {type(param_list).__name__}."
        )
    values = list(param_list)
    for i, p in enumerate(values):
        if not isinstance(p, Tensor):
            raise TypeError(
                f"fparams.clone_parameters: `param_list[{i}]` is a {type(p).__name__}, not a tensor."
            )
    return [p.clone() for p in values]


def clone_named_parameters(param_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """learn2learn's ``clone_named_parameters``: ``{k: p.clone()}``, still in the graph.

    Examples:
        >>> import torch, fparams
        >>> net = torch.nn.Linear(2, 1)
        >>> sorted(fparams.clone_named_parameters(dict(net.named_parameters())))
        ['bias', 'weight']
    """
    if not isinstance(param_dict, Mapping):
        raise TypeError(
            f"fparams.clone_named_parameters: `param_dict` must be a dict of tensors (e.g. "
            f"dict(model.named_parameters())); got {type(param_dict).__name__}."
        )
    bad = sorted(str(k) for k, p in param_dict.items() if not isinstance(p, Tensor))
    if bad:
        raise TypeError(f"fparams.clone_named_parameters: the values for {bad} are not tensors.")
    return {k: p.clone() for k, p in param_dict.items()}


# -- distributions ---------------------------------------------------------

_Memo = Dict[int, Tuple[Any, Any]]


def _clone_value(value: Any, memo: _Memo) -> Any:
    hit = memo.get(id(value))
    if hit is not None and hit[0] is value:
        return hit[1]
    if isinstance(value, Tensor):
        new: Any = value.clone() if value.requires_grad else value
    elif isinstance(value, nn.Module):
        new = clone_module(value)
    elif isinstance(value, (Distribution, Transform)):
        new = value.__new__(type(value))
        new.__dict__ = {k: _clone_value(v, memo) for k, v in value.__dict__.items()}
    elif isinstance(value, (list, tuple)):
        new = type(value)(_clone_value(v, memo) for v in value)
    else:
        return value
    memo[id(value)] = (value, new)
    return new


def clone_distribution(dist: Distribution) -> Distribution:
    """A copy of a ``torch.distributions`` object that stays in the graph.

    Tensors that require grad are cloned; modules are cloned with
    :func:`clone_module`; nested distributions and transforms (and lists of
    them) are cloned recursively. The original is not changed.

    Examples:
        >>> import torch, fparams
        >>> loc = torch.zeros(2, requires_grad=True)
        >>> d = fparams.clone_distribution(torch.distributions.Normal(loc, 1.0))
        >>> d.log_prob(torch.ones(2)).sum().backward(); loc.grad
        tensor([1., 1.])
    """
    check_instance("fparams.clone_distribution", "dist", dist, Distribution, _A_DISTRIBUTION)
    return _clone_value(dist, {})


def _detach_value(value: Any, seen: Dict[int, Any]) -> Any:
    if isinstance(value, Tensor):
        return value.detach() if value.requires_grad else value
    if id(value) in seen:
        return value
    if isinstance(value, nn.Module):
        seen[id(value)] = value
        detach_module(value)
    elif isinstance(value, (Distribution, Transform)):
        seen[id(value)] = value
        for k, v in list(value.__dict__.items()):
            value.__dict__[k] = _detach_value(v, seen)
    elif isinstance(value, (list, tuple)):
        return type(value)(_detach_value(v, seen) for v in value)
    return value


def detach_distribution(dist: Distribution) -> Distribution:
    """Detach a ``torch.distributions`` object from the graph, in place.

    Tensors that require grad are replaced by detached ones, modules are
    detached with :func:`detach_module` (and kept), nested distributions and
    transforms are detached recursively. Returns ``dist``.

    Examples:
        >>> import torch, fparams
        >>> loc = torch.zeros(2, requires_grad=True)
        >>> d = fparams.detach_distribution(torch.distributions.Normal(loc * 2, 1.0))
        >>> d.loc.requires_grad
        False
    """
    check_instance("fparams.detach_distribution", "dist", dist, Distribution, _A_DISTRIBUTION)
    return _detach_value(dist, {})
