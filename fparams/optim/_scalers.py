"""The per-parameter rules of the other ``torch.optim`` optimizers, as composable transforms.

Each rule is ``torch.optim``'s single-tensor algorithm (torch 2.x) written
without in-place operations; state slots carry torch's names (``state.adagrad.sum``
is torch's ``state[p]["sum"]``), with a step count per parameter. Scalars that
torch computes in Python floats (bias corrections, NAdam's momentum schedule)
are float64 0-dim tensors here, so hyperparameters given as tensors keep their
meta-gradients without promoting float32 parameters.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._base import at, bias_correction, ema, ema_square, safe_sqrt, scalar_dtype, state_repr
from ._transforms import PerParam


def _t(step: Tensor) -> Tensor:
    """The step as a float64 scalar (float32 on mps), as torch's Python float ``step``."""
    return step.to(scalar_dtype(step.device))


class ScaleByAdagradState(NamedTuple):
    """State of Adagrad's rule: ``step`` and torch's ``sum`` per name."""

    step: Dict[str, Tensor]
    sum: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class ScaleByAdagrad(PerParam):
    """``g / (sqrt(sum) + eps) / (1 + (step - 1) * lr_decay)`` with ``sum += g * g``."""

    name = "scale_by_adagrad"
    state_type = ScaleByAdagradState

    def __init__(self, lr_decay: Any, initial_accumulator_value: Any, eps: Any) -> None:
        super().__init__(lr_decay=lr_decay, initial_accumulator_value=initial_accumulator_value, eps=eps)
        self.lr_decay, self.initial, self.eps = lr_decay, initial_accumulator_value, eps

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        return (torch.zeros_like(p) + self.initial,)

    def scalars(self, step: Tensor) -> Any:
        lr_decay = at(self.lr_decay, step - 1)
        decay = 1 + (_t(step) - 1) * lr_decay if isinstance(lr_decay, Tensor) or lr_decay != 0 else None
        return at(self.eps, step - 1), decay

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        eps, decay = sc
        total = torch.addcmul(slots[0], g, g)
        u = g / (safe_sqrt(total) + eps)
        return (u if decay is None else u / decay), (total,)


class ScaleByAdadeltaState(NamedTuple):
    """State of Adadelta's rule: ``step``, torch's ``square_avg`` and ``acc_delta`` per name."""

    step: Dict[str, Tensor]
    square_avg: Dict[str, Tensor]
    acc_delta: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class ScaleByAdadelta(PerParam):
    """``sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g``, both averages with decay ``rho``."""

    name = "scale_by_adadelta"
    state_type = ScaleByAdadeltaState

    def __init__(self, rho: Any, eps: Any) -> None:
        super().__init__(rho=rho, eps=eps)
        self.rho, self.eps = rho, eps

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        return torch.zeros_like(p), torch.zeros_like(p)

    def scalars(self, step: Tensor) -> Any:
        return at(self.rho, step - 1), at(self.eps, step - 1)

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        rho, eps = sc
        square_avg = ema_square(slots[0], g, rho)
        delta = safe_sqrt(slots[1] + eps) / safe_sqrt(square_avg + eps) * g
        return delta, (square_avg, ema_square(slots[1], delta, rho))


class ScaleByAdamaxState(NamedTuple):
    """State of Adamax's rule: ``step``, torch's ``exp_avg`` and ``exp_inf`` per name."""

    step: Dict[str, Tensor]
    exp_avg: Dict[str, Tensor]
    exp_inf: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class ScaleByAdamax(PerParam):
    """``m / u / (1 - beta1**step)`` with ``u = max(beta2 * u, |g| + eps)``."""

    name = "scale_by_adamax"
    state_type = ScaleByAdamaxState

    def __init__(self, betas: Tuple[Any, Any], eps: Any) -> None:
        super().__init__(betas=tuple(betas), eps=eps)
        (self.beta1, self.beta2), self.eps = betas, eps

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        return torch.zeros_like(p), torch.zeros_like(p)

    def scalars(self, step: Tensor) -> Any:
        t = step - 1
        beta1, beta2, eps = at(self.beta1, t), at(self.beta2, t), at(self.eps, t)
        return beta1, beta2, eps, bias_correction(beta1, step)

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        beta1, beta2, eps, c1 = sc
        m = ema(slots[0], g, beta1)
        u = torch.maximum(slots[1] * beta2, g.abs() + eps)
        return m / u / c1, (m, u)


