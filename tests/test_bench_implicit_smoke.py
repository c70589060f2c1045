"""Smoke run of benchmarks/bench_implicit.py: every path runs and agrees (no timing or memory asserts).

The torchopt rows need torchopt (the ``bench`` extra); without it the test is skipped.
"""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark

# Notebooks and benchmark runs take tens of seconds: CI runs them (-m slow), quick local runs skip them.
pytestmark = pytest.mark.slow


def test_quick_run_has_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench_implicit")
    result = bench.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    paths = [bench.FP_VMAP, bench.FP_LOOP] + ([bench.TORCHOPT] if bench.have_torchopt() else [])
    rows = {(r.config, r.path) for r in result["rows"]}
    assert rows == {(c, p) for c in ("fixed", "converged") for p in paths}
    for r in result["rows"]:
        assert r.ms > 0 and r.rel_err <= bench.TOLERANCE, r
    memory = [(r.path, r.steps) for r in result["memory"]]
    assert memory == [("implicit", 1), ("implicit", 3), ("unrolled", 3)]
    assert all(r.peak_mb >= r.base_mb > 0 for r in result["memory"])
    assert "implicit@3 / unrolled@3" in out


def test_torchopt_rows_agree_with_fparams() -> None:
    pytest.importorskip("torchopt")
    bench = load_benchmark("bench_implicit")
    result = bench.main(["--quick", "--threads", "1", "--part", "torchopt"])
    assert {r.path for r in result["rows"]} == {bench.FP_VMAP, bench.FP_LOOP, bench.TORCHOPT}
