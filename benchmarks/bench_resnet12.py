"""One MAML / ANIL meta-step on ResNet-12, the standard few-shot backbone: fparams against higher
(and learn2learn where it installs), time (interleaved, one process) and peak memory (each path in
a fresh interpreter).

Full size (issue 17): four residual blocks 64-160-320-640, 84x84 images, 5-way 5-shot with 15
queries per class, 5 inner steps, 4 tasks::

    python benchmarks/bench_resnet12.py
    python benchmarks/bench_resnet12.py --width 8 --image 32 --tasks 2 --steps 2 --queries 3  # small

BatchNorm uses batch statistics (``track_running_stats=False``), as in most MAML code, so every path
computes the same thing. learn2learn 0.2 builds on Python <= 3.10 only (its Cython extension
includes ``longintrepr.h``): run the script there for its rows (a Python 3.10 venv with
``torch==2.13.0 learn2learn==0.2.0 higher`` and fparams); where it is missing its rows are left
out and the script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fparams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import CLOCKS, time_interleaved  # noqa: E402

PATHS = ["fparams", "fparams_checkpoint", "higher", "learn2learn"]


def block(cin: int, cout: int) -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: List[nn.Module] = []
            for i in range(3):
                layers += [
                    nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
                    nn.BatchNorm2d(cout, track_running_stats=False),
                ]
                if i < 2:
                    layers.append(nn.LeakyReLU(0.1))
            self.body = nn.Sequential(*layers)
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, track_running_stats=False)
            )

        def forward(self, x: Tensor) -> Tensor:
            return F.max_pool2d(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1), 2)

    return Block()


def resnet12(width: int, ways: int) -> nn.Module:
    """ResNet-12: widths 64-160-320-640 at ``width=64``, then global pooling and a linear head."""
    sizes = [width, width * 5 // 2, width * 5, width * 10]
    blocks = [block(cin, cout) for cin, cout in zip([3] + sizes[:-1], sizes)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(sizes[-1], ways))


def episode(args: argparse.Namespace) -> List[Tensor]:
    g = torch.Generator().manual_seed(0)
    n, s, q = args.ways, args.shots, args.queries
    xs = torch.randn(args.tasks, n * s, 3, args.image, args.image, generator=g)
    xq = torch.randn(args.tasks, n * q, 3, args.image, args.image, generator=g)
    return [
        xs,
        torch.arange(n).repeat_interleave(s).expand(args.tasks, -1),
        xq,
        torch.arange(n).repeat_interleave(q).expand(args.tasks, -1),
    ]


def meta_step(path: str, algo: str, args: argparse.Namespace) -> Callable[[], Any]:
    """One meta-step (all tasks' meta-gradients, accumulated into the model's ``.grad``)."""
    torch.manual_seed(0)
    net = resnet12(args.width, args.ways)
    data = episode(args)
    head = str(len(net) - 1)  # the linear head's name in the Sequential
    if path.startswith("fparams"):
        return _fparams_step(net, data, algo, head, args, path == "fparams_checkpoint")
    if path == "higher":
        return _higher_step(net, data, algo, args)
    return _l2l_step(net, data, algo, args)


def _fparams_step(
    net: nn.Module, data: List[Tensor], algo: str, head: str, args: argparse.Namespace, checkpoint: bool
) -> Callable[[], Any]:
    arch, params, _ = fparams.split(net)

    def ce(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(arch(p, x), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        filt = f"{head}.*" if algo == "anil" else None
        fast = fparams.adapt(ce, p, xs, ys, lr=args.lr, steps=args.steps, filter=filt, checkpoint=checkpoint)
        return ce(fast, xq, yq)

    step = fparams.meta_value_and_grad(task)

    def run() -> Any:
        return step(fparams.detach(params), *data)

    return run


def _higher_step(
    net: nn.Module, data: List[Tensor], algo: str, args: argparse.Namespace
) -> Callable[[], Any]:
    import higher

    head = list(net.children())[-1]
    inner = torch.optim.SGD(head.parameters() if algo == "anil" else net.parameters(), lr=args.lr)

    def run() -> Any:
        net.zero_grad()
        for xs, ys, xq, yq in zip(*data):
            with higher.innerloop_ctx(net, inner, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(args.steps):
                    diffopt.step(F.cross_entropy(fnet(xs), ys))
                F.cross_entropy(fnet(xq), yq).backward()

    return run


def _l2l_step(net: nn.Module, data: List[Tensor], algo: str, args: argparse.Namespace) -> Callable[[], Any]:
    import learn2learn as l2l

    if algo == "anil":  # learn2learn's ANIL: MAML over the head; the body runs on every step, as above
        body, head = net[:-1], l2l.algorithms.MAML(net[-1], lr=args.lr)  # type: ignore[index]

        def run_anil() -> Any:
            net.zero_grad()
            for xs, ys, xq, yq in zip(*data):
                learner = head.clone()
                for _ in range(args.steps):
                    learner.adapt(F.cross_entropy(learner(body(xs)), ys))
                F.cross_entropy(learner(body(xq)), yq).backward()

        return run_anil

    maml = l2l.algorithms.MAML(net, lr=args.lr)

    def run() -> Any:
        net.zero_grad()
        for xs, ys, xq, yq in zip(*data):
            learner = maml.clone()
            for _ in range(args.steps):
                learner.adapt(F.cross_entropy(learner(xs), ys))
            F.cross_entropy(learner(xq), yq).backward()

    return run


def available(path: str) -> bool:
    module = {"higher": "higher", "learn2learn": "learn2learn"}.get(path)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def peak_mib() -> Optional[float]:
    """The process's peak resident memory (VmHWM; ``ru_maxrss`` where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def one_peak(path: str, algo: str, argv: Sequence[str]) -> Optional[float]:
    """Peak MiB of one meta-step of ``path``, in a fresh interpreter."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--peak-of", f"{path}:{algo}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64, help="first block's channels (64: 64-160-320-640)")
    p.add_argument("--image", type=int, default=84)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--algos", default="maml,anil")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.peak_of:  # one path's meta-step, alone in this interpreter
        path, algo = args.peak_of.split(":")
        run = meta_step(path, algo, args)
        before = peak_mib()
        run()
        after = peak_mib()
        print(json.dumps(None if before is None or after is None else after - before))
        return {}
    paths = [p for p in PATHS if available(p)]
    missing = sorted(set(PATHS) - set(paths))
    own = [a for a in (argv if argv is not None else sys.argv[1:])]
    results: Dict[str, Dict[str, Any]] = {}
    for algo in args.algos.split(","):
        steps = {p: meta_step(p, algo, args) for p in paths}
        times = time_interleaved(steps, args.repeats, 1, 0.0, CLOCKS[args.clock])
        peaks = {p: None if args.no_memory else one_peak(p, algo, own) for p in paths}
        results[algo] = {p: {"s": times[p], "peak_mib": peaks[p]} for p in paths}
        print(
            f"\n{algo.upper()} on ResNet-12 (width {args.width}, {args.image}x{args.image}, {args.ways}-way "
            f"{args.shots}-shot, {args.queries} queries/class, {args.steps} steps, {args.tasks} tasks)"
        )
        print(f"{'path':20s} {'s / meta-step':>14s} {'peak MiB':>10s}")
        for p in paths:
            mem = peaks[p]
            print(f"{p:20s} {times[p]:14.3f} {'-' if mem is None else f'{mem:.0f}':>10s}")
    if missing:
        print(f"\nnot installed, left out: {', '.join(missing)}")
    return results


if __name__ == "__main__":
    main()
