"""Time clone + update + forward: fparams against a shallow copy and a deepcopy.

One process, one run: every path is timed on the same model, the same input
and the same precomputed updates, and the paths take turns (round-robin, in a
rotating order) so that a noisy neighbour or a warming cache hits them all
alike. Each number is the median over many samples, in milliseconds per
iteration. Ratios are relative to the shallow-copy reference.

Paths:

* ``shallow copy (l2l)``: learn2learn's method, written out here: each module
  is copied with ``__new__`` and a copy of its ``__dict__``, ``_parameters``,
  ``_buffers`` and ``_modules``; each parameter is ``clone()``d (once per
  tensor object); then ``p + u`` is written into the ``_parameters`` slots.
  It is a little leaner than learn2learn's own code, which sets four
  attributes per module through ``Module.__setattr__`` and passes updates as
  ``.update`` attributes on the tensors: a strict bar.
* ``copy.deepcopy``: ``copy.deepcopy(module)`` with the memo pre-filled so
  that the parameters become ``clone()``s still in the graph (buffers are deep
  copied), then the same ``p + u`` write-back.
* ``fparams shims``: ``fparams.clone_module`` then ``fparams.update_module``.
* ``fparams dict``: ``fparams.split`` once, outside the loop; per iteration
  ``fparams.clone`` -> ``fparams.apply_updates`` -> ``arch(params, x)``.
* ``dict, no clone``: the same without ``fparams.clone``, which the dict path
  does not need: ``apply_updates`` already returns new tensors, in the graph,
  and leaves ``params`` as they were.

The updates are ``-lr * g`` with ``g`` from ``torch.autograd.grad(...,
create_graph=True)``, computed once: every path pays for the same tensor
work, so the differences are the cost of each path's bookkeeping.

Two columns: ``clone+update`` (no forward) and ``+forward`` (the adapted model
run on the input). For scale, ``tensor ops only`` is the floor every path
shares (``p.clone() + u`` per parameter, no bookkeeping; its ``+forward`` runs
the original module) and ``forward only`` runs the original module alone.

Torch runs on one thread while timing (``--threads``), as
``torch.utils.benchmark.Timer`` does. On a busy machine ``--clock cpu`` (the
process's CPU time) is steadier than wall time.

Run ``python benchmarks/bench_module_api.py`` (a few minutes on a 2-core CPU),
or add ``--quick`` for a few-second smoke run on small models; ``--models mlp``
runs only the models whose name contains ``mlp``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import os
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

import fparams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared timing
from _timing import CLOCKS, time_interleaved  # noqa: E402

SHALLOW = "shallow copy (l2l)"
DEEPCOPY = "copy.deepcopy"
SHIMS = "fparams shims"
DICT = "fparams dict"
DICT_NO_CLONE = "dict, no clone"
FLOOR = "tensor ops only"
FORWARD = "forward only"
PATHS = (SHALLOW, DEEPCOPY, SHIMS, DICT, DICT_NO_CLONE, FLOOR, FORWARD)


# -- models -----------------------------------------------------------------


def deep_mlp(depth: int = 100, width: int = 64) -> nn.Module:
    """``depth`` Linear layers of ``width`` units with ReLU between them."""
    layers: List[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(width, width))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block, with a projection shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + skip)


class ResNet18Like(nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks, pooled linear head), for 32x32 inputs.

    ``width`` is the first stage's channel count (ResNet-18 has 64); the
    stages double it. 62 parameter tensors and 60 buffers whatever the width.
    """

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages = []
        cin = width
        for i in range(4):
            cout = width * 2**i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


# -- references -------------------------------------------------------------


def shallow_clone(module: Any, memo: Optional[Dict[int, Tensor]] = None) -> Any:
    """learn2learn's ``clone_module``: a recursive shallow copy of the tree.

    One ``clone()`` per parameter object (tied weights stay tied); buffers that
    require grad are cloned, others shared. No RNN handling: the benchmark
    models have none.
    """
    if not isinstance(module, nn.Module):
        return module
    memo = {} if memo is None else memo
    new = module.__new__(type(module))
    state = module.__dict__.copy()
    params: Dict[str, Optional[Tensor]] = module._parameters.copy()  # type: ignore[assignment]
    state["_parameters"] = params
    buffers = state["_buffers"] = module._buffers.copy()
    children = state["_modules"] = module._modules.copy()
    new.__dict__ = state
    for key, p in params.items():
        if p is not None:
            c = memo.get(id(p))
            if c is None:
                c = memo[id(p)] = p.clone()
            params[key] = c
    for key, b in buffers.items():
        if b is not None and b.requires_grad:
            c = memo.get(id(b))
            if c is None:
                c = memo[id(b)] = b.clone()
            buffers[key] = c
    for key, child in children.items():
        children[key] = shallow_clone(child, memo)
    return new


def add_updates(module: nn.Module, updates: Sequence[Tensor]) -> nn.Module:
    """learn2learn's ``update_module``: ``p + u`` into each slot, in place, tied slots once."""
    by_id = {id(p): u for p, u in zip(module.parameters(), updates)}
    done: Dict[int, Tensor] = {}
    for m in module.modules():
        slots: Dict[str, Optional[Tensor]] = m._parameters  # type: ignore[assignment]
        for key, p in slots.items():
            if p is None:
                continue
            new = done.get(id(p))
            if new is None:
                new = done[id(p)] = p + by_id[id(p)]
            slots[key] = new
    return module


