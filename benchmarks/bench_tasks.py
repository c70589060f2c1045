"""Time one MAML meta-step over a batch of tasks, five ways, in one process.

A meta-step is the forward pass (inner adaptation on each task's support set,
loss on its query set) plus the meta-gradient of the mean query loss. Every
path computes the same meta-gradient; that is checked (float32, relative
error of the whole gradient vector) before anything is timed.

Paths:

* ``MAML loop (l2l)``: learn2learn's way with :class:`fparams.MAML`: per task
  ``learner = maml.clone()``, ``learner.adapt(loss)`` for each inner step,
  the query loss divided by the number of tasks, ``.backward()``.
* ``map_tasks vmap``: ``fparams.map_tasks(task, strategy="vmap")`` with
  :func:`fparams.adapt` inside, then ``.mean().backward()``.
* ``map_tasks loop``: the same with ``strategy="loop"`` (what ``"auto"``
  picks when vmap does not pay off).
* ``meta_value_and_grad``: :func:`fparams.meta_value_and_grad` (pure, eager,
  ``torch.func.grad`` of the mapped objective; strategy ``"auto"``).
* ``compiled``: the same with ``compile=True``. The first call (compilation)
  is timed on its own and reported as ``compile s``; the per-step time
  excludes it.
* ``floor (hand-batched)``: written by hand for this one network: the
  weights are expanded to one copy per task, the forward runs on all tasks at
  once (``torch.baddbmm`` for the MLP, a grouped convolution for the conv
  net) and the inner steps use ``torch.autograd.grad(create_graph=True)``.
  No library code, no vmap: the cost of the arithmetic alone.

Workloads:

* ``W1``: sine-wave regression (amplitude in [0.1, 5], phase in [0, pi],
  x in [-5, 5]), MLP 1-40-40-1 with ReLU, 32 tasks, 10 support and 10 query
  points, 5 inner steps, lr 0.01, second order.
* ``W2``: a 4-block conv net (conv3x3-BatchNorm-ReLU-maxpool2, 64 channels,
  then linear to 5 classes) on 28x28 single-channel inputs, 5-way 1-shot, 15
  queries per class, 8 tasks, 1 inner step, lr 0.4, second order. BatchNorm
  normalises with each task's batch statistics: ``track_running_stats=False``
  for the module (so the loop computes the same thing) and
  ``map_tasks(batch_stats=True)``.
* ``W3``: W1 at 1, 8, 32 and 128 tasks, reported as ms per task.

Timing: each number is the median over interleaved samples (the paths take
turns in a rotating order, so a noisy neighbour hits them all alike), in
milliseconds per meta-step. Ratios are against the MAML loop and against the
floor.

Run ``python benchmarks/bench_tasks.py`` (tens of minutes on a busy 2-core
CPU: W1 compiles for minutes, W2's steps take seconds),
``--workload W1|W2|W3|all``, ``--clock cpu`` to time the process's CPU
time (steadier when other processes share the cores), ``--no-compile`` to skip compilation
(``--compile-w2`` to compile W2 as well, off by default), ``--threads N``
for ``torch.set_num_threads``, or ``--quick`` for a smoke run on tiny sizes
(no compilation unless ``--compile``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fparams
import fparams.datasets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared timing
from _timing import CLOCKS, time_interleaved  # noqa: E402

LOOP = "MAML loop (l2l)"
VMAP = "map_tasks vmap"
MT_LOOP = "map_tasks loop"
MVG = "meta_value_and_grad"
COMPILED = "compiled"
FLOOR = "floor (hand-batched)"
#: Largest relative error ``||g - g_ref|| / ||g_ref||`` of the meta-gradient (float32).
#: Float32 rounding grows with depth: W2's four conv + BatchNorm blocks with
#: lr 0.4 differ by about 1e-4 between exact paths (in float64 every path
#: agrees with the MAML loop to ~1e-14; the tests check float64).
TOLERANCE = {"W1": 1e-4, "W2": 1e-3}


class Sizes(NamedTuple):
    tasks: int
    support: int  # W1: points; W2: shots per class
    query: int  # W1: points; W2: queries per class
    steps: int
    width: int  # W1: hidden units; W2: channels
    lr: float
    side: int = 28  # W2: image height and width


W1_SIZES = Sizes(tasks=32, support=10, query=10, steps=5, width=40, lr=0.01)
W2_SIZES = Sizes(tasks=8, support=1, query=15, steps=1, width=64, lr=0.4)
W3_TASKS = (1, 8, 32, 128)
WAYS = 5
QUICK_W1 = Sizes(tasks=4, support=5, query=5, steps=2, width=8, lr=0.01)
QUICK_W2 = Sizes(tasks=2, support=1, query=2, steps=1, width=4, lr=0.4, side=16)
QUICK_W3 = (1, 2)


class Row(NamedTuple):
    workload: str
    path: str
    ms: Optional[float]  # per meta-step; None when not run
    rel_err: Optional[float]  # of the meta-gradient against the MAML loop
    compile_s: Optional[float] = None
    note: str = ""


class PerTaskRow(NamedTuple):
    tasks: int
    path: str
    ms: float  # per meta-step
    rel_err: float


# -- workloads ----------------------------------------------------------------


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
    )


def sine_tasks(n: int, support: int, query: int) -> List[Tensor]:
    """``xs, ys, xq, yq``, each ``(n, points, 1)``: fparams.datasets' sine tasks, drawn from torch's seed."""
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    return list(fparams.datasets.sine_tasks(n, support, query, generator=generator).data())


def conv4(channels: int, ways: int = WAYS) -> nn.Module:
    """The MAML / Prototypical-networks backbone for 28x28 inputs, batch-statistics BatchNorm."""
    layers: List[nn.Module] = []
    cin = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(cin, channels, 3, padding=1),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        cin = channels
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, ways))


def image_tasks(n: int, shots: int, queries: int, side: int = 28, ways: int = WAYS) -> List[Tensor]:
    """``xs, ys, xq, yq``: images ``(n, ways * k, 1, side, side)`` and labels ``(n, ways * k)``."""

    def part(k: int) -> List[Tensor]:
        x = torch.randn(n, ways * k, 1, side, side)
        y = torch.arange(ways).repeat_interleave(k).expand(n, -1).contiguous()
        return [x, y]

    return part(shots) + part(queries)


class Workload(NamedTuple):
    name: str
    net: nn.Module
    data: List[Tensor]
    loss: Callable[[Tensor, Tensor], Tensor]
    sizes: Sizes
    batch_stats: bool
    floor: Callable[[nn.Module, List[Tensor], Sizes], List[Tensor]]


# -- the floor: fully batched by hand ---------------------------------------------


def _mlp_forward(ws: Sequence[Tensor], x: Tensor) -> Tensor:
    h = x
    for i in range(0, len(ws), 2):
        h = torch.baddbmm(ws[i + 1].unsqueeze(1), h, ws[i].transpose(1, 2))
        if i + 2 < len(ws):
            h = h.relu()
    return h


def _per_task_mse(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).pow(2).flatten(1).mean(1)


def _hand_batched(
    net: nn.Module,
    data: List[Tensor],
    sizes: Sizes,
    forward: Callable[..., Tensor],
    loss: Callable[..., Tensor],
) -> List[Tensor]:
    # The floor: weights expanded per task, inner steps with autograd.grad(create_graph=True).
    xs, ys, xq, yq = data
    n = xs.size(0)
    ws = [p.expand(n, *p.shape) for p in net.parameters()]
    for _ in range(sizes.steps):
        inner = loss(forward(ws, xs), ys).sum()
        grads = torch.autograd.grad(inner, ws, create_graph=True)
        ws = [w - sizes.lr * g for w, g in zip(ws, grads)]
    loss(forward(ws, xq), yq).mean().backward()
    return [p.grad for p in net.parameters()]  # type: ignore[misc]


def mlp_floor(net: nn.Module, data: List[Tensor], sizes: Sizes) -> List[Tensor]:
    return _hand_batched(net, data, sizes, _mlp_forward, _per_task_mse)


def _conv_forward(ws: Sequence[Tensor], x: Tensor) -> Tensor:
    # x: (tasks, batch, 1, 28, 28). Tasks become channel groups of one grouped
    # convolution; BatchNorm's per-channel batch statistics are then per task.
    n, b = x.shape[:2]
    h = x.transpose(0, 1).reshape(b, n * x.size(2), *x.shape[3:])
    for i in range(0, 16, 4):
        w, bias, gamma, beta = ws[i : i + 4]
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), bias.reshape(-1), padding=1, groups=n)
        h = F.batch_norm(h, None, None, gamma.reshape(-1), beta.reshape(-1), training=True)
        h = F.max_pool2d(h.relu(), 2)
    feats = h.reshape(b, n, -1).transpose(0, 1)  # (tasks, batch, channels)
    return torch.baddbmm(ws[17].unsqueeze(1), feats, ws[16].transpose(1, 2))


def _per_task_ce(logits: Tensor, y: Tensor) -> Tensor:
    n, b = y.shape
    return F.cross_entropy(logits.reshape(n * b, -1), y.reshape(-1), reduction="none").reshape(n, b).mean(1)


def conv_floor(net: nn.Module, data: List[Tensor], sizes: Sizes) -> List[Tensor]:
    return _hand_batched(net, data, sizes, _conv_forward, _per_task_ce)


def w1(sizes: Sizes, tasks: Optional[int] = None) -> Workload:
    net = mlp(sizes.width)
    data = sine_tasks(sizes.tasks if tasks is None else tasks, sizes.support, sizes.query)
    return Workload("W1", net, data, F.mse_loss, sizes, False, mlp_floor)


def w2(sizes: Sizes) -> Workload:
    net = conv4(sizes.width)
    data = image_tasks(sizes.tasks, sizes.support, sizes.query, sizes.side)
    return Workload("W2", net, data, F.cross_entropy, sizes, True, conv_floor)


# -- the paths ----------------------------------------------------------------------


def _grads_of(net: nn.Module) -> List[Tensor]:
    return [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]


def paths(wl: Workload, compile: bool) -> Dict[str, Callable[[], List[Tensor]]]:
    """Each path: one meta-step that leaves the meta-gradient in a list (net's parameter order)."""
    net, data, loss, sizes = wl.net, wl.data, wl.loss, wl.sizes
    n = data[0].size(0)
    maml = fparams.MAML(net, lr=sizes.lr)
    arch, params, _ = fparams.split(net)

    def loss_fn(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss(arch(p, x), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        fast = fparams.adapt(loss_fn, p, xs, ys, lr=sizes.lr, steps=sizes.steps)
        return loss_fn(fast, xq, yq)

    def maml_loop() -> List[Tensor]:
        net.zero_grad(set_to_none=True)
        for i in range(n):
            xs, ys, xq, yq = (d[i] for d in data)
            learner = maml.clone()
            for _ in range(sizes.steps):
                learner.adapt(loss(learner(xs), ys))
            (loss(learner(xq), yq) / n).backward()
        return [p.grad for p in net.parameters()]  # type: ignore[misc]

    def backward_path(strategy: str) -> Callable[[], List[Tensor]]:
        mapped = fparams.map_tasks(task, strategy=strategy, batch_stats=wl.batch_stats)

        def run() -> List[Tensor]:
            net.zero_grad(set_to_none=True)
            mapped(params, *data).mean().backward()
            return [p.grad for p in net.parameters()]  # type: ignore[misc]

        return run

    def value_and_grad_path(compiled: bool) -> Callable[[], List[Tensor]]:
        step = fparams.meta_value_and_grad(task, batch_stats=wl.batch_stats, compile=compiled)

        def run() -> List[Tensor]:
            _, grads = step(params, *data)
            return list(grads.values())

        return run

    def floor() -> List[Tensor]:
        net.zero_grad(set_to_none=True)
        return wl.floor(net, data, sizes)

    out = {
        LOOP: maml_loop,
        VMAP: backward_path("vmap"),
        MT_LOOP: backward_path("loop"),
        MVG: value_and_grad_path(False),
    }
    if compile:
        out[COMPILED] = value_and_grad_path(True)
    out[FLOOR] = floor
    return out


def rel_err(got: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    diff = torch.cat([(a - b).flatten() for a, b in zip(got, ref)])
    return float((diff.norm() / torch.cat([b.flatten() for b in ref]).norm()).detach())


# -- timing -----------------------------------------------------------------------


def _first_call(fn: Callable[[], List[Tensor]]) -> tuple:
    """Run ``fn`` once; return (its result, seconds, fallback warning text or "")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fparams.CompileFallbackWarning)
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    fell_back = [str(w.message) for w in caught if issubclass(w.category, fparams.CompileFallbackWarning)]
    return result, seconds, fell_back[0] if fell_back else ""


def run_workload(
    wl: Workload,
    compile: bool,
    repeats: int,
    warmup: int,
    target_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> List[Row]:
    fns = paths(wl, compile)
    ref = _grads_of_call(fns[LOOP])
    errors: Dict[str, float] = {}
    compile_s: Dict[str, float] = {}
    notes: Dict[str, str] = {}
    for name, fn in fns.items():
        got, seconds, fell_back = _first_call(fn)
        if name == COMPILED:
            compile_s[name] = seconds
            if fell_back:
                notes[name] = "fell back to eager: " + fell_back[:120]
        errors[name] = rel_err([g.detach().clone() for g in got], ref)
        if errors[name] > TOLERANCE[wl.name]:
            raise AssertionError(
                f"{wl.name}: {name} meta-gradient differs from the MAML loop's: relative error "
                f"{errors[name]:.2e} > {TOLERANCE[wl.name]:g}"
            )
    med = time_interleaved(fns, repeats, warmup, target_s, clock)
    return [
        Row(wl.name, name, med[name] * 1e3, errors[name], compile_s.get(name), notes.get(name, ""))
        for name in fns
    ]


def _grads_of_call(fn: Callable[[], List[Tensor]]) -> List[Tensor]:
    return [g.detach().clone() for g in fn()]


def run_w3(
    sizes: Sizes,
    tasks: Sequence[int],
    repeats: int,
    warmup: int,
    target_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> List[PerTaskRow]:
    rows = []
    for n in tasks:
        torch.manual_seed(0)
        wl = w1(sizes, tasks=n)
        fns = paths(wl, compile=False)
        chosen = {LOOP: fns[LOOP], VMAP: fns[VMAP], MT_LOOP: fns[MT_LOOP]}
        ref = _grads_of_call(fns[LOOP])
        errs = {k: rel_err(_grads_of_call(f), ref) for k, f in chosen.items()}
        for k, e in errs.items():
            if e > TOLERANCE["W1"]:
                raise AssertionError(f"W3 at {n} tasks: {k} differs from the MAML loop: {e:.2e}")
        # Few samples for the long loops: scale the repeats down with the task count.
        med = time_interleaved(chosen, max(3, repeats * 8 // max(n, 8)), warmup, target_s, clock)
        rows += [PerTaskRow(n, k, med[k] * 1e3, errs[k]) for k in chosen]
    return rows


# -- tables ---------------------------------------------------------------------------


def format_table(rows: Sequence[Row]) -> str:
    head = (
        f"{'workload':<8} {'path':<22} {'ms/step':>9} {'x loop':>7} {'x floor':>7} "
        f"{'grad rel err':>12} {'compile s':>9}"
    )
    lines = [head, "-" * len(head)]
    for wl in dict.fromkeys(r.workload for r in rows):
        group = [r for r in rows if r.workload == wl]
        loop = next(r.ms for r in group if r.path == LOOP)
        floor = next(r.ms for r in group if r.path == FLOOR)
        for r in group:
            if r.ms is None:
                lines.append(f"{wl:<8} {r.path:<22} {'-':>9} {'-':>7} {'-':>7} {'-':>12} {'-':>9}  {r.note}")
                continue
            comp = f"{r.compile_s:>9.1f}" if r.compile_s is not None else f"{'':>9}"
            err = f"{r.rel_err:>12.1e}" if r.rel_err is not None else f"{'-':>12}"
            lines.append(
                f"{wl:<8} {r.path:<22} {r.ms:>9.2f} {r.ms / loop:>7.3f} {r.ms / floor:>7.2f} {err} {comp}"
                + (f"  {r.note}" if r.note else "")
            )
    return "\n".join(lines)


def format_per_task(rows: Sequence[PerTaskRow]) -> str:
    head = f"{'tasks':>5} {'path':<22} {'ms/step':>9} {'ms/task':>8} {'x loop':>7} {'grad rel err':>12}"
    lines = [head, "-" * len(head)]
    for n in dict.fromkeys(r.tasks for r in rows):
        group = [r for r in rows if r.tasks == n]
        loop = next(r.ms for r in group if r.path == LOOP)
        for r in group:
            lines.append(
                f"{n:>5} {r.path:<22} {r.ms:>9.2f} {r.ms / n:>8.3f} {r.ms / loop:>7.3f} {r.rel_err:>12.1e}"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions: a smoke run")
    parser.add_argument("--workload", choices=("W1", "W2", "W3", "all"), default="all")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="time compile")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled path")
    parser.add_argument("--compile-w2", action="store_true", help="compile W2 too (off by default: minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="samples per path (median taken)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per path first")
    parser.add_argument("--target-ms", type=float, default=None, help="length of one sample")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or the process's CPU time"
    )
    args = parser.parse_args(argv)
    compile = (not args.quick) if args.compile is None else args.compile
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 2)
    target_s = (args.target_ms if args.target_ms is not None else (1.0 if args.quick else 200.0)) / 1e3
    threads = torch.get_num_threads()
    if compile:
        # A private inductor cache: the compile time is a cold one, and a
        # compile running next to ours cannot race on the same files.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_tasks_inductor_"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, compile, repeats, warmup, target_s)
    finally:
        torch.set_num_threads(threads)


def _run(
    args: argparse.Namespace, compile: bool, repeats: int, warmup: int, target_s: float
) -> Dict[str, Any]:
    want = {"W1", "W2", "W3"} if args.workload == "all" else {args.workload}
    s1, s2, s3 = (QUICK_W1, QUICK_W2, QUICK_W3) if args.quick else (W1_SIZES, W2_SIZES, W3_TASKS)

    print(f"torch {torch.__version__}, fparams {fparams.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{args.clock} clock, median of {repeats} interleaved samples of ~{target_s * 1e3:g} ms; "
        f"meta-gradients checked first\n"
    )
    result: Dict[str, Any] = {"rows": [], "per_task": []}
    for name, make in (("W1", lambda: w1(s1)), ("W2", lambda: w2(s2))):
        if name not in want:
            continue
        torch.manual_seed(0)
        comp = compile and (name == "W1" or args.compile_w2)
        # W2's steps take seconds each: fewer samples.
        reps = repeats if name == "W1" else max(3, repeats // 3)
        rows = run_workload(make(), comp, reps, warmup, target_s, CLOCKS[args.clock])
        if compile and not comp:
            note = "skipped: compiles for over 3 min (--compile-w2)"
            rows.insert(-1, Row(name, COMPILED, None, None, note=note))
        result["rows"] += rows
        print(format_table(rows) + "\n", flush=True)
    if "W3" in want:
        per_task = run_w3(s1, s3, repeats, warmup, target_s, CLOCKS[args.clock])
        result["per_task"] = per_task
        print("W3: W1 per task\n" + format_per_task(per_task) + "\n", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
