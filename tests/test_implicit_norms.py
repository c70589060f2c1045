"""iMAML with normalization layers: every strategy of map_tasks gives the loop's numbers
(issue 16 item 6), and BatchNorm with one row per task fails the same way in each (item 7)."""

from __future__ import annotations

import copy
import re
import warnings
from typing import Dict, List

import pytest
import torch
from torch import Tensor

import fparams
from fparams import implicit

D = torch.float64


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()  # train mode, running statistics tracked: the common case


def _batch(rows: int) -> List[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, rows, 2 if i % 2 == 0 else 1, generator=g, dtype=D) for i in range(4)]


def _meta_grads(strategy: str, rows: int = 6) -> Dict[str, Tensor]:
    chunks = {"chunk_size": 2} if strategy == "chunked" else {}
    net = _net()
    arch, params, buffers = fparams.split(net)
    before = copy.deepcopy(buffers)
    solve = implicit.normal_cg(maxiter=500, tol=1e-14, strict=False)

    def loss(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return loss(implicit.adapt(loss, p, xs, ys, lam=3.0, lr=0.1, steps=30, solve=solve), xq, yq)

    step = fparams.meta_value_and_grad(task, strategy=strategy, batch_stats=True, **chunks)
    grads = step(fparams.detach(params), *_batch(rows))[1]
    for k, t in buffers.items():  # batch statistics only: running statistics are left alone
        assert torch.equal(t, before[k]), (strategy, k)
    return grads


@pytest.mark.parametrize("strategy", ["vmap", "auto", "chunked"])
def test_imaml_with_a_train_mode_batchnorm_and_batch_stats_equals_the_loop(strategy: str) -> None:
    loop = _meta_grads("loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error", fparams.VmapFallbackWarning)  # "auto" keeps vmap, no demotion
        got = _meta_grads(strategy)
    for k in loop:
        torch.testing.assert_close(got[k], loop[k], rtol=1e-10, atol=1e-12)
    assert loop["0.bias"].abs().max() < 1e-10  # BatchNorm cancels it: a check that BN ran


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_imaml_batchnorm_with_one_row_per_task_fails_alike_in_every_strategy(strategy: str) -> None:
    message = (
        "a BatchNorm1d layer normalizes with batch statistics over 1 value per channel (input of "
        "shape (1, 4))"
    )
    with pytest.raises(fparams.FparamsValueError, match=re.escape(message)):
        _meta_grads(strategy, rows=1)
