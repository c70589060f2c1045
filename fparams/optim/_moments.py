"""Momentum, Adam and RMSprop as composable transforms (``torch.optim``'s formulas).

Each keeps a step count per parameter (torch's ``state["step"]``), so a
parameter that gets its first gradient late is bias-corrected as torch does it.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._checks import check_betas, check_flag
from .._errors import public
from ._base import (
    GradientTransformation,
    Schedule,
    Scheduled,
    at,
    bias_correction,
    ema,
    ema_square,
    hyper,
    is_nonzero,
    safe_sqrt,
    state_repr,
)
from ._transforms import PerParam


class TraceState(NamedTuple):
    """State of :func:`trace`: the step counts and the momentum buffers, per name."""

    step: Dict[str, Tensor]
    trace: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: step counts, first and second moments, per name.

    ``nu_max`` is the running maximum of ``nu`` with ``amsgrad=True`` and an
    empty dict otherwise.
    """

    step: Dict[str, Tensor]
    mu: Dict[str, Tensor]
    nu: Dict[str, Tensor]
    nu_max: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: step counts, the mean square and (``centered``) the mean gradient.

    ``mu`` is an empty dict unless ``centered=True``.
    """

    step: Dict[str, Tensor]
    nu: Dict[str, Tensor]
    mu: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


# -- momentum, Adam, RMSprop ---------------------------------------------------------


class _Trace(PerParam):
    name = "trace"
    state_type = TraceState

    def __init__(self, momentum: Any, dampening: Any, nesterov: bool) -> None:
        extra: Dict[str, object] = {"dampening": dampening} if is_nonzero(dampening) else {}
        extra.update({"nesterov": True} if nesterov else {})
        super().__init__(momentum=momentum, **extra)
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        # torch ignores dampening without momentum; with no dampening a zero buffer gives torch's first step
        self.passthrough = not is_nonzero(momentum)
        self.first_step_rule = is_nonzero(dampening)

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        return (torch.zeros_like(p),)

    def scalars(self, step: Tensor) -> Any:
        first = step == 1 if self.first_step_rule else None
        return at(self.momentum, step - 1), at(self.dampening, step - 1), first

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        if self.passthrough:
            return g, (g,)
        momentum, dampening, first = sc
        b = momentum * slots[0] + (1 - dampening) * g
        if first is not None:
            b = torch.where(first, g, b)
        return (g + momentum * b if self.nesterov else b), (b,)


@public("optim.trace")
def trace(momentum: Scheduled, dampening: Scheduled = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Momentum as in ``torch.optim.SGD``: ``b = momentum * b + (1 - dampening) * g``.

    On a parameter's first step the buffer is ``g`` itself (torch's rule,
    which ignores ``dampening`` then). The update is ``b``, or
    ``g + momentum * b`` with ``nesterov=True``. With ``momentum`` the number 0
    the update is ``g``, as torch.optim's, and the buffer holds ``g``.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.trace(0.5)
        >>> g, state = {"w": torch.ones(1)}, opt.init({"w": torch.zeros(1)})
        >>> u, state = opt.update(g, state)
        >>> opt.update(g, state)[0]
        {'w': tensor([1.5000])}
    """
    return make_trace(momentum, dampening, nesterov).as_transformation()


class _ScaleByAdam(PerParam):
    name = "scale_by_adam"
    state_type = ScaleByAdamState

    def __init__(self, betas: Tuple[Any, Any], eps: Any, amsgrad: bool, eps_before_correction: bool) -> None:
        extra: Dict[str, object] = {"amsgrad": True} if amsgrad else {}
        extra.update({"eps_before_correction": True} if eps_before_correction else {})
        super().__init__(betas=tuple(betas), eps=eps, **extra)
        self.beta1, self.beta2 = betas
        self.eps, self.amsgrad, self.early_eps = eps, amsgrad, eps_before_correction

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        return torch.zeros_like(p), torch.zeros_like(p), (torch.zeros_like(p) if self.amsgrad else None)

    def scalars(self, step: Tensor) -> Any:
        t = step - 1
        beta1, beta2, eps = at(self.beta1, t), at(self.beta2, t), at(self.eps, t)
        return beta1, beta2, eps, bias_correction(beta1, step), bias_correction(beta2, step).sqrt()

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        beta1, beta2, eps, c1, c2_sqrt = sc
        m, v = ema(slots[0], g, beta1), ema_square(slots[1], g, beta2)
        v_max = torch.maximum(slots[2], v) if self.amsgrad else None
        denom_v = v_max if v_max is not None else v
        if self.early_eps:
            return (c2_sqrt / c1) * m / (safe_sqrt(denom_v) + eps), (m, v, v_max)
        return (m / c1) / (safe_sqrt(denom_v) / c2_sqrt + eps), (m, v, v_max)


