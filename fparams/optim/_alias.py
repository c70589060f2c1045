"""The named optimizers, with ``torch.optim``'s hyperparameter names and defaults.

Each is a :func:`named_chain` of the small transforms in ``_transforms.py``,
with a state of fixed fields (:class:`AdamState` ...): a transform that a
hyperparameter switches off stays in its place as :func:`identity`, so
``state.adam.mu`` always means the same, whatever the hyperparameters. Every
hyperparameter may be a tensor that requires grad (a learned learning rate,
momentum or beta); numbers are checked here, tensors are used as they are.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Tuple

from torch import Tensor

from .._checks import check_flag
from .._errors import FparamsValueError, public
from ._base import (
    EmptyState,
    GradientTransformation,
    Rate,
    Scheduled,
    format_call,
    is_nonzero,
    state_repr,
)
from ._moments import ScaleByAdamState, ScaleByRmsState, TraceState, make_adam, make_rms, make_trace
from ._transforms import build_named, make_decay, make_lr


class SgdState(NamedTuple):
    """State of :func:`sgd`. ``momentum`` is kept (holding the last gradient) even at momentum 0.

    Examples:
        >>> import torch, fparams.optim
        >>> fparams.optim.sgd(0.1).init({"w": torch.zeros(2)}).momentum.trace
        {'w': tensor([0., 0.])}
    """

    weight_decay: EmptyState
    momentum: TraceState
    lr: EmptyState

    def __repr__(self) -> str:
        return state_repr(self)


class AdamState(NamedTuple):
    """State of :func:`adam`: ``state.adam.mu``, ``state.adam.nu``, ``state.adam.step`` ...

    Examples:
        >>> import torch, fparams.optim
        >>> fparams.optim.adam(0.1).init({"w": torch.zeros(2)})
        AdamState(weight_decay=EmptyState(), adam=ScaleByAdamState(step={'w': 0}, mu={'w': float32[2]}, \
nu={'w': float32[2]}, nu_max={}), lr=EmptyState())
    """

    weight_decay: EmptyState
    adam: ScaleByAdamState
    lr: EmptyState

    def __repr__(self) -> str:
        return state_repr(self)


class AdamWState(NamedTuple):
    """State of :func:`adamw` (the decay comes after Adam's direction).

    Examples:
        >>> import torch, fparams.optim
        >>> fparams.optim.adamw(0.1).init({"w": torch.zeros(2)})._fields
        ('adam', 'weight_decay', 'lr')
    """

    adam: ScaleByAdamState
    weight_decay: EmptyState
    lr: EmptyState

    def __repr__(self) -> str:
        return state_repr(self)


class RmspropState(NamedTuple):
    """State of :func:`rmsprop`: ``state.rms.nu``, and ``state.momentum.trace``.

    Examples:
        >>> import torch, fparams.optim
        >>> fparams.optim.rmsprop().init({"w": torch.zeros(2)}).rms
        ScaleByRmsState(step={'w': 0}, nu={'w': float32[2]}, mu={})
    """

    weight_decay: EmptyState
    rms: ScaleByRmsState
    momentum: TraceState
    lr: EmptyState

    def __repr__(self) -> str:
        return state_repr(self)


def named(
    name: str,
    state_type: Any,
    parts: Dict[str, GradientTransformation],
    shown: Dict[str, Any],
    optional: Dict[str, Any],
    maximize: bool = False,
) -> GradientTransformation:
    """A named chain that prints as its call: ``shown`` always, ``optional`` where not at its default."""
    check_flag("maximize", maximize)
    extra = {k: v for k, v in optional.items() if is_nonzero(v)}  # False, 0 and 0.0 are defaults
    extra.update({"maximize": True} if maximize else {})
    return build_named(state_type, parts, format_call(name, **shown, **extra), maximize)


@public("optim.sgd")
def sgd(
    lr: Rate = 1e-3,
    momentum: Scheduled = 0.0,
    dampening: Scheduled = 0.0,
    weight_decay: Scheduled = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.SGD`` as a pure update rule: weight decay, momentum, Nesterov.

    With ``momentum`` the number 0 the update is ``-lr * g``, and the state's
    momentum buffer holds the last gradient (the state has the same fields
    whatever the hyperparameters).

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.sgd(lr=0.1, momentum=0.9)
        >>> opt
        sgd(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     updates, state = opt.update({"w": torch.ones(2)}, state, params)
        ...     params = fparams.apply_updates(params, updates)
        >>> params
        {'w': tensor([0.7100, 0.7100])}
        >>> state.momentum
        TraceState(step={'w': 2}, trace={'w': float32[2]})
    """
    mom = make_trace(momentum, dampening, nesterov)
    if nesterov and not is_nonzero(mom.momentum):
        raise FparamsValueError(f"`nesterov=True` needs a `momentum` > 0; got momentum={momentum!r}.")
    if nesterov and not isinstance(mom.dampening, Tensor) and is_nonzero(mom.dampening):
        raise FparamsValueError(f"`nesterov=True` needs `dampening` == 0; got dampening={dampening!r}.")
    parts = dict(weight_decay=make_decay(weight_decay), momentum=mom.as_transformation(), lr=make_lr(lr))
    optional = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    return named("sgd", SgdState, parts, dict(lr=lr), optional, maximize)


@public("optim.adam")
def adam(
    lr: Rate = 1e-3,
    betas: Tuple[Scheduled, Scheduled] = (0.9, 0.999),
    eps: Scheduled = 1e-8,
    weight_decay: Scheduled = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adam`` as a pure update rule; ``weight_decay`` is L2 (added to the gradient).

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.adam(lr=0.1)
        >>> opt
        adam(lr=0.1, betas=(0.9, 0.999), eps=1e-08)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([4.0, -0.1])}, opt.init(params), params)
        >>> fparams.apply_updates(params, updates)
        {'w': tensor([ 0.9000, -0.9000])}
        >>> state.adam.mu
        {'w': tensor([ 0.4000, -0.0100])}
    """
    direction = make_adam(betas, eps, amsgrad).as_transformation()
    parts = dict(weight_decay=make_decay(weight_decay), adam=direction, lr=make_lr(lr))
    shown = dict(lr=lr, betas=tuple(betas), eps=eps)
    return named("adam", AdamState, parts, shown, dict(weight_decay=weight_decay, amsgrad=amsgrad), maximize)


@public("optim.adamw")
def adamw(
    lr: Rate = 1e-3,
    betas: Tuple[Scheduled, Scheduled] = (0.9, 0.999),
    eps: Scheduled = 1e-8,
    weight_decay: Scheduled = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.AdamW``: Adam with decoupled weight decay ``-lr * weight_decay * p``.

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.adamw(lr=0.1, weight_decay=0.5)
        >>> params = {"w": torch.tensor([2.0])}
        >>> updates, state = opt.update({"w": torch.tensor([3.0])}, opt.init(params), params)
        >>> fparams.apply_updates(params, updates)  # 2 - 0.1 * (1 + 0.5 * 2)
        {'w': tensor([1.8000])}
    """
    direction = make_adam(betas, eps, amsgrad).as_transformation()
    parts = dict(adam=direction, weight_decay=make_decay(weight_decay), lr=make_lr(lr))
    shown = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    return named("adamw", AdamWState, parts, shown, dict(amsgrad=amsgrad), maximize)


