"""Time one MAML meta-step with 5 Adam inner steps: fparams over tasks vs higher and torchopt.

The sine-wave regression of Finn et al. (2017): amplitudes in [0.1, 5], phases
in [0, pi], inputs in [-5, 5]; an MLP 1-40-40-1 with ReLU; 10 support and 10
query points per task; 5 inner Adam steps (lr 0.01, torch.optim's defaults
otherwise). A meta-step is the forward through every task's inner loop, the
mean query loss, and the backward to the meta-parameters (the outer optimizer
step is the same for every path, so it is left out).

Paths:

* ``fparams vmap``: ``torch.func.vmap`` over the tasks of a per-task function
  that runs ``fparams.optim.adam`` on ``torch.func.grad`` gradients.
* ``fparams loop``: the same per-task function, task after task.
* ``fparams.adapt+map_tasks``: the library's entry points,
  ``fparams.map_tasks`` over ``fparams.adapt(..., lr=fparams.optim.adam(...))``.
* ``higher``: ``higher.innerloop_ctx`` with ``torch.optim.Adam`` (its
  ``DifferentiableAdam``), task after task.
* ``torchopt``: ``torchopt.MetaAdam`` on the module, task after task, with
  ``extract_state_dict`` / ``recover_state_dict`` between tasks (torchopt's
  MAML recipe).

higher and torchopt are the ``bench`` extra (``pip install -e '.[bench]'``); a
path whose library is missing or fails is skipped with the reason printed.

Before timing, every path computes the meta-gradient of the same meta-batch in
float64, compared with ``fparams vmap`` (which follows ``torch.optim.Adam``).
Two known differences are kept out of the way: higher adds ``eps`` before the
bias correction of the second moment (PyTorch's Adam before 1.6 did), so the
check uses a tiny ``eps``; torchopt counts steps in a float32 tensor, so its
bias corrections are off by about 1e-5 even in float64, and the tolerance for
the other libraries is 1e-4 (of the largest entry) against 1e-9 for fparams'
own paths. torchopt runs with a tiny ``eps_root`` (its documented setting for
differentiating through Adam); the check also reports what its default gives.

Timing is in float32: each number is the median over interleaved samples (the
paths take turns, in a rotating order), in milliseconds per meta-step; the
ratio is the path's time over ``fparams vmap``'s.

Run ``python benchmarks/bench_optim.py`` (about a minute on an idle 2-core CPU), or
``--quick`` for a smoke run with fewer tasks and samples.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import fparams
import fparams.datasets
import fparams.optim

INNER_STEPS = 5
INNER_LR = 0.01
EPS = 1e-8  # Adam's eps for the timing (torch.optim's default)
CHECK_EPS = 1e-16  # for the float64 check: small enough that higher's eps placement does not show
# torchopt's `eps_root`, which its docs ask for when differentiating through Adam:
# with its default 0, sqrt'(0) turns the meta-gradient into NaN as soon as one
# ReLU unit is dead on a task's support set, as happens on this benchmark.
EPS_ROOT = 1e-30
CHECK_TASKS = 8  # tasks in the float64 check: enough to catch a wrong path, and quick

VMAP = "fparams vmap"
LOOP = "fparams loop"
ADAPT = "fparams.adapt+map_tasks"
HIGHER = "higher"
TORCHOPT = "torchopt"
PATHS = (VMAP, LOOP, ADAPT, HIGHER, TORCHOPT)


class Batch(NamedTuple):
    """A meta-batch of sine tasks, the tasks on dim 0: support (xs, ys) and query (xq, yq)."""

    xs: Tensor
    ys: Tensor
    xq: Tensor
    yq: Tensor


def sine_tasks(num_tasks: int, shots: int, seed: int, dtype: torch.dtype) -> Batch:
    """fparams.datasets' sine tasks, ``shots`` support and ``shots`` query points each."""
    tasks = fparams.datasets.sine_tasks(
        num_tasks, shots, shots, generator=torch.Generator().manual_seed(seed)
    )
    return Batch(*(t.to(dtype) for t in tasks.data()))


