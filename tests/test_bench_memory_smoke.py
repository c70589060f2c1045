"""Smoke runs of benchmarks/bench_memory.py and bench_toy.py (no memory or timing asserts).

Every path of the memory benchmark runs on a tiny net, in this process, and
the paths that must compute the same meta-gradient do; one row runs in a
fresh interpreter as the tables do. The toy benchmark checks its paths agree
before it times them.
"""

from __future__ import annotations

import math
from types import ModuleType

import pytest

from tests.helpers import load_benchmark

# Notebooks and benchmark runs take tens of seconds: CI runs them (-m slow), quick local runs skip them.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def memory() -> ModuleType:
    return load_benchmark("bench_memory")


def test_every_path_computes_the_same_meta_gradient(memory: ModuleType) -> None:
    grads = {}
    for path in memory.STEP_PATHS + memory.TASK_PATHS:
        net, data = memory._setup(True, 3)
        grads[path] = [g.detach().clone() for g in memory._meta_step(path, 2, net, data)()]
    ref = grads["map_tasks.backward loop"]
    for path in memory.TASK_PATHS:
        for got, want in zip(grads[path], ref):
            assert got.shape == want.shape
            assert float((got - want).abs().max()) <= 1e-4 * (1 + float(want.abs().max())), path


def test_a_row_in_a_fresh_interpreter(memory: ModuleType) -> None:
    row = memory._in_fresh_interpreter("adapt(checkpoint=True)", 2, 1, True, True)
    assert row.path == "adapt(checkpoint=True)" and not math.isnan(row.peak_mib)
    assert row.seconds > 0 and row.grad_sq > 0


def test_time_mode_prints_a_ratio_per_path(memory: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    memory.main(["--quick", "--time", "--repeats", "1", "--paths", "adapt", "adapt(checkpoint=True)"])
    out = capsys.readouterr().out
    assert "| adapt | " in out and "| adapt(checkpoint=True) | " in out


def test_toy_benchmark_quick_run(capsys: pytest.CaptureFixture[str]) -> None:
    toy = load_benchmark("bench_toy")
    ms = toy.main(["--quick"])
    assert set(ms) == {"MAML class", "map_tasks loop", "meta_value_and_grad loop", "map_tasks vmap"}
    assert "vs MAML class" in capsys.readouterr().out
