"""adapt's has_aux / per-step rates / return_state together with checkpoint=True: the same numbers."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import assert_dicts_close, leaves, task_data

TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("lr", ["schedule", "optimizer"])
def test_knobs_with_checkpoint_equal_without(strategy: str, lr: str) -> None:
    torch.manual_seed(0)
    arch, params, _ = fparams.split(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double())
    rates = [torch.tensor(r, dtype=torch.float64, requires_grad=True) for r in (0.1, 0.05, 0.2)]

    def mse_aux(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        out = arch(p, x)
        return (out - y).pow(2).mean(), out

    def task(checkpoint: bool) -> Any:
        def run(
            p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
        ) -> Tuple[Tensor, Tensor]:
            if lr == "schedule":
                fast, aux = fparams.adapt(
                    mse_aux, p, xs, ys, lr=rates, steps=3, has_aux=True, checkpoint=checkpoint
                )
            else:
                fast, aux, state = fparams.adapt(
                    mse_aux, p, xs, ys, lr=fparams.optim.adam(0.05), steps=3,
                    has_aux=True, return_state=True, checkpoint=checkpoint,
                )  # fmt: skip
                aux = aux + state.adam.nu["2.bias"].sum()
            return mse_aux(fast, xq, yq)[0], aux

        return run

    data = task_data(3)
    outs = {}
    for checkpoint in (False, True):
        p = leaves(params)
        losses, auxes = fparams.map_tasks(task(checkpoint), strategy=strategy)(p, *data)
        learned = rates if lr == "schedule" else []
        grads = torch.autograd.grad((losses.sum() + auxes.sum()), list(p.values()) + learned)
        outs[checkpoint] = (losses, auxes, dict(enumerate(grads)))
    torch.testing.assert_close(outs[True][0], outs[False][0], **TOL)
    torch.testing.assert_close(outs[True][1], outs[False][1], **TOL)
    assert_dicts_close(outs[True][2], outs[False][2], **TOL)