def sine_mlp(seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    return net.to(dtype)


def mse(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).mean()


# -- the paths: each returns a function that runs one meta-step, leaving the
# -- meta-gradient in the .grad of the meta-parameters it returns ------------------


MetaStep = Tuple[Callable[[], None], List[Tensor]]


def fparams_paths(net: nn.Module, batch: Batch, eps: float) -> Dict[str, MetaStep]:
    arch, params, _ = fparams.split(net)
    meta = list(params.values())

    def task_loss(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        opt = fparams.optim.adam(lr=INNER_LR, eps=eps)
        state = opt.init(p)
        grad_fn = torch.func.grad(lambda q: mse(arch(q, xs), ys))
        for _ in range(INNER_STEPS):
            updates, state = opt.update(grad_fn(p), state, p)
            p = fparams.apply_updates(p, updates)
        return mse(arch(p, xq), yq)

    over_tasks = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))

    def vmap_step() -> None:
        over_tasks(params, *batch).mean().backward()

    def loop_step() -> None:
        losses = [task_loss(params, *(t[i] for t in batch)) for i in range(len(batch.xs))]
        (sum(losses) / len(losses)).backward()  # type: ignore[union-attr]

    return {VMAP: (vmap_step, meta), LOOP: (loop_step, meta)}


def adapt_path(net: nn.Module, batch: Batch, eps: float) -> MetaStep:
    if not hasattr(fparams, "adapt") or not hasattr(fparams, "map_tasks"):
        raise RuntimeError("this fparams has no adapt / map_tasks yet")
    arch, params, _ = fparams.split(net)

    def loss_fn(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return mse(arch(p, x), y)

    def task_loss(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        opt = fparams.optim.adam(lr=INNER_LR, eps=eps)
        fast = fparams.adapt(loss_fn, p, xs, ys, lr=opt, steps=INNER_STEPS)
        return loss_fn(fast, xq, yq)

    over_tasks = fparams.map_tasks(task_loss)

    def step() -> None:
        over_tasks(params, *batch).mean().backward()

    return step, list(params.values())


def higher_path(net: nn.Module, batch: Batch, eps: float) -> MetaStep:
    import higher

    inner_opt = torch.optim.Adam(net.parameters(), lr=INNER_LR, eps=eps)

    def step() -> None:
        n = len(batch.xs)
        for i in range(n):
            xs, ys, xq, yq = (t[i] for t in batch)
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(INNER_STEPS):
                    diffopt.step(mse(fnet(xs), ys))
                (mse(fnet(xq), yq) / n).backward()

    return step, list(net.parameters())


def torchopt_path(net: nn.Module, batch: Batch, eps: float, eps_root: float = EPS_ROOT) -> MetaStep:
    import torchopt

    meta = list(net.parameters())
    inner_opt = torchopt.MetaAdam(net, lr=INNER_LR, eps=eps, eps_root=eps_root)
    net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt)

    def step() -> None:
        n = len(batch.xs)
        for i in range(n):
            xs, ys, xq, yq = (t[i] for t in batch)
            for _ in range(INNER_STEPS):
                inner_opt.step(mse(net(xs), ys))
            (mse(net(xq), yq) / n).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)

    return step, meta


def build(net: nn.Module, batch: Batch, eps: float) -> Tuple[Dict[str, MetaStep], Dict[str, str]]:
    """Every path on its own copy of ``net``; the reasons for the ones that could not be built."""
    steps: Dict[str, MetaStep] = dict(fparams_paths(copy.deepcopy(net), batch, eps))
    skipped: Dict[str, str] = {}
    builders = {ADAPT: adapt_path, HIGHER: higher_path, TORCHOPT: torchopt_path}
    for name, builder in builders.items():
        try:
            steps[name] = builder(copy.deepcopy(net), batch, eps)
        except Exception as err:  # a missing or broken optional library: report it, time the rest
            skipped[name] = f"{type(err).__name__}: {err}"
    return {p: steps[p] for p in PATHS if p in steps}, skipped


def meta_gradient(meta_step: MetaStep) -> List[Tensor]:
    step, meta = meta_step
    for p in meta:
        p.grad = None
    step()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in meta]


# -- correctness, then timing ---------------------------------------------------------