def deepcopy_clone(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` whose parameters are ``clone()``s still in the graph."""
    memo: Dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = p.clone()
    return copy.deepcopy(module, memo)


# -- timing -----------------------------------------------------------------


class Case(NamedTuple):
    name: str
    model: nn.Module
    x: Tensor


class Row(NamedTuple):
    case: str
    path: str
    adapt_ms: Optional[float]  # clone + update; None for "forward only"
    total_ms: float  # clone + update + forward


def _paths(case: Case, lr: float = 0.01) -> Dict[str, Dict[str, Callable[[], Any]]]:
    """For each path: ``adapt`` (clone + update) and ``total`` (clone + update + forward)."""
    net, x = case.model, case.x
    params = list(net.parameters())
    loss = net(x).pow(2).mean()
    updates = [-lr * g for g in torch.autograd.grad(loss, params, create_graph=True)]
    arch, pdict, _ = fparams.split(net)
    udict = dict(zip(pdict, updates))

    def shallow() -> nn.Module:
        return add_updates(shallow_clone(net), updates)

    def deep() -> nn.Module:
        return add_updates(deepcopy_clone(net), updates)

    def shims() -> nn.Module:
        return fparams.update_module(fparams.clone_module(net), updates)

    def floor() -> List[Tensor]:
        return [p.clone() + u for p, u in zip(params, updates)]

    def dict_adapt() -> Dict[str, Tensor]:
        return fparams.apply_updates(fparams.clone(pdict), udict)

    def dict_no_clone() -> Dict[str, Tensor]:
        return fparams.apply_updates(pdict, udict)

    return {
        SHALLOW: {"adapt": shallow, "total": lambda: shallow()(x)},
        DEEPCOPY: {"adapt": deep, "total": lambda: deep()(x)},
        SHIMS: {"adapt": shims, "total": lambda: shims()(x)},
        DICT: {"adapt": dict_adapt, "total": lambda: arch(dict_adapt(), x)},
        DICT_NO_CLONE: {"adapt": dict_no_clone, "total": lambda: arch(dict_no_clone(), x)},
        FLOOR: {"adapt": floor, "total": lambda: (floor(), net(x))},
        FORWARD: {"total": lambda: net(x)},
    }


def run_case(
    case: Case, repeats: int, warmup: int, target_s: float, clock: Callable[[], float] = time.perf_counter
) -> List[Row]:
    paths = _paths(case)
    fns = {}
    for path, kinds in paths.items():
        for kind, fn in kinds.items():
            fns[f"{path}/{kind}"] = fn
    gc.collect()
    med = time_interleaved(fns, repeats, warmup, target_s, clock)
    rows = []
    for path, kinds in paths.items():
        adapt = med[f"{path}/adapt"] * 1e3 if "adapt" in kinds else None
        rows.append(Row(case.name, path, adapt, med[f"{path}/total"] * 1e3))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    head = f"{'model':<18} {'path':<20} {'clone+update ms':>15} {'ratio':>6} {'+forward ms':>12} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for case, grouped in itertools.groupby(rows, key=lambda r: r.case):
        group = list(grouped)
        ref = next(r for r in group if r.path == SHALLOW)
        for r in group:
            if r.adapt_ms is None or ref.adapt_ms is None:
                adapt, ratio = f"{'-':>15}", f"{'-':>6}"
            else:
                adapt, ratio = f"{r.adapt_ms:>15.3f}", f"{r.adapt_ms / ref.adapt_ms:>6.2f}"
            total = f"{r.total_ms:>12.3f} {r.total_ms / ref.total_ms:>6.2f}"
            lines.append(f"{case:<18} {r.path:<20} {adapt} {ratio} {total}")
    return "\n".join(lines)


def cases(quick: bool) -> List[Case]:
    torch.manual_seed(0)
    if quick:
        return [
            Case("mlp 10x16", deep_mlp(10, 16), torch.randn(4, 16)),
            Case("resnet18-like w4", ResNet18Like(4), torch.randn(2, 3, 8, 8)),
        ]
    return [
        Case("mlp 100x64", deep_mlp(100, 64), torch.randn(32, 64)),
        Case("resnet18-like w64", ResNet18Like(64), torch.randn(2, 3, 32, 32)),
        Case("resnet18-like w16", ResNet18Like(16), torch.randn(2, 3, 32, 32)),
    ]


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few repetitions: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="samples per path (median taken)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per path first")
    parser.add_argument("--target-ms", type=float, default=None, help="length of one sample")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while timing (default 1, as torch.utils.benchmark)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time, steadier on a busy machine (with --threads 1)",
    )
    parser.add_argument("--models", default=None, help="comma-separated substrings: run only matching models")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 41)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    target_ms = args.target_ms if args.target_ms is not None else (1.0 if args.quick else 25.0)
    wanted = args.models.split(",") if args.models else None

    print(f"torch {torch.__version__}, fparams {fparams.__version__}, {args.threads} thread(s)")
    print(
        f"{args.clock} clock, median of {repeats} interleaved samples of ~{target_ms:g} ms; "
        f"ratios vs {SHALLOW!r}\n"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows: List[Row] = []
        for case in cases(args.quick):
            if wanted is None or any(w in case.name for w in wanted):
                rows += run_case(case, repeats, warmup, target_ms / 1e3, CLOCKS[args.clock])
    finally:
        torch.set_num_threads(threads)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