class AsgdRuleState(NamedTuple):
    """State of ASGD's rule: ``step``, torch's ``eta``, ``mu`` (scalars) and ``ax`` (the average)."""

    step: Dict[str, Tensor]
    eta: Dict[str, Tensor]
    mu: Dict[str, Tensor]
    ax: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class AsgdRule(PerParam):
    """ASGD's whole update ``-eta * (g + lambd * p)``, ``eta = lr / (1 + lambd * lr * (step - 1)) ** alpha``.

    ``ax`` (the averaged parameters, not used by the update) follows torch.
    """

    name = "asgd_rule"
    state_type = AsgdRuleState
    reads_params = True

    def __init__(self, lr: Any, lambd: Any, alpha: Any, t0: Any) -> None:
        super().__init__(lr=lr, lambd=lambd, alpha=alpha, t0=t0)
        self.lr, self.lambd, self.alpha, self.t0 = lr, lambd, alpha, t0

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        one = torch.ones((), dtype=scalar_dtype(p.device), device=p.device)
        lr = self.lr if not callable(self.lr) else at(self.lr, torch.zeros((), dtype=torch.int64))
        return one * lr, one, torch.zeros_like(p)

    def _eta(self, step: Tensor, done: Tensor) -> Any:
        lr, lambd, alpha = at(self.lr, step), at(self.lambd, step), at(self.alpha, step)
        return lr / (1 + lambd * lr * done) ** alpha

    def scalars(self, step: Tensor) -> Any:
        t = _t(step)
        eta = self._eta(step - 1, t - 1)
        one = torch.ones_like(t)
        mu_next = 1 / torch.maximum(t - at(self.t0, step - 1), one)
        return at(self.lambd, step - 1) * eta, eta, self._eta(step, t) * one, mu_next

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        decay, eta, eta_next, mu_next = sc
        u = -decay * p - eta * g
        ax = slots[2] + (p + u - slots[2]) * slots[1]
        return u, (eta_next, mu_next, ax)


class ScaleByRpropState(NamedTuple):
    """State of Rprop's rule: ``step``, torch's ``prev`` and ``step_size`` per name."""

    step: Dict[str, Tensor]
    prev: Dict[str, Tensor]
    step_size: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class RpropRule(PerParam):
    """Rprop's whole update ``-sign(g) * step_size``; the step size grows by ``etas[1]`` while the
    gradient keeps its sign, shrinks by ``etas[0]`` when it flips (and that step is skipped).

    Its meta-gradient is piecewise: ``sign`` has derivative zero, so nothing flows
    through the gradients' values (the meta-gradient with respect to the initial
    parameters is the identity path only); the step sizes carry meta-gradients to
    ``lr`` and ``etas``, except where they are clamped to ``step_sizes``.
    """

    name = "rprop_rule"
    state_type = ScaleByRpropState

    def __init__(self, lr: Any, etas: Tuple[Any, Any], step_sizes: Tuple[Any, Any]) -> None:
        super().__init__(lr=lr, etas=tuple(etas), step_sizes=tuple(step_sizes))
        self.lr, (self.etaminus, self.etaplus), (self.low, self.high) = lr, etas, step_sizes

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        return torch.zeros_like(p), torch.ones_like(p) * self.lr

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        product = g * slots[0]
        one = torch.ones((), dtype=g.dtype, device=g.device)
        factor = torch.where(
            product > 0, self.etaplus * one, torch.where(product < 0, self.etaminus * one, one)
        )
        size = torch.clamp(slots[1] * factor, self.low, self.high)
        kept = torch.where(product < 0, torch.zeros_like(g), g)
        return -kept.sign() * size, (kept, size)


class ScaleByNadamState(NamedTuple):
    """State of NAdam's rule: ``step``, torch's ``mu_product``, ``exp_avg`` and ``exp_avg_sq`` per name."""

    step: Dict[str, Tensor]
    mu_product: Dict[str, Tensor]
    exp_avg: Dict[str, Tensor]
    exp_avg_sq: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class ScaleByNadam(PerParam):
    """NAdam's direction (Dozat 2016, as ``torch.optim.NAdam``), before ``-lr``."""

    name = "scale_by_nadam"
    state_type = ScaleByNadamState

    def __init__(self, betas: Tuple[Any, Any], eps: Any, momentum_decay: Any) -> None:
        super().__init__(betas=tuple(betas), eps=eps, momentum_decay=momentum_decay)
        (self.beta1, self.beta2), self.eps, self.decay = betas, eps, momentum_decay

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        one = torch.ones((), dtype=scalar_dtype(p.device), device=p.device)
        return one, torch.zeros_like(p), torch.zeros_like(p)

    def scalars(self, step: Tensor) -> Any:
        s, t = step - 1, _t(step)
        beta1, beta2, eps, decay = at(self.beta1, s), at(self.beta2, s), at(self.eps, s), at(self.decay, s)
        mu = beta1 * (1 - 0.5 * 0.96 ** (t * decay))
        mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * decay))
        return beta1, beta2, eps, mu, mu_next, bias_correction(beta2, step)

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        beta1, beta2, eps, mu, mu_next, c2 = sc
        mu_product = slots[0] * mu
        m, v = ema(slots[1], g, beta1), ema_square(slots[2], g, beta2)
        denom = safe_sqrt(v / c2) + eps
        u = (1 - mu) / (1 - mu_product) * (g / denom) + mu_next / (1 - mu_product * mu_next) * (m / denom)
        return u, (mu_product, m, v)


