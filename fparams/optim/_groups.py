"""Per-group optimizers (torch's param groups) and gradient clipping, as transforms.

:func:`multi_transform` (optax's name) applies a different transformation to
each group of parameters, :func:`partition` to the parameters a filter selects
and to the rest; :func:`clip_grad_norm` and :func:`clip_grad_value` are
``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` over the gradients given.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .._checks import check_hyper
from .._errors import FparamsTypeError, FparamsValueError, public
from .._types import TensorDict, Updates
from ._base import EmptyState, GradientTransformation, Hyper, OptState, Transform, check_grads, state_repr
from ._transforms import _check_parts

#: How parameters are given their group: a dict name -> label, or a callable of the name.
Labels = Union[Mapping[str, str], Callable[[str], str]]


class MultiTransformState(NamedTuple):
    """State of :func:`multi_transform`: one inner state per group label."""

    inner: Dict[str, Any]

    def __repr__(self) -> str:
        return state_repr(self)


class _MultiTransform(Transform):
    name = "multi_transform"

    def __init__(self, transforms: Dict[str, GradientTransformation], labels: Labels, text: str) -> None:
        super().__init__()
        self.transforms, self.labels, self.text = transforms, labels, text
        self._routes: Dict[Tuple[str, ...], Dict[str, List[str]]] = {}

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_routes": {}}

    def _route(self, names: Tuple[str, ...]) -> Dict[str, List[str]]:
        route = self._routes.get(names)  # decided once per set of names: no per-step matching
        if route is None:
            route = {label: [] for label in self.transforms}
            for k in names:
                label = self.labels.get(k) if isinstance(self.labels, Mapping) else self.labels(k)
                if label not in route:
                    raise FparamsValueError(
                        f"parameter {k!r} has the label {label!r}, which has no transformation; the labels "
                        f"are {sorted(self.transforms)}. Give every parameter one of them."
                    )
                route[label].append(k)
            self._routes[names] = route
        return route

    def _init(self, params: TensorDict) -> OptState:
        route = self._route(tuple(params))
        inner = {lab: t.init({k: params[k] for k in route[lab]}) for lab, t in self.transforms.items()}
        return MultiTransformState(inner)

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:
        self.check_state(state, MultiTransformState)
        check_grads(grads, params)
        route = self._route(tuple(grads))
        updates: Dict[str, Tensor] = {}
        inner = dict(state.inner)
        for label, names in route.items():
            if names:
                sub = None if params is None else {k: params[k] for k in names}
                u, inner[label] = self.transforms[label].update(
                    {k: grads[k] for k in names}, inner[label], sub
                )
                updates.update(u)
        return {k: updates[k] for k in grads if k in updates}, MultiTransformState(inner)

    def __repr__(self) -> str:
        return self.text


@public("optim.multi_transform")
def multi_transform(
    transforms: Mapping[str, GradientTransformation], labels: Labels
) -> GradientTransformation:
    """A transformation per group of parameters (torch's param groups, optax's ``multi_transform``).

    ``labels`` gives each parameter name its group: a dict, or a callable of the
    name. Each group's transformation sees only its own parameters.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.multi_transform(
        ...     {"body": optim.sgd(0.1), "head": optim.adam(0.01)},
        ...     lambda name: "head" if name.startswith("head") else "body",
        ... )
        >>> params = {"body.w": torch.ones(2), "head.w": torch.ones(2)}
        >>> updates, state = opt.update({k: torch.ones(2) for k in params}, opt.init(params), params)
        >>> updates["body.w"], updates["head.w"]
        (tensor([-0.1000, -0.1000]), tensor([-0.0100, -0.0100]))
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise FparamsTypeError(
            f"`transforms` must be a non-empty dict label -> transformation; got {type(transforms).__name__}."
        )
    _check_parts(tuple(transforms.values()))
    if not (isinstance(labels, Mapping) or callable(labels)):
        raise FparamsTypeError(
            "`labels` must be a dict name -> label or a callable fn(name) -> label; got "
            f"{type(labels).__name__}."
        )
    text = "multi_transform({" + ", ".join(f"{k!r}: {t!r}" for k, t in transforms.items()) + "})"
    return _MultiTransform(dict(transforms), labels, text).as_transformation()


class _FilterLabels:
    """``"selected"`` for the names a filter (glob, regex, list, fn(name)) picks, else ``"rest"``."""

    def __init__(self, filter: Any) -> None:
        if isinstance(filter, (str, re.Pattern)):
            filter = [filter]
        if not callable(filter):
            if not isinstance(filter, (list, tuple, set)):
                raise FparamsTypeError(
                    "`filter` must be a glob string, a compiled regex, a list of those or a callable "
                    f"fn(name) -> bool; got {type(filter).__name__}."
                )
            filter = list(filter)
            for item in filter:
                if not isinstance(item, (str, re.Pattern)):
                    raise FparamsTypeError(
                        "`filter` must be a glob string, a compiled regex, a list of those or a callable "
                        f"fn(name) -> bool; got an entry {item!r}."
                    )
        self.filter = filter

    def __call__(self, name: str) -> str:
        if callable(self.filter):
            return "selected" if self.filter(name) else "rest"
        hit = any(
            (fnmatch.fnmatchcase(name, p) or name == p) if isinstance(p, str) else p.search(name) is not None
            for p in self.filter
        )
        return "selected" if hit else "rest"


