"""Memory stays flat over many clone -> adapt -> backward -> detach cycles.

Three independent signals, each of which a leak of the clones would trip:

* weak references to every tensor a cycle makes (clone parameters, gradients,
  adapted parameters): once the cycles are over and ``gc`` has run, none may be
  alive, not even the last cycle's. A Python tensor object lives as long as its
  C++ tensor does, so a tensor kept by a leaked autograd graph counts as alive;
* the number of live tensor objects ``gc`` knows of;
* the process's resident memory (Linux), with networks large enough that a
  leaked clone per cycle would add tens of MiB.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from typing import Any, Callable, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import loss_fn

CYCLES = 500
Cycle = Callable[[], List["weakref.ReferenceType[Tensor]"]]


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the other two signals still apply
        return 0.0


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), Tensor))


def _measure(cycle: Cycle, n: int) -> Tuple[int, int, float]:
    """Run ``cycle`` n times; (tensors still alive, growth in live tensors, RSS growth in MiB)."""
    watched: List[weakref.ReferenceType[Tensor]] = []
    for _ in range(20):  # warm-up: allocator pools, lazy initialisation
        cycle()
    gc.collect()
    tensors, rss = _live_tensors(), _rss_mib()
    for _ in range(n):
        watched.extend(cycle())
    gc.collect()
    alive = sum(1 for r in watched if r() is not None)
    return alive, _live_tensors() - tensors, _rss_mib() - rss


class Net(nn.Module):
    """About 85 KiB of parameters; a leaked clone with its graph is several times that."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh())
        self.head = nn.Linear(128, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][-1])


def _data(rnn: bool) -> Tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shape = (2, 8, 4) if rnn else (8, 32)
    return tuple(torch.randn(*s, generator=g) for s in (shape, (8, 1), shape, (8, 1)))


def _shim_cycle(
    net: nn.Module, data: Tuple[Tensor, ...], attrs: bool, keep: Optional[List[Any]] = None
) -> Cycle:
    xs, ys, xq, yq = data

    def cycle() -> List[weakref.ReferenceType[Tensor]]:
        clone = fparams.clone_module(net)
        refs = [weakref.ref(p) for p in clone.parameters()]
        grads = torch.autograd.grad(loss_fn(clone(xs), ys), list(clone.parameters()), create_graph=True)
        refs += [weakref.ref(g) for g in grads]
        if attrs:  # learn2learn's MAML writes the step into `.update` attributes
            for p, g in zip(clone.parameters(), grads):
                p.update = -0.01 * g
            fparams.update_module(clone)
        else:
            fparams.update_module(clone, [-0.01 * g for g in grads])
        refs += [weakref.ref(p) for p in clone.parameters()]
        loss_fn(clone(xq), yq).backward()
        fparams.detach_module(clone)
        refs += [weakref.ref(p) for p in clone.parameters()]
        if keep is not None:  # only the leak self-check keeps anything
            keep.append(clone)
        return refs

    return cycle


def _functional_cycle(net: nn.Module, data: Tuple[Tensor, ...]) -> Cycle:
    xs, ys, xq, yq = data
    arch, params, _ = fparams.split(net)

    def cycle() -> List[weakref.ReferenceType[Tensor]]:
        fast = fparams.clone(params)
        grads = torch.autograd.grad(loss_fn(arch(fast, xs), ys), list(fast.values()), create_graph=True)
        fast = fparams.sgd_step(fast, dict(zip(fast, grads)), lr=0.01)
        loss_fn(arch(fast, xq), yq).backward()
        return [weakref.ref(t) for t in fast.values()] + [weakref.ref(g) for g in grads]

    return cycle


CASES = {
    "mlp-updates": lambda: _shim_cycle(Net(), _data(False), attrs=False),
    "mlp-update-attributes": lambda: _shim_cycle(Net(), _data(False), attrs=True),
    "lstm-updates": lambda: _shim_cycle(Recurrent(), _data(True), attrs=False),
    "lstm-functional": lambda: _functional_cycle(Recurrent(), _data(True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_memory_is_flat_over_500_cycles(case: str) -> None:
    torch.manual_seed(0)
    alive, tensors, rss = _measure(CASES[case](), CYCLES)
    assert alive == 0, f"{alive} tensors made by the cycles are still alive"
    assert tensors <= 10, f"{tensors} more live tensor objects after {CYCLES} cycles"
    # A clone kept per cycle adds about 0.1 MiB of resident memory: ~50 MiB here.
    assert rss < 16, f"resident memory grew by {rss:.0f} MiB over {CYCLES} cycles"


def _leak_measurement(n: int) -> Tuple[int, int, float]:
    """The shim cycle, keeping each clone (a deliberate leak)."""
    torch.manual_seed(0)
    kept: List[Any] = []
    return _measure(_shim_cycle(Net(), _data(False), attrs=False, keep=kept), n)


def test_the_measurement_catches_a_leak() -> None:
    # The same cycle, keeping each clone: the two object signals must fire.
    alive, tensors, _ = _leak_measurement(200)
    assert alive >= 200 * 5
    assert tensors >= 200 * 5


@pytest.mark.skipif(_rss_mib() == 0, reason="resident memory is read from /proc (Linux)")
def test_resident_memory_catches_a_leak_in_a_fresh_process() -> None:
    # In this process the allocator first reuses pages that earlier tests
    # freed, so a leak here may add little resident memory: that is why the
    # RSS bound above is an upper bound only. A fresh interpreter has no such
    # pool, so there the ~17 MiB kept by 200 leaked clones must show.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from tests.test_memory import _leak_measurement; print(_leak_measurement(200)[2])"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    rss = float(out.stdout.strip().splitlines()[-1])
    assert rss > 8, f"200 leaked clones added only {rss:.1f} MiB of resident memory"
