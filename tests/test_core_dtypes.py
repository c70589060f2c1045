"""Parameters keep their dtype (issue 16): an update or a rate of another dtype of the same
kind is cast to the parameter's dtype where it is applied, in every function of the core that
applies one; the cast stays differentiable, so a float64 rate still gets its meta-gradient."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from torch import Tensor, nn

import fparams

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64


def _params(dtype: torch.dtype) -> Dict[str, Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(3, 2, dtype=dtype), "b": torch.randn(3, dtype=dtype)}


def test_apply_updates_keeps_bf16_params_bf16_under_float32_updates() -> None:
    params = _params(BF16)
    updates = {k: torch.full(v.shape, 0.25, dtype=F32) for k, v in params.items()}
    out = fparams.apply_updates(params, updates)
    for k, v in out.items():
        assert v.dtype == BF16, k
        torch.testing.assert_close(v, params[k] + updates[k].to(BF16), rtol=0, atol=0)


def test_sgd_step_keeps_bf16_params_bf16_under_float32_grads() -> None:
    params = _params(BF16)
    grads = {"w": torch.ones(3, 2, dtype=F32)}
    out = fparams.sgd_step(params, grads, lr=0.5)
    assert out["w"].dtype == BF16 and out["b"] is params["b"]
    torch.testing.assert_close(out["w"], params["w"] - (0.5 * grads["w"]).to(BF16), rtol=0, atol=0)


def test_a_float64_rate_dict_leaves_float32_params_float32_and_gets_its_meta_gradient() -> None:
    params = {k: v.requires_grad_() for k, v in _params(F32).items()}
    rates = {k: torch.full(v.shape, 0.1, dtype=F64, requires_grad=True) for k, v in params.items()}
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    out = fparams.sgd_step(params, grads, rates)
    assert {v.dtype for v in out.values()} == {F32}
    sum(v.sum() for v in out.values()).backward()  # type: ignore[union-attr]
    for k, r in rates.items():
        assert r.grad is not None and r.grad.dtype == F64, k
        torch.testing.assert_close(r.grad, -torch.ones_like(r))  # d(p - r g)/dr = -g
    # The next step runs: float32 params, float32 grads (it failed inside torch before).
    fparams.sgd_step(fparams.detach(out), grads, 0.1)


def test_update_module_keeps_a_bf16_model_bf16() -> None:
    net = nn.Linear(2, 3).to(BF16)
    fparams.update_module(net, [torch.ones(3, 2), torch.ones(3)])
    assert net.weight.dtype == BF16 and net.bias.dtype == BF16


def test_the_update_attribute_is_cast_too() -> None:
    net = nn.Linear(2, 3).to(BF16)
    net.weight.update = torch.ones(3, 2)  # type: ignore[attr-defined]
    fparams.update_module(net)
    assert net.weight.dtype == BF16


@pytest.mark.parametrize("shim", ["maml_update", "meta_sgd_update"])
def test_the_l2l_steps_keep_the_params_dtype_under_a_float64_rate(shim: str) -> None:
    net = fparams.clone_module(nn.Linear(2, 3))
    grads = [torch.ones_like(p) for p in net.parameters()]
    if shim == "maml_update":
        fparams.maml_update(net, torch.tensor([0.1], dtype=F64), grads)  # not 0-dim: promotes
    else:
        fparams.meta_sgd_update(net, [torch.full_like(p, 0.1, dtype=F64) for p in net.parameters()], grads)
    assert {p.dtype for p in net.parameters()} == {F32}


def test_metasgd_with_float64_rates_keeps_a_float32_model_float32() -> None:
    net = nn.Linear(2, 1)
    meta = fparams.MetaSGD(net, lrs=[torch.full_like(p, 0.1, dtype=F64) for p in net.parameters()])
    learner = meta.clone()
    x = torch.randn(4, 2)
    learner.adapt(learner(x).pow(2).mean())
    assert {p.dtype for p in learner.module.parameters()} == {F32}
