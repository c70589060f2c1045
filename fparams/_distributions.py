"""learn2learn's distribution shims: ``clone_distribution`` and ``detach_distribution``.

A ``torch.distributions`` object is walked attribute by attribute: tensors that
require grad are cloned (or detached), modules go through the module shims,
nested distributions and transforms are walked in turn.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from torch import Tensor, nn
from torch.distributions import Distribution
from torch.distributions.transforms import Transform

from ._checks import check_instance
from ._errors import public
from ._module_api import clone_module, detach_module

_A_DISTRIBUTION = "a torch.distributions.Distribution"


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


@public("clone_distribution")
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
    check_instance("dist", dist, Distribution, _A_DISTRIBUTION)
    cloned: Distribution = _clone_value(dist, {})
    return cloned


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


@public("detach_distribution")
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
    check_instance("dist", dist, Distribution, _A_DISTRIBUTION)
    detached: Distribution = _detach_value(dist, {})
    return detached
