"""The named optimizers, with ``torch.optim``'s hyperparameter names and defaults.

Each is a :func:`chain` of the small transforms in ``_transforms.py``. Every
hyperparameter may be a tensor that requires grad (a learned learning rate,
momentum or beta); numbers are checked here, tensors are used as they are.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import Tensor

from .._types import LR
from ._base import GradientTransformation, Hyper, check_betas, check_flag, check_hyper, check_lr, is_nonzero
from ._transforms import (
    add_decayed_weights,
    chain,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    trace,
)


def sgd(
    lr: LR = 1e-3,
    momentum: Hyper = 0.0,
    dampening: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    nesterov: bool = False,
) -> GradientTransformation:
    """``torch.optim.SGD`` as a pure update rule: weight decay, momentum, Nesterov.

    A hyperparameter that is the number 0 drops its transform; a tensor always
    keeps it (its value is never read).

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.sgd(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     updates, state = opt.update({"w": torch.ones(2)}, state, params)
        ...     params = fparams.apply_updates(params, updates)
        >>> params
        {'w': tensor([0.7100, 0.7100])}
    """
    where = "fparams.optim.sgd"
    check_lr(where, lr)
    check_hyper(where, "momentum", momentum)
    check_hyper(where, "dampening", dampening, high=1.0, high_closed=True)
    check_hyper(where, "weight_decay", weight_decay)
    check_flag(where, "nesterov", nesterov)
    if nesterov and not isinstance(momentum, Tensor) and momentum == 0:
        raise ValueError(f"{where}: `nesterov=True` needs a `momentum` > 0; got momentum={momentum!r}.")
    if nesterov and not isinstance(dampening, Tensor) and dampening != 0:
        raise ValueError(f"{where}: `nesterov=True` needs `dampening` == 0; got dampening={dampening!r}.")
    parts: List[GradientTransformation] = []
    if is_nonzero(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    if is_nonzero(momentum):
        parts.append(trace(momentum, dampening, nesterov))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def adam(
    lr: LR = 1e-3,
    betas: Tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    amsgrad: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adam`` as a pure update rule; ``weight_decay`` is L2 (added to the gradient).

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -1.0])}
        >>> updates, state = opt.update({"w": torch.tensor([4.0, -0.1])}, opt.init(params), params)
        >>> fparams.apply_updates(params, updates)
        {'w': tensor([ 0.9000, -0.9000])}
    """
    where = "fparams.optim.adam"
    check_lr(where, lr)
    check_betas(where, betas)
    check_hyper(where, "eps", eps)
    check_hyper(where, "weight_decay", weight_decay)
    check_flag(where, "amsgrad", amsgrad)
    parts: List[GradientTransformation] = []
    if is_nonzero(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    parts += [scale_by_adam(betas, eps, amsgrad), scale_by_learning_rate(lr)]
    return chain(*parts)


def adamw(
    lr: LR = 1e-3,
    betas: Tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 1e-2,
    amsgrad: bool = False,
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
    where = "fparams.optim.adamw"
    check_lr(where, lr)
    check_betas(where, betas)
    check_hyper(where, "eps", eps)
    check_hyper(where, "weight_decay", weight_decay)
    check_flag(where, "amsgrad", amsgrad)
    parts = [scale_by_adam(betas, eps, amsgrad)]
    if is_nonzero(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def rmsprop(
    lr: LR = 1e-2,
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum: Hyper = 0.0,
    centered: bool = False,
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
    where = "fparams.optim.rmsprop"
    check_lr(where, lr)
    check_hyper(where, "alpha", alpha, high=1.0, high_closed=True)
    check_hyper(where, "eps", eps)
    check_hyper(where, "weight_decay", weight_decay)
    check_hyper(where, "momentum", momentum)
    check_flag(where, "centered", centered)
    parts: List[GradientTransformation] = []
    if is_nonzero(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_rms(alpha, eps, centered))
    if is_nonzero(momentum):
        parts.append(trace(momentum))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)