@public("optim.rmsprop")
def rmsprop(
    lr: Rate = 1e-2,
    alpha: Scheduled = 0.99,
    eps: Scheduled = 1e-8,
    weight_decay: Scheduled = 0.0,
    momentum: Scheduled = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.RMSprop`` as a pure update rule: L2 weight decay, centering, momentum.

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.rmsprop(lr=0.01, alpha=0.0, eps=0.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([-5.0])}, opt.init(params), params)
        >>> fparams.apply_updates(params, updates)
        {'w': tensor([1.0100])}
    """
    parts = dict(
        weight_decay=make_decay(weight_decay),
        rms=make_rms(alpha, eps, centered).as_transformation(),
        momentum=make_trace(momentum).as_transformation(),
        lr=make_lr(lr),
    )
    optional = dict(weight_decay=weight_decay, momentum=momentum, centered=centered)
    return named("rmsprop", RmspropState, parts, dict(lr=lr, alpha=alpha, eps=eps), optional, maximize)


@public("optim.higher_adam")
def higher_adam(
    lr: Rate = 1e-3,
    betas: Tuple[Scheduled, Scheduled] = (0.9, 0.999),
    eps: Scheduled = 1e-8,
    weight_decay: Scheduled = 0.0,
    amsgrad: bool = False,
) -> GradientTransformation:
    """Adam exactly as ``higher``'s differentiable Adam (higher 0.2.1, the release on PyPI).

    higher adds ``eps`` before the bias correction, the formula of torch
    before 1.6::

        p - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)

    that is ``m_hat / ((sqrt(v) + eps) / sqrt(1 - beta2**t))``, where
    :func:`adam` (``torch.optim.Adam`` today) computes ``m_hat / (sqrt(v_hat) + eps)``.
    Early on, ``eps`` is then effectively ``eps / sqrt(1 - beta2**t)``, about
    30x larger at step 1, which changes meta-gradients where ``v`` is small
    (BatchNorm, rarely used weights). Use it to reproduce results obtained with
    ``higher.innerloop_ctx`` and ``torch.optim.Adam``; ``weight_decay`` is L2
    (added to the gradient), and the square root's gradient is 0 where ``v``
    is 0, as higher's mask makes it. (higher's unreleased master branch has
    the torch >= 1.6 formula, which is :func:`adam`.)

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.higher_adam(lr=0.1, eps=0.1)
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([0.1])}, opt.init(params), params)
        >>> updates["w"]  # -0.1 * sqrt(0.001) / 0.1 * 0.01 / (sqrt(1e-5) + 0.1)
        tensor([-0.0031])
    """
    direction = make_adam(betas, eps, amsgrad, eps_before_correction=True).as_transformation()
    parts = dict(weight_decay=make_decay(weight_decay), adam=direction, lr=make_lr(lr))
    shown = dict(lr=lr, betas=tuple(betas), eps=eps)
    return named("higher_adam", AdamState, parts, shown, dict(weight_decay=weight_decay, amsgrad=amsgrad))
