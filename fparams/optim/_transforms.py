"""Small gradient transformations that the named optimizers are chains of.

Each returns a :class:`GradientTransformation`. Their formulas are
``torch.optim``'s, written without in-place operations, with the step count
kept as a tensor so that no Python control flow depends on data.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple, Type

import torch
from torch import Tensor

from .._checks import check_betas, check_dict, check_flag, check_hyper, check_lr, check_rate_keys, check_state
from .._transforms import map_params, zeros_like
from .._types import LR, TensorDict, Updates
from ._base import (
    EmptyState,
    GradientTransformation,
    Hyper,
    OptState,
    bias_correction,
    check_grads,
    check_params,
    described,
    ema,
    ema_square,
    format_call,
    init_step,
    is_nonzero,
    safe_sqrt,
    state_repr,
)


class TraceState(NamedTuple):
    """State of :func:`trace`: the step count and the momentum buffer."""

    step: Tensor
    trace: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: step count, first and second moments.

    ``nu_max`` is the running maximum of ``nu`` with ``amsgrad=True`` and an
    empty dict otherwise.
    """

    step: Tensor
    mu: Dict[str, Tensor]
    nu: Dict[str, Tensor]
    nu_max: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`: the mean square and (``centered``) the mean gradient.

    ``mu`` is an empty dict unless ``centered=True``.
    """

    nu: Dict[str, Tensor]
    mu: Dict[str, Tensor]

    def __repr__(self) -> str:
        return state_repr(self)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other; the state is a tuple of theirs.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.chain(optim.add_decayed_weights(0.5), optim.scale_by_learning_rate(0.1))
        >>> opt
        chain(add_decayed_weights(weight_decay=0.5), scale_by_learning_rate(lr=0.1))
        >>> params = {"w": torch.ones(2)}
        >>> opt.update({"w": torch.ones(2)}, opt.init(params), params)[0]
        {'w': tensor([-0.1500, -0.1500])}
    """
    _check_parts("fparams.optim.chain", transforms)
    description = "chain(" + ", ".join(repr(t) for t in transforms) + ")"
    return _chain("fparams.optim.chain", transforms, tuple, tuple, description)


def named_chain(state_type: Type[Any], **transforms: GradientTransformation) -> GradientTransformation:
    """:func:`chain` whose state is a ``state_type``, a NamedTuple with one field per transform.

    Its state has the same fields whatever the hyperparameters, so
    ``state.adam.mu`` replaces positional access, and a saved state fits an
    optimizer built with other hyperparameter values. A transform that a
    hyperparameter switches off is kept in its place as :func:`identity`.
    The named optimizers (:func:`fparams.optim.adam` ...) are named chains.

    Examples:
        >>> import typing, torch, fparams.optim as optim
        >>> class DecayThenScale(typing.NamedTuple):
        ...     decay: optim.EmptyState
        ...     lr: optim.EmptyState
        >>> opt = optim.named_chain(
        ...     DecayThenScale, decay=optim.add_decayed_weights(0.5), lr=optim.scale_by_learning_rate(0.1)
        ... )
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
        >>> state.lr
        EmptyState()
    """
    return named_chain_for("fparams.optim.named_chain", state_type, transforms)


def named_chain_for(
    where: str, state_type: Type[Any], transforms: Dict[str, GradientTransformation]
) -> GradientTransformation:
    """:func:`named_chain`, with ``where`` (the named optimizer) as its errors' prefix."""
    fields = getattr(state_type, "_fields", None)
    if not isinstance(state_type, type) or not isinstance(fields, tuple):
        raise TypeError(f"{where}: `state_type` must be a NamedTuple class; got {state_type!r}.")
    if list(transforms) != list(fields):
        raise ValueError(
            f"{where}: the transforms must be given by the fields of {state_type.__name__}, in "
            f"order: {', '.join(fields)}; got {', '.join(transforms) or 'none'}."
        )
    _check_parts(where, tuple(transforms.values()))
    description = f"named_chain({state_type.__name__}, " + ", ".join(
        f"{k}={t!r}" for k, t in transforms.items()
    ) + ")"
    parts = tuple(transforms.values())
    return _chain(where, parts, lambda states: state_type(*states), state_type, description)


def _check_parts(where: str, transforms: Tuple[Any, ...]) -> None:
    for i, t in enumerate(transforms):
        if not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise TypeError(
                f"{where}: transform {i} must have `init` and `update` methods (a "
                f"GradientTransformation such as fparams.optim.trace(0.9)); got {type(t).__name__}."
            )


def _chain(
    where: str, transforms: Tuple[GradientTransformation, ...], pack: Any, kind: Any, description: str
) -> GradientTransformation:
    def init(params: TensorDict) -> OptState:
        return pack([t.init(params) for t in transforms])

    def update(
        grads: TensorDict, state: Any, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, OptState]:
        check_dict(where, "grads", grads)
        if type(state) is not kind or len(state) != len(transforms):
            raise TypeError(
                f"{where}: `state` must be the {kind.__name__} of {len(transforms)} states that "
                f"this chain's init() returned; got {type(state).__name__}."
            )
        updates: TensorDict = grads
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return dict(updates), pack(new_state)

    return described(init, update, description)


def identity() -> GradientTransformation:
    """Pass the updates through unchanged: the placeholder of a switched-off transform.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.identity()
        >>> opt.update({"w": torch.ones(1)}, opt.init({"w": torch.ones(1)}))
        ({'w': tensor([1.])}, EmptyState())
    """
    where = "fparams.optim.identity"

    def init(params: TensorDict) -> EmptyState:
        return EmptyState()

    def update(
        grads: TensorDict, state: EmptyState, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, EmptyState]:
        check_state(where, state, EmptyState)
        check_dict(where, "grads", grads)
        return dict(grads), state

    return described(init, update, "identity()")


def add_decayed_weights(weight_decay: Hyper) -> GradientTransformation:
    """``g + weight_decay * p``: L2 weight decay (or, after a rescaling, decoupled decay).

    ``update`` needs ``params``.

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.add_decayed_weights(0.1)
        >>> params = {"w": torch.full((2,), 2.0)}
        >>> opt.update({"w": torch.ones(2)}, opt.init(params), params)[0]
        {'w': tensor([1.2000, 1.2000])}
    """
    where = "fparams.optim.add_decayed_weights"
    check_hyper(where, "weight_decay", weight_decay)

    def init(params: TensorDict) -> EmptyState:
        return EmptyState()

    def update(
        grads: TensorDict, state: EmptyState, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, EmptyState]:
        check_state(where, state, EmptyState)
        params = check_params(where, params, grads)
        return {k: g + weight_decay * params[k] for k, g in grads.items()}, state

    return described(init, update, format_call("add_decayed_weights", weight_decay=weight_decay))


def scale_by_learning_rate(lr: LR) -> GradientTransformation:
    """``-lr * u``: turn a descent direction into an update.

    ``lr`` is a number, a tensor (a learned rate), or a dict with one rate per
    parameter name (Meta-SGD style).

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.scale_by_learning_rate(torch.tensor(0.5, requires_grad=True))
        >>> updates, _ = opt.update({"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}))
        >>> updates["w"].sum().backward()  # the rate gets a meta-gradient
    """
    where = "fparams.optim.scale_by_learning_rate"
    per_name = check_lr(where, lr)

    def init(params: TensorDict) -> EmptyState:
        return EmptyState()

    def update(
        grads: TensorDict, state: EmptyState, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, EmptyState]:
        check_state(where, state, EmptyState)
        if per_name is None:
            return {k: -lr * g for k, g in grads.items()}, state  # type: ignore[operator]
        check_rate_keys(where, per_name, grads, per_name)
        return {k: -per_name[k] * g for k, g in grads.items()}, state

    return described(init, update, format_call("scale_by_learning_rate", lr=lr))


def trace(momentum: Hyper, dampening: Hyper = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Momentum as in ``torch.optim.SGD``: ``b = momentum * b + (1 - dampening) * g``.

    On the first step the buffer is ``g`` itself (torch's rule, which ignores
    ``dampening`` then). The update is ``b``, or ``g + momentum * b`` with
    ``nesterov=True``. With ``momentum`` the number 0 the update is ``g``, as
    torch.optim's, and the buffer holds ``g`` (the state keeps its fields).

    Examples:
        >>> import torch, fparams.optim as optim
        >>> opt = optim.trace(0.5)
        >>> g, state = {"w": torch.ones(1)}, opt.init({"w": torch.zeros(1)})
        >>> u, state = opt.update(g, state)
        >>> opt.update(g, state)[0]
        {'w': tensor([1.5000])}
    """
    where = "fparams.optim.trace"
    check_hyper(where, "momentum", momentum)
    check_hyper(where, "dampening", dampening, high=1.0, high_closed=True)
    check_flag(where, "nesterov", nesterov)
    # With no dampening a zero buffer gives torch's first step on its own.
    first_step_rule = is_nonzero(dampening)
    passthrough = not is_nonzero(momentum)  # torch ignores dampening without momentum

    def init(params: TensorDict) -> TraceState:
        return TraceState(init_step(params), zeros_like(params))

    def update(
        grads: TensorDict, state: TraceState, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, TraceState]:
        check_state(where, state, TraceState)
        check_grads(where, grads, state.trace)
        if passthrough:
            return dict(grads), TraceState(state.step + 1, dict(grads))

        def buffer(g: Tensor, b: Tensor) -> Tensor:
            new = momentum * b + (1 - dampening) * g
            return torch.where(state.step == 0, g, new) if first_step_rule else new

        buffers = map_params(buffer, grads, state.trace)
        if nesterov:
            updates = map_params(lambda g, b: g + momentum * b, grads, buffers)
        else:
            updates = dict(buffers)
        return updates, TraceState(state.step + 1, buffers)

    extra = {"dampening": dampening} if is_nonzero(dampening) else {}
    extra.update({"nesterov": True} if nesterov else {})
    return described(init, update, format_call("trace", momentum=momentum, **extra))


def scale_by_adam(
    betas: Tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
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
    where = "fparams.optim.scale_by_adam"
    beta1, beta2 = check_betas(where, betas)
    check_hyper(where, "eps", eps)
    check_flag(where, "amsgrad", amsgrad)

    def init(params: TensorDict) -> ScaleByAdamState:
        nu_max = zeros_like(params) if amsgrad else {}
        return ScaleByAdamState(init_step(params), zeros_like(params), zeros_like(params), nu_max)

    def update(
        grads: TensorDict, state: ScaleByAdamState, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, ScaleByAdamState]:
        check_state(where, state, ScaleByAdamState)
        check_grads(where, grads, state.mu)
        step = state.step + 1
        mu = map_params(lambda g, m: ema(m, g, beta1), grads, state.mu)
        nu = map_params(lambda g, v: ema_square(v, g, beta2), grads, state.nu)
        nu_max = map_params(torch.maximum, state.nu_max, nu) if amsgrad else {}
        c1 = bias_correction(beta1, step)
        c2_sqrt = bias_correction(beta2, step).sqrt()

        def direction(m: Tensor, v: Tensor) -> Tensor:
            if eps_before_correction:
                return (c2_sqrt / c1) * m / (safe_sqrt(v) + eps)
            return (m / c1) / (safe_sqrt(v) / c2_sqrt + eps)

        updates = map_params(direction, mu, nu_max if amsgrad else nu)
        return updates, ScaleByAdamState(step, mu, nu, nu_max)

    extra: dict = {"amsgrad": True} if amsgrad else {}
    extra.update({"eps_before_correction": True} if eps_before_correction else {})
    return described(init, update, format_call("scale_by_adam", betas=tuple(betas), eps=eps, **extra))


def scale_by_rms(alpha: Hyper = 0.99, eps: Hyper = 1e-8, centered: bool = False) -> GradientTransformation:
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
    where = "fparams.optim.scale_by_rms"
    check_hyper(where, "alpha", alpha, high=1.0, high_closed=True)
    check_hyper(where, "eps", eps)
    check_flag(where, "centered", centered)

    def init(params: TensorDict) -> ScaleByRmsState:
        return ScaleByRmsState(zeros_like(params), zeros_like(params) if centered else {})

    def update(
        grads: TensorDict, state: ScaleByRmsState, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, ScaleByRmsState]:
        check_state(where, state, ScaleByRmsState)
        check_grads(where, grads, state.nu)
        nu = map_params(lambda g, v: ema_square(v, g, alpha), grads, state.nu)
        if centered:
            mu = map_params(lambda g, m: ema(m, g, alpha), grads, state.mu)
            spread = map_params(lambda v, m: torch.addcmul(v, m, m, value=-1), nu, mu)
        else:
            mu, spread = {}, nu
        updates = map_params(lambda g, s: g / (safe_sqrt(s) + eps), grads, spread)
        return updates, ScaleByRmsState(nu, mu)

    extra = {"centered": True} if centered else {}
    return described(init, update, format_call("scale_by_rms", alpha=alpha, eps=eps, **extra))