@public("optim.partition")
def partition(
    filter: Any, selected: GradientTransformation, rest: GradientTransformation
) -> GradientTransformation:
    """``selected`` for the parameters ``filter`` picks, ``rest`` for the others (two param groups).

    ``filter`` is a glob (``"head.*"``), a compiled regex, a list of those, or a
    callable ``fn(name) -> bool``.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.partition("*.bias", optim.sgd(0.1), optim.sgd(0.1, weight_decay=0.5))
        >>> params = {"l.weight": torch.ones(1), "l.bias": torch.ones(1)}
        >>> opt.update({k: torch.ones(1) for k in params}, opt.init(params), params)[0]
        {'l.weight': tensor([-0.1500]), 'l.bias': tensor([-0.1000])}
    """
    _check_parts((selected, rest))
    text = f"partition({filter!r}, {selected!r}, {rest!r})"
    return _MultiTransform(
        {"selected": selected, "rest": rest}, _FilterLabels(filter), text
    ).as_transformation()


class _ClipGradNorm(Transform):
    name = "clip_grad_norm"

    def __init__(self, max_norm: Hyper, norm_type: float) -> None:
        super().__init__(max_norm=max_norm, **({} if norm_type == 2.0 else {"norm_type": norm_type}))
        self.max_norm, self.norm_type = max_norm, norm_type

    def _init(self, params: TensorDict) -> OptState:
        return EmptyState()

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:
        self.check_state(state, EmptyState)
        if not grads:
            return {}, state
        norms = torch.stack([torch.linalg.vector_norm(g, self.norm_type) for g in grads.values()])
        total = torch.linalg.vector_norm(norms, self.norm_type)
        coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
        return {k: g * coef.to(g.dtype) for k, g in grads.items()}, state


@public("optim.clip_grad_norm")
def clip_grad_norm(max_norm: Hyper, norm_type: float = 2.0) -> GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale all gradients by ``min(1, max_norm / (total + 1e-6))``.

    The total norm is over the gradients given (as torch's over the params with
    a ``.grad``); ``norm_type`` may be ``float("inf")``.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.clip_grad_norm(1.0)
        >>> opt.update({"w": torch.tensor([3.0, 4.0])}, opt.init({"w": torch.zeros(2)}))[0]
        {'w': tensor([0.6000, 0.8000])}
    """
    check_hyper("max_norm", max_norm)
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
        raise FparamsValueError(f"`norm_type` must be a number > 0 or float('inf'); got {norm_type!r}.")
    return _ClipGradNorm(max_norm, float(norm_type)).as_transformation()


class _ClipGradValue(Transform):
    name = "clip_grad_value"

    def __init__(self, clip_value: float) -> None:
        super().__init__(clip_value=clip_value)
        self.clip_value = clip_value

    def _init(self, params: TensorDict) -> OptState:
        return EmptyState()

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:
        self.check_state(state, EmptyState)
        v = self.clip_value
        return {k: g.clamp(-v, v) for k, g in grads.items()}, state


@public("optim.clip_grad_value")
def clip_grad_value(clip_value: float) -> GradientTransformation:
    """``torch.nn.utils.clip_grad_value_``: clamp each gradient entry to ``[-clip_value, clip_value]``.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.clip_grad_value(0.5)
        >>> opt.update({"w": torch.tensor([3.0, -0.1])}, opt.init({"w": torch.zeros(2)}))[0]
        {'w': tensor([ 0.5000, -0.1000])}
    """
    if (
        isinstance(clip_value, bool)
        or not isinstance(clip_value, (int, float))
        or not math.isfinite(clip_value)
    ):
        raise FparamsTypeError(f"`clip_value` must be a finite number; got {clip_value!r}.")
    if clip_value < 0:
        raise FparamsValueError(f"`clip_value` must be >= 0; got {clip_value!r}.")
    return _ClipGradValue(float(clip_value)).as_transformation()


class _MapGrads(Transform):
    name = "map_grads"

    def __init__(self, fn: Callable[[Dict[str, Tensor]], Mapping[str, Tensor]]) -> None:
        super().__init__(fn=getattr(fn, "__name__", type(fn).__name__))
        self.fn = fn

    def _init(self, params: TensorDict) -> OptState:
        return EmptyState()

    def _update(
        self, grads: TensorDict, state: Any, params: Optional[TensorDict]
    ) -> Tuple[Updates, OptState]:
        self.check_state(state, EmptyState)
        out = self.fn(dict(grads))
        if not isinstance(out, Mapping):
            raise FparamsTypeError(f"`fn` must return a dict of gradients by name; got {type(out).__name__}.")
        return dict(out), state


@public("optim.map_grads")
def map_grads(fn: Callable[[Dict[str, Tensor]], Mapping[str, Tensor]]) -> GradientTransformation:
    """Apply ``fn(grads) -> grads`` (a dict by name) before the next transform: higher's ``grad_callback``.

    ``fn`` must be differentiable where meta-gradients should flow through it,
    and a module-level function if the optimizer is to be pickled.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> def halve(grads):
        ...     return {k: g / 2 for k, g in grads.items()}
        >>> opt = optim.chain(optim.map_grads(halve), optim.sgd(1.0))
        >>> opt
        chain(map_grads(fn='halve'), sgd(lr=1.0))
        >>> opt.update({"w": torch.ones(1)}, opt.init({"w": torch.ones(1)}))[0]
        {'w': tensor([-0.5000])}
    """
    if not callable(fn):
        raise FparamsTypeError(f"`fn` must be a callable fn(grads) -> grads; got {type(fn).__name__}.")
    return _MapGrads(fn).as_transformation()
