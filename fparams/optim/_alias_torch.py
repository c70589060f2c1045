"""The rest of ``torch.optim``: Adagrad, Adadelta, Adamax, ASGD, Rprop, NAdam, RAdam, Adafactor.

Same names, keyword names and defaults as ``torch.optim``; each is a named
chain of the rules in ``_scalers.py`` with fixed state fields
(``state.adagrad.sum`` is torch's ``state[p]["sum"]``). Every hyperparameter
may be a tensor (it gets meta-gradients) or a schedule (a list of per-step
values or a callable of the step).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

from torch import Tensor

from .._checks import check_flag, check_hyper
from .._errors import FparamsTypeError, FparamsValueError, public
from ._alias import named
from ._base import EmptyState, GradientTransformation, Rate, Scheduled, hyper, state_repr
from ._moments import check_betas_schedules
from ._scalers import (
    AdafactorRule,
    AsgdRule,
    AsgdRuleState,
    RpropRule,
    ScaleByAdadelta,
    ScaleByAdadeltaState,
    ScaleByAdafactorState,
    ScaleByAdagrad,
    ScaleByAdagradState,
    ScaleByAdamax,
    ScaleByAdamaxState,
    ScaleByNadam,
    ScaleByNadamState,
    ScaleByRadam,
    ScaleByRadamState,
    ScaleByRpropState,
)
from ._transforms import make_decay, make_lr


def _state(cls: Any) -> Any:
    cls.__repr__ = state_repr
    return cls


@_state
class AdagradState(NamedTuple):
    """State of :func:`adagrad`: ``state.adagrad.sum``, ``state.adagrad.step``."""

    weight_decay: EmptyState
    adagrad: ScaleByAdagradState
    lr: EmptyState


@_state
class AdadeltaState(NamedTuple):
    """State of :func:`adadelta`: ``state.adadelta.square_avg``, ``state.adadelta.acc_delta``."""

    weight_decay: EmptyState
    adadelta: ScaleByAdadeltaState
    lr: EmptyState


@_state
class AdamaxState(NamedTuple):
    """State of :func:`adamax`: ``state.adamax.exp_avg``, ``state.adamax.exp_inf``."""

    weight_decay: EmptyState
    adamax: ScaleByAdamaxState
    lr: EmptyState


@_state
class AsgdState(NamedTuple):
    """State of :func:`asgd`: ``state.asgd.eta``, ``state.asgd.mu``, ``state.asgd.ax`` (the average)."""

    weight_decay: EmptyState
    asgd: AsgdRuleState


@_state
class RpropState(NamedTuple):
    """State of :func:`rprop`: ``state.rprop.prev``, ``state.rprop.step_size``."""

    rprop: ScaleByRpropState


@_state
class NadamState(NamedTuple):
    """State of :func:`nadam`: ``state.nadam.mu_product``, ``exp_avg``, ``exp_avg_sq``."""

    weight_decay: EmptyState
    nadam: ScaleByNadamState
    decoupled_weight_decay: EmptyState
    lr: EmptyState


@_state
class RadamState(NamedTuple):
    """State of :func:`radam`: ``state.radam.exp_avg``, ``state.radam.exp_avg_sq``."""

    weight_decay: EmptyState
    radam: ScaleByRadamState
    decoupled_weight_decay: EmptyState
    lr: EmptyState


@_state
class AdafactorState(NamedTuple):
    """State of :func:`adafactor`: ``state.adafactor.row_var``, ``col_var``, ``variance``."""

    adafactor: ScaleByAdafactorState


@public("optim.adagrad")
def adagrad(
    lr: Rate = 1e-2,
    lr_decay: Scheduled = 0.0,
    weight_decay: Scheduled = 0.0,
    initial_accumulator_value: Scheduled = 0.0,
    eps: Scheduled = 1e-10,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adagrad``: ``p -= lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum) + eps)``.

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.adagrad(0.1)
        >>> opt
        adagrad(lr=0.1, eps=1e-10)
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([2.0])}, opt.init(params), params)
        >>> updates["w"], state.adagrad.sum["w"]
        (tensor([-0.1000]), tensor([4.]))
    """
    check_hyper("initial_accumulator_value", initial_accumulator_value)
    rule = ScaleByAdagrad(hyper("lr_decay", lr_decay), initial_accumulator_value, hyper("eps", eps))
    parts = dict(weight_decay=make_decay(weight_decay), adagrad=rule.as_transformation(), lr=make_lr(lr))
    optional = dict(
        lr_decay=lr_decay, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value
    )
    return named("adagrad", AdagradState, parts, dict(lr=lr), {**optional, "eps": eps}, maximize)


