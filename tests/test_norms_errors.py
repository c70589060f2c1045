"""exact_norms: one row per task fails alike in every strategy (issue 16 item 7), and its
arguments are checked (issue 16 validation)."""

from __future__ import annotations

import re
from typing import Any, Dict

import pytest
import torch
from torch import Tensor, nn

import fparams

D = torch.float64


def _one_value(layer: str, shape: str, over: str = "value per channel") -> str:
    return (
        f"fparams.exact_norms: a {layer} layer normalizes with batch statistics over 1 {over} "
        f"(input of shape {shape})"
    )


@pytest.mark.parametrize("strategy", ["loop", "vmap", "auto"])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_batchnorm_with_one_row_per_task_raises_the_same_error_in_every_strategy(
    strategy: str, batch_stats: bool
) -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False)).double()
    arch, params, _ = fparams.split(net)

    def task(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        fast = fparams.adapt(lambda q, x: arch(q, x).pow(2).mean(), p, x, lr=0.1, steps=1)
        return arch(fast, x).pow(2).mean()

    step = fparams.meta_value_and_grad(task, strategy=strategy, batch_stats=batch_stats)
    with pytest.raises(
        fparams.FparamsValueError, match=re.escape(_one_value("BatchNorm1d", "(1, 3)"))
    ) as info:
        step(params, torch.randn(4, 1, 2, dtype=D))
    assert "eval mode" in str(info.value) and "LayerNorm" in str(info.value)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_instance_norm_over_one_position_raises_the_same_error_in_every_strategy(strategy: str) -> None:
    norm = nn.InstanceNorm1d(3, affine=True).double()
    arch, params, _ = fparams.split(norm)
    mapped = fparams.map_tasks(arch, strategy=strategy)
    message = _one_value("InstanceNorm1d", "(2, 3, 1)", "spatial position")
    with pytest.raises(fparams.FparamsValueError, match=re.escape(message)):
        mapped(params, torch.randn(4, 2, 3, 1, dtype=D))


def test_two_rows_per_task_still_run_in_both_strategies() -> None:
    net = nn.BatchNorm1d(3).double()
    arch, params, _ = fparams.split(net)
    x = torch.randn(4, 2, 3, dtype=D)
    loop = fparams.map_tasks(arch, strategy="loop", batch_stats=True)(params, x)
    vmap = fparams.map_tasks(arch, strategy="vmap", batch_stats=True)(params, x)
    torch.testing.assert_close(vmap, loop, rtol=1e-10, atol=1e-12)


def test_eval_mode_with_one_row_uses_running_statistics_and_runs() -> None:
    net = nn.BatchNorm1d(3).double().eval()
    arch, params, _ = fparams.split(net)
    x = torch.randn(4, 1, 3, dtype=D)
    out = fparams.map_tasks(arch, strategy="vmap")(params, x)
    torch.testing.assert_close(out, torch.stack([net(xi) for xi in x]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(batch_stats="False"),
            "fparams.exact_norms: `batch_stats` must be True or False; got str 'False'.",
        ),
        (dict(batch_stats=1), "fparams.exact_norms: `batch_stats` must be True or False; got int 1."),
        (dict(always=None), "fparams.exact_norms: `always` must be True or False; got NoneType None."),
    ],
)
def test_exact_norms_checks_its_flags(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(fparams.FparamsTypeError, match=re.escape(message)):
        fparams.exact_norms(**kwargs)
