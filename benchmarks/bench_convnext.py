"""map_tasks' strategies on ConvNeXt, where vmap meets ops without a batching rule (issue 17 item 2).

torch's vmap runs an op that has no batching rule through a slow per-example
fallback (with its "performance drop" warning). ``strategy="auto"`` must not
take that path: it runs the loop instead and says so once. This script times
one second-order meta-step (``meta_value_and_grad`` over ``--tasks`` tasks,
``--steps`` inner steps) with each strategy, interleaved in one process, on a
Hugging Face ``ConvNextForImageClassification`` built from its config (no
weights; ConvNeXt-tiny's depths and widths by default) and reports which
strategy ``"auto"`` ran and which op it named::

    python benchmarks/bench_convnext.py                       # ConvNeXt-tiny shape, 64x64 images
    python benchmarks/bench_convnext.py --depths 1,1 --widths 8,16 --image 16 --repeats 1  # seconds

It needs the ``models`` extra (transformers).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import fparams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import CLOCKS, time_interleaved  # noqa: E402

STRATEGIES = ("auto", "loop", "vmap")


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    depths = [int(d) for d in args.depths.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    config = ConvNextConfig(
        num_channels=3, num_stages=len(depths), depths=depths, hidden_sizes=widths, num_labels=args.ways
    )
    torch.manual_seed(0)
    return ConvNextForImageClassification(config).train()


def episode(args: argparse.Namespace) -> List[Tensor]:
    g = torch.Generator().manual_seed(0)
    n, s = args.ways, args.shots
    x = torch.randn(args.tasks, n * s, 3, args.image, args.image, generator=g)
    y = torch.arange(n).repeat_interleave(s).expand(args.tasks, -1)
    return [x, y, x.clone(), y.clone()]


def meta_step(net: torch.nn.Module, strategy: str, args: argparse.Namespace) -> Callable[[], Any]:
    arch, params, _ = fparams.split(net)

    def ce(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(arch(p, x).logits, y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return ce(fparams.adapt(ce, p, xs, ys, lr=args.lr, steps=args.steps), xq, yq)

    step = fparams.meta_value_and_grad(task, strategy=strategy)  # type: ignore[arg-type]
    data = episode(args)
    return lambda: step(fparams.detach(params), *data)


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="3,3,9,3", help="blocks per stage (ConvNeXt-tiny: 3,3,9,3)")
    p.add_argument("--widths", default="96,192,384,768", help="channels per stage (tiny: 96,...,768)")
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    net = build(args)
    steps: Dict[str, Callable[[], Any]] = {s: meta_step(net, s, args) for s in STRATEGIES}
    said: Dict[str, List[str]] = {}
    for name, fn in steps.items():  # the first call of each: what it warns
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fn()
        said[name] = sorted({str(w.message).split("\n")[0][:160] for w in record})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clock = CLOCKS[args.clock]
        times = time_interleaved(steps, repeats=args.repeats, warmup=0, target_s=0.0, clock=clock)
    n_params = sum(p.numel() for p in net.parameters())
    print(
        f"ConvNeXt depths {args.depths} widths {args.widths}, {n_params / 1e6:.2f} M params, "
        f"{args.image}x{args.image}, {args.tasks} tasks x {args.ways * args.shots} images, "
        f"{args.steps} second-order step(s), torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(f"{'strategy':10s} {'s / meta-step':>14s}  {'x loop':>7s}")
    for name in STRATEGIES:
        print(f"{name:10s} {times[name]:14.3f}  {times[name] / times['loop']:7.2f}")
    for name in STRATEGIES:
        for message in said[name]:
            print(f"  {name}: {message}")
    return times


if __name__ == "__main__":
    main()
