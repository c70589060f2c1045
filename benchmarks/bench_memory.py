"""Peak memory and time of one meta-step, each row in a fresh interpreter.

Memory is the process's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``, Linux) after the meta-step, minus the same mark just
before it (once torch, the model and the data are loaded, and the same path
has run once on a tiny net so that lazily loaded code is in the baseline):
what the step itself added at its peak. Every row runs in a new Python process, so no row
inherits another's allocator pools. Time is the second of two meta-steps in
that process (the first pays one-time costs); the peak covers both.

The task is the 4-block conv net of ``bench_tasks.py`` (64 channels,
BatchNorm on batch statistics, 28x28 inputs), 5-way 5-shot with 75 query
images per task, second order, one intra-op thread.

Two tables:

* over inner steps ``K`` (one task): the learn2learn-style :class:`fparams.MAML`
  class (``clone`` + ``adapt`` per step, ``.backward()``), :func:`fparams.adapt`
  with ``.backward()``, and ``adapt(checkpoint=True)``;
* over tasks ``T`` (``K = 5``): ``map_tasks(...).mean().backward()`` and
  :func:`fparams.meta_value_and_grad` on detached params (README's pure
  style), each with every strategy (``chunked`` with ``chunk_size=4``).

On Linux, glibc's allocator raises its mmap threshold (up to 32 MiB) each
time it frees a large block, so after the first step most activations come
from its heap, and memory freed there often stays resident: RSS then
overstates what a step holds at once, the more so the more a path frees and
reallocates (checkpointing does so at every step). ``--fixed-mmap`` runs every
row with ``MALLOC_MMAP_THRESHOLD_=65536``, which fixes the threshold: large
blocks then go back to the system when freed, and RSS follows the live
tensors. Both are worth reading; the second is what a caching GPU allocator's
peak (``torch.cuda.max_memory_allocated``) tracks.

Every row also prints the squared norm of its meta-gradient, so rows that
must agree can be compared (float32: rounding differs between paths).

Run ``python benchmarks/bench_memory.py`` (several minutes on 2 CPU cores),
``--steps 1 5 10 20 40``, ``--tasks 1 8 32``, ``--table steps|tasks|all``,
or ``--quick`` for a smoke run on a tiny net. ``--time`` leaves memory out
and times the chosen ``--paths`` interleaved in one process at the first
``--steps`` and ``--tasks`` (process CPU time: the ratios hold while other
processes share the cores), e.g. ``--time --steps 40 --paths adapt
"adapt(checkpoint=True)"``. ``--row SPEC`` runs one row in
this process and prints it as JSON (what the table rows call).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fparams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import CLOCKS, time_interleaved  # noqa: E402
from bench_tasks import conv4, image_tasks  # noqa: E402

STEP_PATHS = ("MAML class", "adapt", "adapt(checkpoint=True)")
TASK_PATHS = tuple(
    f"{face} {strategy}"
    for face in ("map_tasks.backward", "meta_value_and_grad")
    for strategy in ("auto", "vmap", "loop", "chunked")
)
CHUNK = 4
LR = 0.4
#: ``--fixed-mmap``: glibc serves allocations of at least this many bytes with
#: their own mmap, and returns them to the system when they are freed.
MMAP_THRESHOLD = 1 << 16


class Row(NamedTuple):
    path: str
    steps: int
    tasks: int
    peak_mib: float
    seconds: float
    grad_sq: float


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("bench_memory: no VmHWM in /proc/self/status (Linux only)")


def _setup(quick: bool, tasks: int) -> Any:
    torch.manual_seed(0)
    channels, side, shots, queries = (8, 16, 1, 2) if quick else (64, 28, 5, 15)
    return conv4(channels), image_tasks(tasks, shots, queries, side=side)


def _meta_step(path: str, steps: int, net: nn.Module, data: List[Tensor]) -> Callable[[], List[Tensor]]:
    """One meta-step of ``path``, returning the meta-gradient (one tensor per parameter)."""
    arch, params, _ = fparams.split(net)

    def loss_fn(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(arch(p, x), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return loss_fn(fparams.adapt(loss_fn, p, xs, ys, lr=LR, steps=steps, checkpoint=ck), xq, yq)

    ck = path == "adapt(checkpoint=True)"
    face, _, strategy = path.partition(" ")
    opts: Dict[str, Any] = {"strategy": strategy, "batch_stats": True}
    if strategy == "chunked":
        opts["chunk_size"] = CHUNK

    def maml_class() -> List[Tensor]:
        net.zero_grad(set_to_none=True)
        maml = fparams.MAML(net, lr=LR)
        n = data[0].size(0)
        for i in range(n):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(data[0][i]), data[1][i]))
            (F.cross_entropy(learner(data[2][i]), data[3][i]) / n).backward()
        return [p.grad for p in net.parameters()]

    def with_backward() -> List[Tensor]:
        net.zero_grad(set_to_none=True)
        if face == "map_tasks.backward":
            fparams.map_tasks(task, **opts)(params, *data).mean().backward()
        else:
            losses = [task(params, *(d[i] for d in data)) for i in range(data[0].size(0))]
            torch.stack(losses).mean().backward()
        return [p.grad for p in net.parameters()]

    def pure() -> List[Tensor]:
        _, grads = fparams.meta_value_and_grad(task, **opts)(fparams.detach(params), *data)
        return list(grads.values())

    if path == "MAML class":
        return maml_class
    return pure if face == "meta_value_and_grad" else with_backward


def run_row(path: str, steps: int, tasks: int, quick: bool) -> Row:
    """Two meta-steps in this process: the step's peak memory and the second step's time."""
    torch.set_num_threads(1)
    # A tiny run of the same path first: lazily imported code and one-time
    # set-up are then counted in the baseline, not as the step's memory.
    _meta_step(path, steps, *_setup(True, min(tasks, 2)))()
    net, data = _setup(quick, tasks)
    step = _meta_step(path, steps, net, data)
    before = _vm_hwm_mib()
    step()
    start = time.perf_counter()
    grads = step()
    seconds = time.perf_counter() - start
    grad_sq = float(sum(g.double().pow(2).sum() for g in grads))
    return Row(path, steps, tasks, _vm_hwm_mib() - before, seconds, grad_sq)


def time_paths(names: Sequence[str], steps: int, tasks: int, args: argparse.Namespace) -> Dict[str, float]:
    """Seconds per meta-step of each path, interleaved in this process (process CPU time)."""
    torch.set_num_threads(1)
    net, data = _setup(args.quick, tasks)
    fns = {name: _meta_step(name, steps, net, data) for name in names}
    seconds = time_interleaved(fns, args.repeats, 1, 0.0, CLOCKS["cpu"])
    base = seconds[names[0]]
    print(f"K = {steps}, T = {tasks}, CPU seconds per meta-step, interleaved; base: {names[0]}")
    print("| path | s/step | vs base |")
    print("|---|---|---|")
    for name, t in seconds.items():
        print(f"| {name} | {t:.2f} | {t / base:.2f}x |")
    return seconds


def _in_fresh_interpreter(path: str, steps: int, tasks: int, quick: bool, fixed_mmap: bool) -> Row:
    spec = json.dumps({"path": path, "steps": steps, "tasks": tasks, "quick": quick})
    env = dict(os.environ)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--row", spec],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:  # e.g. killed for want of memory: the table says so and goes on
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        print(f"bench_memory: row {path!r} K={steps} T={tasks} failed: {last}", file=sys.stderr)
        return Row(path, steps, tasks, math.nan, math.nan, math.nan)
    return Row(**json.loads(done.stdout.strip().splitlines()[-1]))


def format_rows(title: str, rows: Sequence[Row], by: str, base: Dict[Any, Row]) -> str:
    lines = [
        f"{title}",
        f"| path | {by} | peak MiB | vs base | s/step | vs base | grad sq-norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = r.steps if by == "K" else r.tasks
        b = base[key]
        lines.append(
            f"| {r.path} | {key} | {r.peak_mib:.0f} | {r.peak_mib / max(b.peak_mib, 1e-9):.2f}x "
            f"| {r.seconds:.2f} | {r.seconds / max(b.seconds, 1e-9):.2f}x | {r.grad_sq:.6e} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Row]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=("steps", "tasks", "all"), default="all")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20, 40])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--paths", nargs="+", default=None, help="only these paths (names as printed)")
    parser.add_argument("--quick", action="store_true", help="a tiny net: a smoke run")
    parser.add_argument(
        "--fixed-mmap",
        action="store_true",
        help=f"run each row with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (see the module docstring)",
    )
    parser.add_argument(
        "--time",
        action="store_true",
        help="no memory: time the chosen paths interleaved in this process, at the first --steps "
        "and --tasks (steadier ratios than one step per fresh process)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="with --time: samples per path")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        spec = json.loads(args.row)
        print(json.dumps(run_row(spec["path"], spec["steps"], spec["tasks"], spec["quick"])._asdict()))
        return {}
    if args.quick:
        args.steps, args.tasks = [1, 3], [1, 3]
    if args.time:
        return {"time": [time_paths(args.paths or list(STEP_PATHS), args.steps[0], args.tasks[0], args)]}
    wanted = set(args.paths) if args.paths else None
    results: Dict[str, List[Row]] = {}
    if args.table in ("steps", "all"):
        rows = [
            _in_fresh_interpreter(p, k, 1, args.quick, args.fixed_mmap)
            for k in args.steps
            for p in STEP_PATHS
            if wanted is None or p in wanted
        ]
        base = {r.steps: r for r in rows if r.path == "adapt"} or {r.steps: r for r in rows}
        print(format_rows("Over inner steps K (1 task); base: adapt", rows, "K", base), flush=True)
        results["steps"] = rows
    if args.table in ("steps", "all") and args.table == "all":
        print()
    if args.table in ("tasks", "all"):
        rows = [
            _in_fresh_interpreter(p, 5 if not args.quick else 1, t, args.quick, args.fixed_mmap)
            for t in args.tasks
            for p in TASK_PATHS
            if wanted is None or p in wanted
        ]
        base = {r.tasks: r for r in rows if r.path == "map_tasks.backward auto"} or {r.tasks: r for r in rows}
        print(format_rows("Over tasks T (K = 5); base: map_tasks.backward auto", rows, "T", base), flush=True)
        results["tasks"] = rows
    return results


if __name__ == "__main__":
    main()
