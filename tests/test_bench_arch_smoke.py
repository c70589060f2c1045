"""Smoke runs of benchmarks/bench_resnet12.py, bench_lora.py and bench_convnext.py at tiny sizes:
every path runs and gets a row, and fparams' meta-gradient is higher's (no timing asserts)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import load_benchmark

# Notebooks and benchmark runs take tens of seconds: CI runs them (-m slow), quick local runs skip them.
pytestmark = pytest.mark.slow

TINY_RESNET = [
    "--width",
    "2",
    "--image",
    "16",
    "--ways",
    "2",
    "--shots",
    "1",
    "--queries",
    "1",
    "--steps",
    "1",
    "--tasks",
    "2",
    "--repeats",
    "1",
    "--no-memory",
]
TINY_LORA = [
    "--layers",
    "1",
    "--embd",
    "8",
    "--heads",
    "2",
    "--vocab",
    "16",
    "--seq",
    "6",
    "--rank",
    "2",
    "--shots",
    "2",
    "--tasks",
    "2",
    "--steps",
    "1",
    "--repeats",
    "1",
    "--no-memory",
]


def test_resnet12_quick_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench_resnet12")
    result = bench.main(TINY_RESNET)
    out = capsys.readouterr().out
    for algo in ("maml", "anil"):
        assert {"fparams", "fparams_checkpoint"} <= set(result[algo])
        assert all(row["s"] > 0 for row in result[algo].values())
    assert "MAML on ResNet-12" in out and "ANIL on ResNet-12" in out


@pytest.mark.parametrize("algo", ["maml", "anil"])
@pytest.mark.parametrize("peer", ["higher", "learn2learn"])
def test_resnet12_fparams_and_peer_agree(peer: str, algo: str) -> None:
    # learn2learn 0.2 builds on Python <= 3.10 only: its cases run where it is installed
    pytest.importorskip(peer)
    bench = load_benchmark("bench_resnet12")
    args = bench.parse(TINY_RESNET)
    torch.manual_seed(0)
    net = bench.resnet12(args.width, args.ways).double()
    data = [t.double() if t.is_floating_point() else t for t in bench.episode(args)]
    head = str(len(net) - 1)
    _, grads = bench._fparams_step(net, data, algo, head, args, False)()
    peer_step = bench._higher_step if peer == "higher" else bench._l2l_step
    peer_step(net, data, algo, args)()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[name] * args.tasks, rtol=1e-9, atol=1e-12)


def test_lora_quick_run_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("peft")
    bench = load_benchmark("bench_lora")
    result = bench.main(TINY_LORA)
    out = capsys.readouterr().out
    assert {"fparams", "fparams_checkpoint", "fparams.MAML"} <= set(result)
    assert "MAML over LoRA" in out


def test_convnext_quick_run_times_every_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    bench = load_benchmark("bench_convnext")
    tiny = ["--depths", "1,1", "--widths", "4,8", "--image", "8", "--ways", "2", "--repeats", "1"]
    times = bench.main(tiny)
    assert set(times) == {"auto", "loop", "vmap"} and all(t > 0 for t in times.values())
    assert "x loop" in capsys.readouterr().out