@public("optim.adadelta")
def adadelta(
    lr: Rate = 1.0,
    rho: Scheduled = 0.9,
    eps: Scheduled = 1e-6,
    weight_decay: Scheduled = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adadelta``: ``p -= lr * sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g``.

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.adadelta()
        >>> opt
        adadelta(lr=1.0, rho=0.9, eps=1e-06)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = opt.init(params)
        >>> state.adadelta.square_avg
        {'w': tensor([0.])}
    """
    rule = ScaleByAdadelta(hyper("rho", rho, 1.0, True), hyper("eps", eps))
    parts = dict(weight_decay=make_decay(weight_decay), adadelta=rule.as_transformation(), lr=make_lr(lr))
    shown = dict(lr=lr, rho=rho, eps=eps)
    return named("adadelta", AdadeltaState, parts, shown, dict(weight_decay=weight_decay), maximize)


@public("optim.adamax")
def adamax(
    lr: Rate = 2e-3,
    betas: Tuple[Scheduled, Scheduled] = (0.9, 0.999),
    eps: Scheduled = 1e-8,
    weight_decay: Scheduled = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adamax``: Adam with the infinity norm, ``p -= lr / (1 - beta1**t) * m / u``.

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.adamax(0.1)
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([2.0])}, opt.init(params), params)
        >>> updates["w"]
        tensor([-0.1000])
    """
    rule = ScaleByAdamax(check_betas_schedules(betas), hyper("eps", eps))
    parts = dict(weight_decay=make_decay(weight_decay), adamax=rule.as_transformation(), lr=make_lr(lr))
    shown = dict(lr=lr, betas=tuple(betas), eps=eps)
    return named("adamax", AdamaxState, parts, shown, dict(weight_decay=weight_decay), maximize)


@public("optim.asgd")
def asgd(
    lr: Scheduled = 1e-2,
    lambd: Scheduled = 1e-4,
    alpha: Scheduled = 0.75,
    t0: Scheduled = 1e6,
    weight_decay: Scheduled = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.ASGD``: ``p -= eta * (g + lambd * p)`` with a decaying ``eta``; ``state.asgd.ax``
    is the running average of the parameters (start averaging after ``t0`` steps).

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.asgd(0.1, lambd=0.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([2.0])}, opt.init(params), params)
        >>> updates["w"], state.asgd.ax["w"]
        (tensor([-0.2000]), tensor([0.8000]))
    """
    rule = AsgdRule(_rate(lr), hyper("lambd", lambd), hyper("alpha", alpha), hyper("t0", t0))
    parts = dict(weight_decay=make_decay(weight_decay), asgd=rule.as_transformation())
    shown = dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0)
    return named("asgd", AsgdState, parts, shown, dict(weight_decay=weight_decay), maximize)


def _rate(lr: object) -> Any:
    if isinstance(lr, dict):
        raise FparamsTypeError(
            "`lr` must be a number, a tensor or a schedule here; per-parameter rates are "
            "not supported by this optimizer (use fparams.optim.partition for groups)."
        )
    return hyper("lr", lr)


def _pair(name: str, value: object) -> Tuple[Any, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise FparamsTypeError(f"`{name}` must be a pair of numbers or tensors; got {value!r}.")
    return hyper(f"{name}[0]", value[0]), hyper(f"{name}[1]", value[1])


@public("optim.rprop")
def rprop(
    lr: Scheduled = 1e-2,
    etas: Tuple[Scheduled, Scheduled] = (0.5, 1.2),
    step_sizes: Tuple[Scheduled, Scheduled] = (1e-6, 50),
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Rprop``: steps of ``-sign(g) * step_size``, sizes adapted by the gradient's sign.

    The meta-gradient is piecewise: the sign of a gradient has derivative zero,
    so none flows through the gradients' values (with respect to the initial
    parameters only the identity path ``p_T = p_0 + ...`` remains); ``lr`` and
    ``etas`` get meta-gradients through the step sizes, zero where a size is
    clamped to ``step_sizes``.

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.rprop(0.1)
        >>> params = {"w": torch.tensor([1.0, 1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([3.0, -0.5])}, opt.init(params), params)
        >>> updates["w"]
        tensor([-0.1000,  0.1000])
    """
    etaminus, etaplus = _pair("etas", etas)
    if (
        not isinstance(etaminus, Tensor)
        and not isinstance(etaplus, Tensor)
        and not 0 < etaminus < 1 < etaplus
    ):
        raise FparamsValueError(f"`etas` must satisfy 0 < etas[0] < 1 < etas[1]; got {tuple(etas)!r}.")
    if isinstance(lr, (list, tuple, dict)) or callable(lr):
        raise FparamsTypeError(
            f"`lr` of rprop is its initial step size: a number or a tensor; got {type(lr).__name__}."
        )
    rule = RpropRule(hyper("lr", lr), (etaminus, etaplus), _pair("step_sizes", step_sizes))
    shown = dict(lr=lr, etas=tuple(etas), step_sizes=tuple(step_sizes))
    return named("rprop", RpropState, dict(rprop=rule.as_transformation()), shown, {}, maximize)


@public("optim.nadam")
def nadam(
    lr: Rate = 2e-3,
    betas: Tuple[Scheduled, Scheduled] = (0.9, 0.999),
    eps: Scheduled = 1e-8,
    weight_decay: Scheduled = 0.0,
    momentum_decay: Scheduled = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.NAdam``: Adam with Nesterov momentum (and, optionally, AdamW's decoupled decay).

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.nadam(0.1)
        >>> opt
        nadam(lr=0.1, betas=(0.9, 0.999), eps=1e-08, momentum_decay=0.004)
        >>> state = opt.init({"w": torch.zeros(2)})
        >>> state.nadam.mu_product
        {'w': tensor(1., dtype=torch.float64)}
    """
    check_flag("decoupled_weight_decay", decoupled_weight_decay)
    rule = ScaleByNadam(
        check_betas_schedules(betas), hyper("eps", eps), hyper("momentum_decay", momentum_decay)
    )
    parts = _decayed("nadam", rule.as_transformation(), weight_decay, decoupled_weight_decay, lr)
    shown = dict(lr=lr, betas=tuple(betas), eps=eps, momentum_decay=momentum_decay)
    optional = dict(weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay)
    return named("nadam", NadamState, parts, shown, optional, maximize)


def _decayed(field: str, rule: GradientTransformation, weight_decay: Any, decoupled: bool, lr: Any) -> Any:
    none = make_decay(0.0)
    decay = make_decay(weight_decay)
    return {
        "weight_decay": none if decoupled else decay,
        field: rule,
        "decoupled_weight_decay": decay if decoupled else none,
        "lr": make_lr(lr),
    }


@public("optim.radam")
def radam(
    lr: Rate = 1e-3,
    betas: Tuple[Scheduled, Scheduled] = (0.9, 0.999),
    eps: Scheduled = 1e-8,
    weight_decay: Scheduled = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.RAdam``: Adam with the variance rectification of Liu et al. (2019).

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.radam(0.1)
        >>> params = {"w": torch.tensor([1.0])}
        >>> updates, _ = opt.update({"w": torch.tensor([2.0])}, opt.init(params), params)
        >>> updates["w"]  # early steps: the bias-corrected momentum, -lr * g
        tensor([-0.2000])
    """
    check_flag("decoupled_weight_decay", decoupled_weight_decay)
    rule = ScaleByRadam(check_betas_schedules(betas), hyper("eps", eps))
    parts = _decayed("radam", rule.as_transformation(), weight_decay, decoupled_weight_decay, lr)
    optional = dict(weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay)
    return named("radam", RadamState, parts, dict(lr=lr, betas=tuple(betas), eps=eps), optional, maximize)


@public("optim.adafactor")
def adafactor(
    lr: Scheduled = 1e-2,
    beta2_decay: float = -0.8,
    eps: Tuple[Optional[float], float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: Scheduled = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adafactor``: factored second moments (a row and a column per matrix).

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.adafactor()
        >>> state = opt.init({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
        >>> factored = state.adafactor
        >>> factored.row_var["w"].shape, factored.col_var["w"].shape, list(factored.variance)
        (torch.Size([3, 1]), torch.Size([1, 4]), ['b'])
    """
    if isinstance(beta2_decay, bool) or not isinstance(beta2_decay, (int, float)) or beta2_decay > 0:
        raise FparamsValueError(f"`beta2_decay` must be a number <= 0; got {beta2_decay!r}.")
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise FparamsTypeError(f"`eps` must be a pair (eps1 or None, eps2); got {eps!r}.")
    if eps[0] is not None:
        check_hyper("eps[0]", eps[0])
    check_hyper("eps[1]", eps[1])
    check_hyper("d", d)
    if d < 1:
        raise FparamsValueError(f"`d` (the clipping threshold) must be >= 1; got {d!r}.")
    rule = AdafactorRule(
        _rate(lr), float(beta2_decay), (eps[0], eps[1]), float(d), hyper("weight_decay", weight_decay)
    )
    shown = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d)
    return named(
        "adafactor",
        AdafactorState,
        dict(adafactor=rule.as_transformation()),
        shown,
        dict(weight_decay=weight_decay),
        maximize,
    )
