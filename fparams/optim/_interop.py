"""torch.optim interop: the transformation of a torch optimizer, and states both ways.

:func:`from_torch` turns ``torch.optim.X(module.parameters(), ...)`` (every
param group with its hyperparameters) into the fparams transformation that
``fparams.split(module)``'s params take; :func:`to_torch_state` and
:func:`from_torch_state` convert states in ``Optimizer.state_dict()`` layout.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

from .._errors import FparamsTypeError, FparamsValueError, public
from ._alias import adam, adamw, higher_adam, rmsprop, sgd
from ._alias_torch import adadelta, adafactor, adagrad, adamax, asgd, nadam, radam, rprop
from ._base import CountState, GradientTransformation, OptState
from ._groups import MultiTransformState, multi_transform
from ._moments import ScaleByAdamState, ScaleByRmsState, TraceState

_ = higher_adam  # not a torch optimizer; kept importable here for the table in the docs

#: torch.optim class name -> fparams factory
FACTORIES: Dict[str, Callable[..., GradientTransformation]] = {
    "SGD": sgd, "Adam": adam, "AdamW": adamw, "RMSprop": rmsprop, "Adagrad": adagrad, "Adadelta": adadelta,
    "Adamax": adamax, "ASGD": asgd, "Rprop": rprop, "NAdam": nadam, "RAdam": radam, "Adafactor": adafactor,
}  # fmt: skip

#: group keys that change how torch computes, not what: ignored
_IGNORED = {"params", "foreach", "fused", "capturable", "differentiable", "initial_lr", "name"}

#: state fields whose torch.optim name differs (the newer rules use torch's names)
_TORCH_NAMES: Dict[type, Dict[str, str]] = {
    ScaleByAdamState: {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"},
    ScaleByRmsState: {"nu": "square_avg", "mu": "grad_avg"},
    TraceState: {"trace": "momentum_buffer"},
}


def _factory(optimizer: object) -> Callable[..., GradientTransformation]:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise FparamsTypeError(
            f"`optimizer` must be a torch.optim optimizer; got {type(optimizer).__name__}."
        )
    name = type(optimizer).__name__
    if name not in FACTORIES:
        raise FparamsValueError(
            f"`optimizer` is a {name}, which fparams.optim has no counterpart for; the supported ones are "
            f"{', '.join(sorted(FACTORIES))}."
        )
    return FACTORIES[name]


def _group_transformation(factory: Callable[..., GradientTransformation], group: Dict[str, Any]) -> Any:
    if factory in (adam, adamw) and group.get(
        "decoupled_weight_decay"
    ):  # torch's AdamW is Adam(decoupled=True)
        factory, group = adamw, {k: v for k, v in group.items() if k != "decoupled_weight_decay"}
    accepted = inspect.signature(factory).parameters
    kwargs = {}
    for key, value in group.items():
        if key in accepted:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key not in _IGNORED and value:
            raise FparamsValueError(
                f"the param group option {key}={value!r} of torch.optim has no fparams.optim counterpart in "
                f"{factory.__name__}; leave it at its default."
            )
    return factory(**kwargs)


def _names(module: object) -> Dict[int, str]:
    if not isinstance(module, nn.Module):
        raise FparamsTypeError(f"`module` must be an nn.Module; got {type(module).__name__}.")
    return {id(p): k for k, p in module.named_parameters()}


@public("optim.from_torch")
def from_torch(optimizer: torch.optim.Optimizer, module: nn.Module) -> GradientTransformation:
    """The fparams transformation of a torch optimizer, for ``fparams.split(module)``'s params.

    One param group gives that optimizer (``torch.optim.Adam(m.parameters(), lr=0.1)``
    -> ``adam(lr=0.1, ...)``); several give a :func:`multi_transform` with one
    transformation per group (labels ``"group0"``, ``"group1"`` ...). Params of
    ``module`` in no group are labelled ``"frozen"`` and get no update.

    Examples:
        >>> import torch, fparams.optim
        >>> net = torch.nn.Linear(2, 1)
        >>> fparams.optim.from_torch(torch.optim.Adagrad(net.parameters(), lr=0.1), net)
        adagrad(lr=0.1, eps=1e-10)
    """
    factory = _factory(optimizer)
    names = _names(module)
    labels: Dict[str, str] = {}
    transforms: Dict[str, Any] = {}
    for i, group in enumerate(optimizer.param_groups):
        transforms[f"group{i}"] = _group_transformation(factory, group)
        for p in group["params"]:
            if id(p) not in names:
                raise FparamsValueError(
                    f"param group {i} of `optimizer` holds a tensor of shape {tuple(p.shape)} that is not a "
                    f"parameter of `module`; build the optimizer from module.parameters()."
                )
            labels[names[id(p)]] = f"group{i}"
    if len(transforms) == 1 and len(labels) == len(names):
        only: GradientTransformation = transforms["group0"]
        return only
    if len(labels) < len(names):
        transforms["frozen"] = _Frozen().as_transformation()
    return multi_transform(transforms, {k: labels.get(k, "frozen") for k in names.values()})


from ._transforms import Stateless  # noqa: E402 - after the public functions it serves


class _Frozen(Stateless):
    """No update for any parameter (torch's params outside every group)."""

    name = "frozen"

    def _update(self, grads: Any, state: Any, params: Any) -> Tuple[Dict[str, Tensor], OptState]:
        return {}, state


# -- states in torch's state_dict layout ---------------------------------------------------


def _rules(state: Any) -> List[Any]:
    """Every per-parameter state (one with a ``step`` dict) inside a (nested) optimizer state."""
    if isinstance(state, MultiTransformState):
        return [r for inner in state.inner.values() for r in _rules(inner)]
    if _is_rule(state):
        return [state]
    if isinstance(state, tuple):
        return [r for s in state for r in _rules(s)]
    return []


def _is_rule(state: Any) -> bool:
    return getattr(state, "_fields", ())[:1] == ("step",) and not isinstance(state, CountState)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _param_state(rules: List[Any], name: str) -> Dict[str, Tensor]:
    entry: Dict[str, Tensor] = {}
    for rule in rules:
        if name not in rule.step or int(rule.step[name]) == 0:
            continue
        rename = _TORCH_NAMES.get(type(rule), {})
        for field in rule._fields[1:]:
            values = getattr(rule, field)
            if name in values:
                value = values[name].detach().clone()
                entry[rename.get(field, field)] = value.to(_scalar_dtype()) if value.dim() == 0 else value
        if type(rule) is not TraceState:  # torch's SGD keeps no step
            entry["step"] = rule.step[name].detach().to(_scalar_dtype())
    return entry


@public("optim.to_torch_state")
def to_torch_state(state: OptState, optimizer: torch.optim.Optimizer, module: nn.Module) -> Dict[str, Any]:
    """An fparams state as ``optimizer.state_dict()`` (load it with ``optimizer.load_state_dict``).

    ``state`` belongs to ``from_torch(optimizer, module)``; params that have
    taken no step have no entry, as in torch.

    Examples:
        >>> import torch, fparams, fparams.optim
        >>> net = torch.nn.Linear(2, 1)
        >>> torch_opt = torch.optim.Adam(net.parameters(), lr=0.1)
        >>> opt = fparams.optim.from_torch(torch_opt, net)
        >>> params = fparams.split(net)[1]
        >>> grads = {k: torch.ones_like(p) for k, p in params.items()}
        >>> _, state = opt.update(grads, opt.init(params), params)
        >>> torch_opt.load_state_dict(fparams.optim.to_torch_state(state, torch_opt, net))
        >>> sorted(torch_opt.state[net.weight])
        ['exp_avg', 'exp_avg_sq', 'step']
    """
    _factory(optimizer)
    names = _names(module)
    rules = _rules(state)
    saved = optimizer.state_dict()
    out: Dict[int, Dict[str, Tensor]] = {}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _param_state(rules, names[id(p)])
            if entry:
                out[index] = entry
            index += 1
    return {"state": out, "param_groups": saved["param_groups"]}


@public("optim.from_torch_state")
def from_torch_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> OptState:
    """The fparams state of ``from_torch(optimizer, module)`` holding ``optimizer.state`` (copied).

    Examples:
        >>> import torch, fparams, fparams.optim
        >>> net = torch.nn.Linear(2, 1)
        >>> torch_opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> net(torch.ones(1, 2)).sum().backward(); torch_opt.step()
        >>> state = fparams.optim.from_torch_state(torch_opt, net)
        >>> state.momentum.trace["bias"]
        tensor([1.])
    """
    opt = from_torch(optimizer, module)
    names = _names(module)
    params = dict(module.named_parameters())
    by_name = {names[id(p)]: s for p, s in optimizer.state.items() if id(p) in names}
    return _fill(opt.init({k: p.detach() for k, p in params.items()}), by_name)


def _fill(state: Any, by_name: Dict[str, Dict[str, Any]]) -> Any:
    if isinstance(state, MultiTransformState):
        return MultiTransformState({k: _fill(s, by_name) for k, s in state.inner.items()})
    if _is_rule(state):
        rename = _TORCH_NAMES.get(type(state), {})
        fields: Dict[str, Dict[str, Tensor]] = {f: dict(getattr(state, f)) for f in state._fields}
        for name, entry in by_name.items():
            if name not in fields["step"]:
                continue
            for f in state._fields[1:]:
                value = entry.get(rename.get(f, f))
                if isinstance(value, Tensor) and (name in fields[f] or f == "nu_max"):
                    old = fields[f].get(name)
                    fields[f][name] = value.detach().clone().to(old.dtype if old is not None else value.dtype)
            step = entry.get("step", 1 if entry else 0)
            fields["step"][name] = torch.as_tensor(step).detach().to(torch.int64).reshape(())
        return type(state)(**fields)
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(_fill(s, by_name) for s in state))
    if isinstance(state, tuple):
        return tuple(_fill(s, by_name) for s in state)
    return state