@public("optim.scale_by_adam")
def scale_by_adam(
    betas: Tuple[Scheduled, Scheduled] = (0.9, 0.999),
    eps: Scheduled = 1e-8,
    amsgrad: bool = False,
    *,
    eps_before_correction: bool = False,
) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)``, bias-corrected as in ``torch.optim.Adam``.

    ``m`` and ``v`` are running averages of ``g`` and ``g * g`` with decays
    ``betas``. With ``amsgrad=True`` the running maximum of ``v`` is used. The
    square root's gradient is 0 where ``v`` is 0, so parameters that never got
    a gradient do not turn meta-gradients into NaN. With
    ``eps_before_correction=True`` it is ``m_hat / ((sqrt(v) + eps) / sqrt(1 - beta2**t))``,
    the formula of torch before 1.6 and of higher 0.2.1 (see
    :func:`fparams.optim.higher_adam`).

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.scale_by_adam()
        >>> u, state = opt.update({"w": torch.tensor([3.0, -0.5])}, opt.init({"w": torch.zeros(2)}))
        >>> u["w"]  # the first step is the sign of the gradient
        tensor([ 1.0000, -1.0000])
    """
    return make_adam(betas, eps, amsgrad, eps_before_correction).as_transformation()


def make_adam(betas: Any, eps: Any, amsgrad: bool, eps_before_correction: bool = False) -> _ScaleByAdam:
    """The checked :func:`scale_by_adam` transform (errors name the public caller)."""
    betas = check_betas_schedules(betas)
    check_flag("amsgrad", amsgrad)
    return _ScaleByAdam(betas, hyper("eps", eps), amsgrad, eps_before_correction)


def check_betas_schedules(betas: Any) -> Tuple[Any, Any]:
    """A pair of betas in [0, 1), each a number, a tensor or a schedule."""
    if (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and not any(isinstance(b, (tuple, list, Schedule)) or callable(b) for b in betas)
    ):
        return check_betas(betas)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        return check_betas(betas)  # raises the pair error
    return hyper("betas[0]", betas[0], 1.0), hyper("betas[1]", betas[1], 1.0)


class _ScaleByRms(PerParam):
    name = "scale_by_rms"
    state_type = ScaleByRmsState

    def __init__(self, alpha: Any, eps: Any, centered: bool) -> None:
        super().__init__(alpha=alpha, eps=eps, **({"centered": True} if centered else {}))
        self.alpha, self.eps, self.centered = alpha, eps, centered

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        return torch.zeros_like(p), (torch.zeros_like(p) if self.centered else None)

    def scalars(self, step: Tensor) -> Any:
        return at(self.alpha, step - 1), at(self.eps, step - 1)

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        alpha, eps = sc
        v = ema_square(slots[0], g, alpha)
        if not self.centered:
            return g / (safe_sqrt(v) + eps), (v, None)
        m = ema(slots[1], g, alpha)
        return g / (safe_sqrt(v - m * m) + eps), (v, m)


@public("optim.scale_by_rms")
def scale_by_rms(
    alpha: Scheduled = 0.99, eps: Scheduled = 1e-8, centered: bool = False
) -> GradientTransformation:
    """RMSprop's direction ``g / (sqrt(v) + eps)`` as in ``torch.optim.RMSprop``.

    ``v`` is a running average of ``g * g`` with decay ``alpha``; with
    ``centered=True`` the square of the running mean gradient is subtracted
    from it first. ``eps`` is added outside the square root (torch's rule, not
    optax's).

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.scale_by_rms(alpha=0.75, eps=0.0)
        >>> opt.update({"w": torch.tensor([2.0])}, opt.init({"w": torch.zeros(1)}))[0]
        {'w': tensor([2.])}
    """
    return make_rms(alpha, eps, centered).as_transformation()


def make_rms(alpha: Any, eps: Any, centered: bool) -> _ScaleByRms:
    """The checked :func:`scale_by_rms` transform."""
    check_flag("centered", centered)
    return _ScaleByRms(hyper("alpha", alpha, 1.0, True), hyper("eps", eps), centered)


def make_trace(momentum: Any, dampening: Any = 0.0, nesterov: bool = False) -> _Trace:
    """The checked :func:`trace` transform."""
    check_flag("nesterov", nesterov)
    return _Trace(hyper("momentum", momentum), hyper("dampening", dampening, 1.0, True), nesterov)
