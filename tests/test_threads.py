"""Concurrent calls through one module: every call sees its own tensors.

A call puts its params into the module's slots for the length of the forward;
without the per-module lock, a second thread's swap lands in the middle of the
first thread's forward. The module below sleeps between its two layers, which
makes that window wide enough to hit on every run of the old code.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

import fparams


class SlowTwoLayer(nn.Module):
    """Reads its first weight, yields the GIL, then reads its second weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        time.sleep(0.0005)  # another thread runs here
        out: Tensor = self.b(h)
        return out


def _run_threads(calls: int, threads: int) -> int:
    """The number of wrong outputs when ``threads`` threads each make ``calls`` calls on one module."""
    torch.manual_seed(0)
    net = SlowTwoLayer()
    arch, params, _ = fparams.split(net)
    x = torch.randn(4, 3)
    per_thread: List[Dict[str, Tensor]] = [
        {k: v.detach() + i for k, v in params.items()} for i in range(threads)
    ]
    reference = [torch.func.functional_call(net, p, (x,)).detach() for p in per_thread]
    wrong = [0] * threads
    start = threading.Barrier(threads)

    def work(i: int) -> None:
        start.wait()
        for _ in range(calls):
            out = arch(per_thread[i], x)
            if not torch.equal(out, reference[i]):
                wrong[i] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in pool), "a thread hung"
    return sum(wrong)


def test_concurrent_calls_on_one_module_each_see_their_own_params() -> None:
    assert _run_threads(calls=40, threads=3) == 0


def test_the_module_itself_is_left_as_it_was_after_concurrent_calls() -> None:
    torch.manual_seed(0)
    net = SlowTwoLayer()
    own = {k: v for k, v in net.named_parameters()}
    arch, params, _ = fparams.split(net)
    fresh = [{k: v.detach() * (i + 2) for k, v in params.items()} for i in range(3)]
    pool = [threading.Thread(target=arch, args=(p, torch.randn(2, 3))) for p in fresh]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    for k, v in net.named_parameters():
        assert v is own[k], k


def test_two_architectures_over_one_module_share_the_lock() -> None:
    net = SlowTwoLayer()
    first, _, _ = fparams.split(net)
    second, _, _ = fparams.split(net)
    assert first._lock is second._lock
    other, _, _ = fparams.split(SlowTwoLayer())
    assert other._lock is not first._lock


def test_a_nested_call_on_the_same_module_in_one_thread_does_not_deadlock() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.arch: Any = None

        def forward(self, x: Tensor, depth: int = 0) -> Tensor:
            out: Tensor = self.arch(dict(self.named_parameters()), x, depth=1) if depth == 0 else self.lin(x)
            return out

    net = Outer()
    arch, params, _ = fparams.split(net)
    net.arch = arch
    torch.testing.assert_close(arch(params, torch.ones(1, 2)), net.lin(torch.ones(1, 2)))