def _compare(got: List[Tensor], ref: List[Tensor]) -> Tuple[bool, float]:
    finite = all(bool(torch.isfinite(g).all()) for g in got)
    return finite, max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))


def check(num_tasks: int, seed: int) -> Dict[str, str]:
    """Float64 meta-gradients of every path against fparams vmap; raises if one disagrees."""
    net = sine_mlp(seed, torch.float64)
    batch = sine_tasks(num_tasks, 10, seed + 1, torch.float64)
    paths, skipped = build(net, batch, CHECK_EPS)
    ref = meta_gradient(paths[VMAP])
    if not all(torch.isfinite(g).all() for g in ref):
        raise AssertionError("fparams vmap: the meta-gradient is not finite")
    report = {}
    for name, meta_step in paths.items():
        finite, err = _compare(meta_gradient(meta_step), ref)
        report[name] = f"max |diff| / max |grad| = {err:.1e}"
        # torchopt counts steps in float32, so its bias corrections are off by ~1e-5.
        tol = 1e-9 if name.startswith("fparams") else 1e-4
        if not finite or not err <= tol:
            raise AssertionError(
                f"{name}: meta-gradient disagrees with {VMAP}: {report[name]}, finite={finite}"
            )
    if TORCHOPT in paths:
        finite, err = _compare(meta_gradient(torchopt_path(copy.deepcopy(net), batch, CHECK_EPS, 0.0)), ref)
        dead = "NaN in the meta-gradient" if not finite else f"max |diff| / max |grad| = {err:.1e}"
        report[TORCHOPT] += f" (eps_root={EPS_ROOT:g}; with eps_root=0: {dead})"
    for name, reason in skipped.items():
        report[name] = f"skipped ({reason})"
    return report


def _once(fn: Callable[[], None], meta: List[Tensor]) -> float:
    for p in meta:
        p.grad = None
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(paths: Dict[str, MetaStep], repeats: int, warmup: int) -> Dict[str, float]:
    """Median seconds per meta-step of each path, the paths taking turns in a rotating order."""
    names = list(paths)
    for name in names:
        for _ in range(warmup):
            _once(*paths[name])
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_once(*paths[name]))
    return {n: statistics.median(s) for n, s in samples.items()}


def format_table(ms: Dict[str, float], skipped: Dict[str, str]) -> str:
    head = f"{'path':<26} {'ms / meta-step':>14} {'ratio':>7}"
    lines = [head, "-" * len(head)]
    for name in PATHS:
        if name in ms:
            lines.append(f"{name:<26} {ms[name]:>14.1f} {ms[name] / ms[VMAP]:>7.2f}")
        else:
            lines.append(f"{name:<26} {'skipped':>14} {'-':>7}   {skipped.get(name, '')}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 tasks, few samples: a smoke run")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per meta-batch (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per path (median taken)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed meta-steps per path first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    num_tasks = args.tasks if args.tasks is not None else (8 if args.quick else 32)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, fparams {fparams.__version__}, {torch.get_num_threads()} threads")
    print(
        f"MAML on sine regression: MLP 1-40-40-1, {num_tasks} tasks x (10 support + 10 query), "
        f"{INNER_STEPS} inner Adam steps (lr {INNER_LR})\n"
    )
    print(
        f"meta-gradients in float64 ({min(num_tasks, CHECK_TASKS)} tasks, eps={CHECK_EPS:g}), against {VMAP}:"
    )
    for name, line in check(min(num_tasks, CHECK_TASKS), seed=0).items():
        print(f"  {name:<26} {line}")

    net = sine_mlp(seed=1, dtype=torch.float32)
    batch = sine_tasks(num_tasks, 10, seed=2, dtype=torch.float32)
    paths, skipped = build(net, batch, EPS)
    gc.collect()
    ms = {n: s * 1e3 for n, s in time_interleaved(paths, repeats, warmup).items()}
    print(f"\nfloat32, median of {repeats} interleaved samples; ratio = ms / {VMAP} ms\n")
    print(format_table(ms, skipped))
    return ms


if __name__ == "__main__":
    main(sys.argv[1:])
