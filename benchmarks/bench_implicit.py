"""Implicit meta-gradients (iMAML): against torchopt's implicit iMAML, and peak memory against unrolled MAML.

Part ``torchopt`` (its rows are skipped without ``pip install torchopt``):
iMAML on sine-wave regression (the MLP 1-40-40-1 of ``bench_tasks.py``, 32
tasks, 10 support and 10 query points), ``lam`` 10, 16 inner SGD steps of lr
0.02, the meta-gradient by conjugate gradients on the normal equations
(torchopt's default solver; plain CG does not apply: the MLP's Hessians are
indefinite, smallest eigenvalues down to -43 at initialisation, and
``fparams.implicit.cg`` says so). Two settings of the linear solve:

* ``fixed``: 5 iterations for every task (``strict=False``; torchopt:
  ``maxiter=5``, no tolerance), the practice of the iMAML paper and of
  torchopt's iMAML example;
* ``converged``: until the relative residual is below 1e-5 (at most 200
  iterations). Under vmap every task iterates until the slowest has
  converged (a converged task stops moving), so vmap does more iterations
  per task than a loop does.

Both implementations solve the same problem; the meta-gradients are compared
first, in float64 (relative error of the whole gradient vector against
``fparams vmap``; in float32 the conditioning of the normal equations
amplifies rounding to ~1e-3 between any two of them), then timed in float32.

* ``fparams vmap``: ``fparams.map_tasks(task, strategy="vmap")`` with
  :func:`fparams.implicit.adapt` inside, then ``.mean().backward()``.
* ``fparams loop``: the same with ``strategy="loop"``.
* ``torchopt loop``: ``torchopt.diff.implicit.custom_root`` over a per-task
  inner solver, the way torchopt's iMAML example writes it (a Python loop
  over tasks, ``torchopt.sgd`` steps, ``torchopt.linear_solve.solve_normal_cg``),
  then the mean query loss's ``.backward()``.

Part ``memory``: peak resident memory (``VmHWM`` in ``/proc/self/status``)
of one meta-step on the 4-block conv net of ``bench_tasks.py`` (64 channels,
BatchNorm with batch statistics), one 5-way 5-shot task with 75 query images
of 28x28, one thread, each row in a fresh interpreter: iMAML at 1 and 40
inner steps (5 CG iterations, ``strict=False``, as in the iMAML paper), and
unrolled second-order MAML (:func:`fparams.adapt`) at 40 steps. Each row runs a
warm-up meta-step on one image per class (torch's one-off lazy allocations
are not the step's memory; glibc's ``malloc_trim`` then returns the freed
pages), resets the peak (``/proc/self/clear_refs``) and
measures the real step: ``peak MB`` is its VmHWM, ``base MB`` the resident
memory just before it (torch, the model, the data), ``step MB`` the
difference.

Run ``python benchmarks/bench_implicit.py`` (about three minutes on a 2-core CPU),
``--part torchopt|memory|all``, ``--threads N``, ``--clock cpu``, or
``--quick`` for a smoke run on tiny sizes.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import fparams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared timing and workloads
from _timing import CLOCKS, time_interleaved  # noqa: E402
from bench_tasks import conv4, image_tasks, mlp, sine_tasks  # noqa: E402

FP_VMAP = "fparams vmap"
FP_LOOP = "fparams loop"
TORCHOPT = "torchopt loop"
#: CG iterations of the conv rows, as in the iMAML paper: a fixed few, with
#: strict=False (the conv net's Hessian is indefinite, so plain CG cannot
#: converge and fparams.implicit.cg(strict=True) would say so).
CG_STEPS = 5
WAYS = 5
#: Largest relative error of the meta-gradient between the implementations, in
#: float64 (the converged rows solve to 1e-5, the fixed ones agree to ~1e-13).
TOLERANCE = 1e-4


class Sine(NamedTuple):
    tasks: int
    points: int
    width: int
    lam: float
    lr: float
    steps: int
    cg_iters: int
    cg_tol: float
    strict: bool  # False: always cg_iters iterations


class Conv(NamedTuple):
    channels: int
    shots: int
    queries: int  # per class
    side: int
    lam: float
    lr: float
    steps: tuple  # iMAML step counts; the unrolled row takes the last


SINE = {
    "fixed": Sine(32, 10, 40, lam=10.0, lr=0.02, steps=16, cg_iters=5, cg_tol=1e-12, strict=False),
    "converged": Sine(32, 10, 40, lam=10.0, lr=0.02, steps=16, cg_iters=200, cg_tol=1e-5, strict=True),
}
CONV = Conv(channels=64, shots=5, queries=15, side=28, lam=2.0, lr=0.1, steps=(1, 40))
QUICK_SINE = {
    "fixed": Sine(4, 5, 8, lam=10.0, lr=0.02, steps=4, cg_iters=5, cg_tol=1e-12, strict=False),
    "converged": Sine(4, 5, 8, lam=10.0, lr=0.02, steps=4, cg_iters=200, cg_tol=1e-5, strict=True),
}
QUICK_CONV = Conv(channels=4, shots=1, queries=2, side=16, lam=2.0, lr=0.1, steps=(1, 3))


class Row(NamedTuple):
    config: str
    path: str
    ms: float  # per meta-step
    rel_err: float  # of the meta-gradient against fparams vmap


class MemoryRow(NamedTuple):
    path: str
    steps: int
    peak_mb: float
    base_mb: float

    @property
    def step_mb(self) -> float:
        return self.peak_mb - self.base_mb


# -- part torchopt --------------------------------------------------------------


def fparams_step(
    net: torch.nn.Module, data: List[Tensor], s: Sine, strategy: str
) -> Callable[[], List[Tensor]]:
    arch, params, _ = fparams.split(net)
    solve = fparams.implicit.normal_cg(maxiter=s.cg_iters, tol=s.cg_tol, strict=s.strict)

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(arch(p, x), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        phi = fparams.implicit.adapt(mse, p, xs, ys, lam=s.lam, lr=s.lr, steps=s.steps, solve=solve)
        return mse(phi, xq, yq)

    mapped = fparams.map_tasks(task, strategy=strategy)

    def step() -> List[Tensor]:
        net.zero_grad(set_to_none=True)
        mapped(params, *data).mean().backward()
        return [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]

    return step


def torchopt_step(net: torch.nn.Module, data: List[Tensor], s: Sine) -> Callable[[], List[Tensor]]:
    import torchopt

    names = [n for n, _ in net.named_parameters()]

    def mse(params: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(torch.func.functional_call(net, dict(zip(names, params)), (x,)), y)

    def objective(params: Any, meta_params: Any, x: Tensor, y: Tensor) -> Tensor:
        reg = sum(((p - m) ** 2).sum() for p, m in zip(params, meta_params))
        return mse(params, x, y) + 0.5 * s.lam * reg

    rtol = s.cg_tol if s.strict else 0.0  # fixed: no tolerance, maxiter iterations
    solve = torchopt.linear_solve.solve_normal_cg(maxiter=s.cg_iters, rtol=rtol, atol=0.0)

    @torchopt.diff.implicit.custom_root(torch.func.grad(objective, argnums=0), argnums=1, solve=solve)
    def inner_solver(params: Any, meta_params: Any, x: Tensor, y: Tensor) -> Any:
        opt = torchopt.sgd(lr=s.lr)
        state = opt.init(params)
        with torch.enable_grad():
            params = tuple(p.detach().requires_grad_() for p in params)
            for _ in range(s.steps):
                grads = torch.autograd.grad(objective(params, meta_params, x, y), params)
                updates, state = opt.update(grads, state, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
        return params

    meta = tuple(net.parameters())
    xs, ys, xq, yq = data

    def step() -> List[Tensor]:
        net.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(xs.size(0)):
            init = tuple(p.detach().clone() for p in meta)
            phi = inner_solver(init, meta, xs[i], ys[i])
            total = total + mse(phi, xq[i], yq[i])
        (total / xs.size(0)).backward()  # type: ignore[union-attr]
        return [p.grad.clone() for p in meta]  # type: ignore[union-attr]

    return step


def _rel_err(grads: List[Tensor], ref: List[Tensor]) -> float:
    a, b = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref])
    return float((a - b).norm() / b.norm())


def have_torchopt() -> bool:
    try:
        import torchopt  # noqa: F401
    except ImportError:
        return False
    return True


def run_torchopt(
    config: str, s: Sine, repeats: int, warmup: int, target_s: float, clock: Callable[[], float]
) -> List[Row]:
    torch.manual_seed(0)
    net = mlp(s.width)
    data = sine_tasks(s.tasks, s.points, s.points)

    def paths(net: torch.nn.Module, data: List[Tensor]) -> Dict[str, Callable[[], List[Tensor]]]:
        steps = {FP_VMAP: fparams_step(net, data, s, "vmap"), FP_LOOP: fparams_step(net, data, s, "loop")}
        if have_torchopt():
            steps[TORCHOPT] = torchopt_step(net, data, s)
        return steps

    # The check runs in float64: in float32 the normal equations' conditioning
    # amplifies rounding to ~1e-3 between any two implementations.
    checked = paths(copy.deepcopy(net).double(), [t.double() for t in data])
    ref = checked[FP_VMAP]()
    errors = {name: _rel_err(fn(), ref) for name, fn in checked.items()}
    for name, err in errors.items():
        if not err <= TOLERANCE:
            raise AssertionError(f"{name}: meta-gradient differs from {FP_VMAP} by {err:.2e} (float64)")
    steps = paths(net, data)
    times = time_interleaved(steps, repeats, warmup, target_s, clock)
    return [Row(config, name, times[name] * 1e3, errors[name]) for name in steps]


def format_rows(rows: List[Row]) -> str:
    base = {(r.config, r.path): r.ms for r in rows}
    lines = [f"{'CG':<11}{'path':<16}{'ms/step':>10}{'x vmap':>9}{'grad rel err':>14}"]
    for r in rows:
        ratio = r.ms / base[r.config, FP_VMAP]
        lines.append(f"{r.config:<11}{r.path:<16}{r.ms:>10.1f}{ratio:>9.2f}{r.rel_err:>14.1e}")
    return "\n".join(lines)


# -- part memory ------------------------------------------------------------------


def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _release_freed_memory() -> None:
    # glibc keeps freed heap pages resident; hand them back so that the base
    # is what the process holds, not what the warm-up step left behind
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the base includes the warm-up's leftovers
        pass


def memory_row(path: str, steps: int, c: Conv) -> MemoryRow:
    """One meta-step in this process: its peak resident memory (call in a fresh interpreter)."""
    torch.manual_seed(0)
    net = conv4(c.channels)
    arch, params, _ = fparams.split(net)
    xs, ys, xq, yq = (t[0] for t in image_tasks(1, c.shots, c.queries, c.side))

    def ce(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(arch(p, x), y)

    shots = c.shots

    def adapt(p: Dict[str, Tensor], x: Tensor, y: Tensor, n: int) -> Dict[str, Tensor]:
        if path == "implicit":
            solve = fparams.implicit.cg(maxiter=CG_STEPS, strict=False)
            return fparams.implicit.adapt(ce, p, x, y, lam=c.lam, lr=c.lr, steps=n, solve=solve)
        return fparams.adapt(ce, p, x, y, lr=c.lr, steps=n)

    # A warm-up step on one image per class first: torch's lazy one-off
    # allocations (functorch's tables and the like) are not the meta-step's
    # memory, and so small a step leaves little memory resident. Then the
    # peak is reset (writing 5 to /proc/self/clear_refs) and measured.
    ce(adapt(params, xs[::shots], ys[::shots], 1), xq[:WAYS], yq[:WAYS]).backward()
    net.zero_grad(set_to_none=True)
    gc.collect()
    _release_freed_memory()
    base = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    ce(adapt(params, xs, ys, steps), xq, yq).backward()
    return MemoryRow(path, steps, _vm("VmHWM"), base)


def run_memory(c: Conv, quick: bool, threads: int) -> List[MemoryRow]:
    rows = []
    plan = [("implicit", n) for n in c.steps] + [("unrolled", c.steps[-1])]
    for path, steps in plan:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-row", path, str(steps)]
        cmd += ["--threads", str(threads)] + (["--quick"] if quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(MemoryRow(**json.loads(out.strip().splitlines()[-1])))
    return rows


def format_memory(rows: List[MemoryRow]) -> str:
    lines = [f"{'path':<10}{'steps':>6}{'peak MB':>10}{'base MB':>10}{'step MB':>10}"]
    for r in rows:
        lines.append(f"{r.path:<10}{r.steps:>6}{r.peak_mb:>10.0f}{r.base_mb:>10.0f}{r.step_mb:>10.0f}")
    first, last, unrolled = rows[0], rows[-2], rows[-1]
    lines.append(
        f"implicit@{last.steps} / implicit@{first.steps}: peak {last.peak_mb / first.peak_mb:.2f}x "
        f"(target <= 1.3x), step {last.step_mb / first.step_mb:.2f}x"
    )
    lines.append(
        f"implicit@{last.steps} / unrolled@{unrolled.steps}: peak {last.peak_mb / unrolled.peak_mb:.2f}x "
        f"(target <= 0.25x), step {last.step_mb / unrolled.step_mb:.2f}x"
    )
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions: a smoke run")
    parser.add_argument("--part", choices=("torchopt", "memory", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=None, help="samples per path (median taken)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall or process CPU time")
    parser.add_argument("--memory-row", nargs=2, metavar=("PATH", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.memory_row:
            path, steps = args.memory_row[0], int(args.memory_row[1])
            row = memory_row(path, steps, QUICK_CONV if args.quick else CONV)
            print(json.dumps(row._asdict()))
            return {"memory_row": row}
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    result: Dict[str, Any] = {"rows": [], "memory": []}
    print(f"torch {torch.__version__}, fparams {fparams.__version__}, {torch.get_num_threads()} threads\n")
    if args.part in ("torchopt", "all"):
        configs = QUICK_SINE if args.quick else SINE
        repeats = args.repeats if args.repeats is not None else (1 if args.quick else 7)
        warmup, target_s = (0, 0.001) if args.quick else (1, 0.5)
        start = time.perf_counter()
        rows = []
        for config, s in configs.items():
            rows += run_torchopt(config, s, repeats, warmup, target_s, CLOCKS[args.clock])
        result["rows"] = rows
        note = "" if have_torchopt() else " (torchopt not installed: its rows are skipped)"
        s = configs["fixed"]
        print(f"iMAML, {s.tasks} sine tasks, {s.steps} inner steps, {args.clock} clock{note}")
        print(format_rows(rows) + f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)
    if args.part in ("memory", "all"):
        c = QUICK_CONV if args.quick else CONV
        rows_m = run_memory(c, args.quick, args.threads)
        result["memory"] = rows_m
        print(
            f"peak memory of one meta-step, conv4 ({c.channels} channels), 5-way {c.shots}-shot, "
            f"{5 * c.queries} queries, {c.side}x{c.side}, fresh interpreter per row"
        )
        print(format_memory(rows_m) + "\n", flush=True)
    return result


if __name__ == "__main__":
    main()
