"""The optimizer protocol: an ``init`` / ``update`` pair, its state types, and checks.

An optimizer is a :class:`GradientTransformation`: ``init(params)`` builds a
state, ``update(grads, state, params)`` turns gradients into additive updates
and a new state. Nothing is changed in place, so a step is a pure function that
``torch.func.grad``, ``torch.func.vmap`` and ``torch.compile`` can see through.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, NamedTuple, Optional, Protocol, Tuple, Type, Union

import torch
from torch import Tensor

from .._transforms import _check_dict, key_mismatch
from .._types import TensorDict, Updates

#: A hyperparameter: a number, or a tensor (which may require grad and then
#: receives meta-gradients). Tensors are never read back into Python.
Hyper = Union[float, Tensor]

#: The state of an optimizer: a NamedTuple of a step count and dicts of tensors,
#: or a tuple of such states (one per transform of a :func:`chain`).
OptState = Any


class InitFn(Protocol):
    """``init(params) -> state``."""

    def __call__(self, params: TensorDict) -> OptState: ...


class UpdateFn(Protocol):
    """``update(grads, state, params=None) -> (updates, new_state)``."""

    def __call__(
        self, grads: TensorDict, state: OptState, params: Optional[TensorDict] = None
    ) -> Tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure optimizer: ``init(params) -> state`` and ``update(grads, state, params=None)``.

    ``update`` returns ``(updates, new_state)``; the updates are *added* to the
    params with ``fparams.apply_updates(params, updates)``.

    Examples:
        >>> import torch, fparams.optim
        >>> opt = fparams.optim.sgd(lr=0.1)
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = opt.update({"w": torch.ones(2)}, opt.init(params))
        >>> fparams.apply_updates(params, updates)
        {'w': tensor([0.9000, 0.9000])}
    """

    init: InitFn
    update: UpdateFn


class EmptyState(NamedTuple):
    """The state of a transform that keeps none (``add_decayed_weights`` ...)."""


# -- checks -------------------------------------------------------------------
#
# Only Python numbers are validated: a tensor hyperparameter may be a learned
# value inside torch.func.grad or vmap, where reading it (float(), .item(), an
# `if` on its value) is impossible or would cut the meta-gradient.


def check_hyper(
    where: str, name: str, value: object, high: float = math.inf, high_closed: bool = False
) -> None:
    """``TypeError`` unless ``value`` is a number or a tensor; ``ValueError`` unless a number is
    finite and in ``[0, high)`` (``[0, high]`` with ``high_closed``)."""
    if isinstance(value, Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where}: `{name}` must be a number or a tensor; got {type(value).__name__} {value!r}."
        )
    number = float(value)  # a Python number, never a tensor
    below = number <= high if high_closed else number < high
    if 0 <= number and below and math.isfinite(number):
        return
    valid = "a finite number >= 0" if math.isinf(high) else f"in [0, {high:g}{']' if high_closed else ')'}"
    raise ValueError(f"{where}: `{name}` must be {valid}; got {value!r}.")


def check_lr(where: str, lr: object) -> Optional[Mapping[str, Hyper]]:
    """Check a learning rate; return its dict of per-name rates, or None for one shared rate."""
    if isinstance(lr, Mapping):
        for k, v in lr.items():
            check_hyper(where, f"lr[{k!r}]", v)
        return lr
    check_hyper(where, "lr", lr)
    return None


def check_flag(where: str, name: str, value: object) -> None:
    """``TypeError`` unless ``value`` is a ``bool`` (flags pick code paths, so no tensors)."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: `{name}` must be True or False; got {type(value).__name__} {value!r}.")


def check_betas(where: str, betas: object) -> Tuple[Hyper, Hyper]:
    """A pair of hyperparameters, each in ``[0, 1)``."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(
            f"{where}: `betas` must be a pair (beta1, beta2) of numbers or tensors; got {betas!r}."
        )
    for i, beta in enumerate(betas):
        check_hyper(where, f"betas[{i}]", beta, high=1.0)
    return betas[0], betas[1]


def is_nonzero(value: Hyper) -> bool:
    """Whether a hyperparameter needs its transform: a tensor always does (no reading its value)."""
    return isinstance(value, Tensor) or value != 0


def check_state(where: str, state: object, kind: Type[Any]) -> None:
    """``TypeError`` unless ``state`` is the NamedTuple that this transform's ``init`` returns."""
    if not isinstance(state, kind):
        raise TypeError(
            f"{where}: `state` must be the {kind.__name__} that this transform's init() returned; "
            f"got {type(state).__name__}."
        )


def check_grads(where: str, grads: object, expected: Mapping[str, object]) -> None:
    """``grads`` is a dict with exactly the names the state was initialised with."""
    _check_dict(where, "grads", grads)
    assert isinstance(grads, Mapping)
    if grads.keys() == expected.keys():
        return
    raise ValueError(
        f"{where}: `grads` does not have the names the state was initialised with. "
        f"{key_mismatch(grads, expected)} Call init() with the params that get gradients "
        f"(fparams.partition(params, filter) splits them off)."
    )


def check_params(where: str, params: Optional[TensorDict], grads: Mapping[str, object]) -> TensorDict:
    """``params`` is given and has every name in ``grads``."""
    if params is None:
        raise TypeError(
            f"{where}: `params` is required because the update reads the parameters; "
            f"call update(grads, state, params)."
        )
    _check_dict(where, "params", params)
    missing = sorted(k for k in grads if k not in params)
    if missing:
        raise ValueError(
            f"{where}: `params` lacks the gradient name(s) {missing}; pass the params the "
            f"gradients belong to."
        )
    return params


def init_step(params: TensorDict) -> Tensor:
    """A step count of zero, an int64 scalar on the params' device."""
    device = next(iter(params.values())).device if params else None
    return torch.zeros((), dtype=torch.int64, device=device)


def bias_correction(decay: Hyper, step: Tensor) -> Tensor:
    """``1 - decay ** step`` as a scalar tensor in float64 (float32 where the device has no float64).

    Like torch.optim, which computes it in Python floats: in float32,
    ``1 - 0.999`` is already off by 1e-5, which would show in every update.
    A 0-dim float64 tensor does not promote the float32 tensors it meets.
    """
    dtype = torch.float32 if step.device.type == "mps" else torch.float64
    return 1 - decay ** step.to(dtype)


def ema(average: Tensor, value: Tensor, decay: Hyper) -> Tensor:
    """``decay * average + (1 - decay) * value``, one fused ``lerp`` when ``decay`` is a number."""
    if isinstance(decay, Tensor):
        return average + (1 - decay) * (value - average)
    return torch.lerp(average, value, 1 - decay)


def ema_square(average: Tensor, value: Tensor, decay: Hyper) -> Tensor:
    """``decay * average + (1 - decay) * value * value``, in torch.optim's order of operations."""
    if isinstance(decay, Tensor):
        return average * decay + (1 - decay) * (value * value)
    return torch.addcmul(average * decay, value, value, value=1 - decay)


def safe_sqrt(t: Tensor) -> Tensor:
    """``t.sqrt()`` whose gradient is 0 (not NaN) where ``t`` is 0 or negative.

    A parameter whose gradient has always been exactly zero (a dead ReLU unit)
    has a zero second moment, and ``sqrt``'s derivative there is infinite:
    times the zero upstream gradient it gives NaN, which would spread through
    every meta-gradient. Clamping at the smallest normal number changes the
    value only where it is below ``sqrt(tiny)`` (1e-19 in float32), far under
    any ``eps`` it is added to.
    """
    return t.clamp_min(torch.finfo(t.dtype).tiny).sqrt()
