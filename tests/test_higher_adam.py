"""fparams.optim.higher_adam against a hand-written float64 copy of higher 0.2.1's DifferentiableAdam."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import assert_dicts_close, leaves

TOL = dict(rtol=1e-10, atol=1e-12)


def _higher_adam_reference(
    loss: Callable[[Dict[str, Tensor]], Tensor],
    params: Dict[str, Tensor],
    steps: int,
    lr: Any,
    betas: Any = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
) -> Dict[str, Tensor]:
    """higher 0.2.1 (higher/optim.py, DifferentiableAdam._update), written out per tensor.

    ``denom = sqrt(v) + eps``; ``step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)``;
    ``p = p - step_size * m / denom``; and a hook that zeroes the gradient
    flowing into ``v`` where ``v == 0``.
    """
    beta1, beta2 = betas
    state: Dict[str, Dict[str, Any]] = {}
    fast = dict(params)
    for _ in range(steps):
        grads = torch.autograd.grad(loss(fast), list(fast.values()), create_graph=True)
        for (k, p), g in zip(list(fast.items()), grads):
            st = state.setdefault(
                k,
                {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p), "vmax": torch.zeros_like(p)},
            )
            st["step"] += 1
            if weight_decay != 0:
                g = g + weight_decay * p
            st["m"] = m = st["m"] * beta1 + (1 - beta1) * g
            st["v"] = v = st["v"] * beta2 + (1 - beta2) * g * g
            mask = v == 0.0
            if v.requires_grad:
                v.register_hook(lambda grad, mask=mask: torch.where(mask, torch.zeros_like(grad), grad))
            if amsgrad:
                st["vmax"] = vmax = torch.max(st["vmax"], v)
                denom = vmax.sqrt() + eps
            else:
                denom = v.sqrt() + eps
            step_size = lr * math.sqrt(1 - beta2 ** st["step"]) / (1 - beta1 ** st["step"])
            fast[k] = p + (-step_size) * (m / denom)
    return fast


def _problem() -> Any:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 1)).double()
    arch, params, buffers = fparams.split(net)
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(8, 3, generator=g, dtype=torch.float64),
        torch.randn(8, 1, generator=g, dtype=torch.float64),
    )
    xq = torch.randn(8, 3, generator=g, dtype=torch.float64)

    def loss(p: Dict[str, Tensor], x: Tensor = x) -> Tensor:
        return (arch(p, x, buffers={k: b.clone() for k, b in buffers.items()}) - y).pow(2).mean()

    return params, loss, xq


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.05),
        dict(lr=0.05, eps=1e-3, betas=(0.8, 0.99)),
        dict(lr=0.05, weight_decay=0.1),
        dict(lr=0.05, amsgrad=True),
    ],
    ids=["default", "eps-betas", "weight-decay", "amsgrad"],
)
def test_higher_adam_matches_the_reference_values_and_meta_gradients(kw: Dict[str, Any]) -> None:
    params, loss, xq = _problem()
    ours, ref = leaves(params), leaves(params)
    fast = fparams.adapt(lambda p: loss(p), ours, lr=fparams.optim.higher_adam(**kw), steps=4)
    want = _higher_adam_reference(loss, ref, 4, **kw)
    assert_dicts_close(fast, want, **TOL)
    got_g = torch.autograd.grad(loss(fast, xq), list(ours.values()))
    want_g = torch.autograd.grad(loss(want, xq), list(ref.values()))
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, **TOL)


def test_higher_adam_learned_lr_gets_the_reference_meta_gradient() -> None:
    params, loss, xq = _problem()
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    fast = fparams.adapt(lambda p: loss(p), params, lr=fparams.optim.higher_adam(lr), steps=3)
    (got,) = torch.autograd.grad(loss(fast, xq), [lr])
    want = _higher_adam_reference(loss, dict(params), 3, lr)
    (ref,) = torch.autograd.grad(loss(want, xq), [lr])
    torch.testing.assert_close(got, ref, **TOL)


def test_higher_adam_differs_from_torch_adam_where_eps_matters() -> None:
    params, loss, _ = _problem()
    a = fparams.adapt(lambda p: loss(p), params, lr=fparams.optim.higher_adam(0.05, eps=1e-2), steps=2)
    b = fparams.adapt(lambda p: loss(p), params, lr=fparams.optim.adam(0.05, eps=1e-2), steps=2)
    assert max(float((a[k] - b[k]).detach().abs().max()) for k in a) > 1e-3
    # with eps = 0 the two formulas are the same (on the head: the bias before
    # BatchNorm has a gradient of rounding size, where m / sqrt(v) is all noise)
    a = fparams.adapt(
        lambda p: loss(p), params, lr=fparams.optim.higher_adam(0.05, eps=0.0), steps=2, filter="3.*"
    )
    b = fparams.adapt(lambda p: loss(p), params, lr=fparams.optim.adam(0.05, eps=0.0), steps=2, filter="3.*")
    assert_dicts_close(a, b, **TOL)


def test_higher_adam_rejects_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match=r"fparams.optim.higher_adam: `eps`"):
        fparams.optim.higher_adam(eps=-1.0)
    with pytest.raises(ValueError, match=r"higher_adam: `betas\[0\]` must be in \[0, 1\)"):
        fparams.optim.higher_adam(betas=(1.5, 0.9))
