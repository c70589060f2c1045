"""Smoke run of benchmarks/bench_tasks.py: every path runs, agrees, and gets a row (no timing asserts)."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark

# Notebooks and benchmark runs take tens of seconds: CI runs them (-m slow), quick local runs skip them.
pytestmark = pytest.mark.slow


def test_quick_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench_tasks")
    result = bench.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    paths = (bench.LOOP, bench.VMAP, bench.MT_LOOP, bench.MVG, bench.FLOOR)
    rows = {(r.workload, r.path) for r in result["rows"]}
    assert rows == {(w, p) for w in ("W1", "W2") for p in paths}
    for r in result["rows"]:
        assert r.ms is not None and r.ms > 0 and r.rel_err <= bench.TOLERANCE[r.workload], r
    per_task = {(r.tasks, r.path) for r in result["per_task"]}
    assert per_task == {(n, p) for n in bench.QUICK_W3 for p in (bench.LOOP, bench.VMAP, bench.MT_LOOP)}
    for path in paths:
        assert path in out
    assert "W3: W1 per task" in out and "ms/task" in out


def test_one_workload_only(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench_tasks")
    result = bench.main(["--quick", "--threads", "1", "--workload", "W1"])
    assert {r.workload for r in result["rows"]} == {"W1"} and not result["per_task"]
    assert "W2" not in capsys.readouterr().out
