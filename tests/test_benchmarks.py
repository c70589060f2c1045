"""The benchmark script runs end to end (a smoke test: no timing is asserted)."""

from __future__ import annotations

import pytest
import torch

import fparams
from tests.helpers import load_benchmark

# Notebooks and benchmark runs take tens of seconds: CI runs them (-m slow), quick local runs skip them.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_module_api")


@pytest.fixture
def one_thread():
    # Tiny convolutions are slower on several threads, badly so on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_run_has_a_row_for_every_path_of_every_model(bench, capsys):
    rows = bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--target-ms", "0"])
    models = {case.name for case in bench.cases(quick=True)}
    assert {(r.case, r.path) for r in rows} == {(m, p) for m in models for p in bench.PATHS}
    for r in rows:
        assert r.total_ms > 0
        assert (r.adapt_ms is None) == (r.path == bench.FORWARD)
    table = capsys.readouterr().out
    for path in bench.PATHS:
        assert path in table


def test_references_match_the_shims(bench, one_thread):
    # The references time the same work as fparams: same values, same graph.
    torch.manual_seed(0)
    net = bench.ResNet18Like(2)
    x = torch.randn(2, 3, 8, 8)
    params = list(net.parameters())
    updates = [torch.randn_like(p) for p in params]
    adapted = {
        "shallow": bench.add_updates(bench.shallow_clone(net), updates),
        "deepcopy": bench.add_updates(bench.deepcopy_clone(net), updates),
        "shims": fparams.update_module(fparams.clone_module(net), updates),
    }
    for name, model in adapted.items():
        for p, q, u in zip(model.parameters(), params, updates):
            assert torch.allclose(p, q + u), name
            assert p.grad_fn is not None, name
    net.eval()
    for model in adapted.values():
        model.eval()
    ref = adapted["shims"](x)
    assert torch.allclose(adapted["shallow"](x), ref)
    assert torch.allclose(adapted["deepcopy"](x), ref)