class ScaleByRadamState(NamedTuple):
    """State of RAdam's rule: ``step``, torch's ``exp_avg`` and ``exp_avg_sq`` per name."""

    step: Dict[str, Tensor]
    exp_avg: Dict[str, Tensor]
    exp_avg_sq: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class ScaleByRadam(PerParam):
    """RAdam's rectified direction (Liu et al. 2019, as ``torch.optim.RAdam``), before ``-lr``.

    Until the variance is tractable (``rho_t <= 5``) the direction is the
    bias-corrected momentum; a ``torch.where`` picks the branch, so no Python
    ``if`` reads data (the other branch's square root is clamped to stay finite).
    """

    name = "scale_by_radam"
    state_type = ScaleByRadamState

    def __init__(self, betas: Tuple[Any, Any], eps: Any) -> None:
        super().__init__(betas=tuple(betas), eps=eps)
        (self.beta1, self.beta2), self.eps = betas, eps

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        return torch.zeros_like(p), torch.zeros_like(p)

    def scalars(self, step: Tensor) -> Any:
        s, t = step - 1, _t(step)
        beta1, beta2, eps = at(self.beta1, s), at(self.beta2, s), at(self.eps, s)
        c2 = bias_correction(beta2, step)
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2**t / c2
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rect = ratio.clamp_min(torch.finfo(ratio.dtype).tiny).sqrt()
        return beta1, beta2, eps, bias_correction(beta1, step), c2.sqrt() * rect, rho_t > 5

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        beta1, beta2, eps, c1, scale, rectified = sc
        m, v = ema(slots[0], g, beta1), ema_square(slots[1], g, beta2)
        m_hat = m / c1
        return torch.where(rectified, m_hat * (scale / (safe_sqrt(v) + eps)), m_hat), (m, v)


class ScaleByAdafactorState(NamedTuple):
    """State of Adafactor's rule: ``step``; torch's ``row_var`` and ``col_var`` for params of 2 or more
    dims, ``variance`` for the others (each dict holds only the names it applies to)."""

    step: Dict[str, Tensor]
    row_var: Dict[str, Tensor]
    col_var: Dict[str, Tensor]
    variance: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class AdafactorRule(PerParam):
    """``torch.optim.Adafactor``'s whole update (Shazeer and Stern 2018, torch's variant).

    Unlike torch, which reads the parameter norm and the update norm as Python
    floats, both stay in the graph here, so meta-gradients flow through them.
    """

    name = "adafactor_rule"
    state_type = ScaleByAdafactorState
    reads_params = True

    def __init__(
        self, lr: Any, beta2_decay: float, eps: Tuple[Optional[float], float], d: float, weight_decay: Any
    ) -> None:
        super().__init__(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay)
        self.lr, self.beta2_decay, (self.eps1, self.eps2), self.d = lr, beta2_decay, eps, d
        self.weight_decay = weight_decay

    def init_slots(self, p: Tensor) -> Tuple[Optional[Tensor], ...]:
        if p.dim() > 1:
            return p.new_zeros(p.shape[:-1] + (1,)), p.new_zeros(p.shape[:-2] + (1, p.shape[-1])), None
        return None, None, torch.zeros_like(p)

    def scalars(self, step: Tensor) -> Any:
        s, t = step - 1, _t(step)
        lr = at(self.lr, s)
        rho = torch.minimum(torch.as_tensor(lr, dtype=t.dtype, device=t.device), t.rsqrt())
        return lr, t**self.beta2_decay, rho, at(self.weight_decay, s)

    def rule(self, g: Tensor, p: Any, sc: Any, slots: Tuple[Any, ...]) -> Tuple[Tensor, Tuple[Any, ...]]:
        lr, weight, rho, wd = sc
        eps1 = torch.finfo(g.dtype).eps if self.eps1 is None else self.eps1
        alpha = (torch.linalg.vector_norm(p) / math.sqrt(max(p.numel(), 1))).clamp_min(self.eps2) * rho
        if g.dim() > 1:
            row = slots[0] + weight * ((g * g).sum(-1, keepdim=True) / g.shape[-1] - slots[0])
            col = slots[1] + weight * ((g * g).sum(-2, keepdim=True) / g.shape[-2] - slots[1])
            estimate = row @ col / row.mean(dim=-2, keepdim=True).clamp_min(eps1)
            new: Tuple[Any, ...] = (row, col, None)
        else:
            estimate = slots[2] + weight * (g * g - slots[2])
            new = (None, None, estimate)
        direction = estimate.clamp_min(eps1 * eps1).rsqrt() * g
        norm = torch.linalg.vector_norm(direction) / (math.sqrt(max(direction.numel(), 1)) * self.d)
        u = -(alpha / norm.clamp_min(1.0)) * direction
        if isinstance(wd, Tensor) or wd != 0:
            u = u - (lr * wd) * p
        return u, new
