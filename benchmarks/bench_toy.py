"""The per-task loop on tiny tasks: learn2learn's ``maml_toy.py``, four ways, in one process.

The model is a diagonal Normal distribution (``mu`` and ``sigma``, 5 numbers
each); a task is a target mean and variance drawn from a standard normal; the
task loss is the squared distance of the model's mean and variance to the
target's; one inner step (lr 0.01), second order, 50 tasks per meta-step.
learn2learn's script evaluates the proposal it drew *before* adaptation
after ``adapt``; here every path evaluates the adapted model, so the
meta-gradient depends on the inner step and all paths compute the same one
(checked before timing).

Paths:

* ``MAML class``: learn2learn's way with :class:`fparams.MAML`: per task
  ``learner = maml.clone()``, ``learner.adapt(loss)``, the loss of
  ``learner()``, summed, divided by the task count, ``.backward()``;
* ``map_tasks loop``: ``fparams.map_tasks(task, strategy="loop")`` with
  :func:`fparams.adapt` inside, ``.mean().backward()``;
* ``meta_value_and_grad loop``: :func:`fparams.meta_value_and_grad` with the
  loop strategy on detached params (each task's gradient taken in turn);
* ``map_tasks vmap``: the default for such tasks, for reference.

Each number is the median over interleaved samples in milliseconds per
meta-step (``--clock cpu``, the default here, counts this process's CPU time,
steadier while other processes share the cores). Run
``python benchmarks/bench_toy.py`` (a minute) or ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Normal

import fparams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import CLOCKS, time_interleaved  # noqa: E402

DIM = 5
LR = 1e-2


class Model(nn.Module):
    """learn2learn's toy model: a Normal distribution with learned mean and scale."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(DIM))
        self.sigma = nn.Parameter(torch.rand(DIM) + 0.5)

    def forward(self) -> Normal:
        return Normal(self.mu, self.sigma, validate_args=False)  # no data-dependent check under vmap


def toy_loss(proposal: Normal, target: Tensor) -> Tensor:
    return (target[:DIM] - proposal.mean).pow(2).sum() + (target[DIM:] - proposal.variance).pow(2).sum()


def paths(model: Model, targets: Tensor) -> Dict[str, Callable[[], List[Tensor]]]:
    maml = fparams.MAML(model, lr=LR)
    arch, params, _ = fparams.split(model)
    n = targets.size(0)

    def task(p: Dict[str, Tensor], target: Tensor) -> Tensor:
        def loss(q: Dict[str, Tensor], t: Tensor) -> Tensor:
            return toy_loss(arch(q), t)

        return loss(fparams.adapt(loss, p, target, lr=LR), target)

    def maml_class() -> List[Tensor]:
        model.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for i in range(n):
            learner = maml.clone()
            learner.adapt(toy_loss(learner(), targets[i]))
            total = total + toy_loss(learner(), targets[i])
        (total / n).backward()
        return [p.grad for p in model.parameters()]

    def backward(strategy: str) -> Callable[[], List[Tensor]]:
        mapped = fparams.map_tasks(task, strategy=strategy)

        def run() -> List[Tensor]:
            model.zero_grad(set_to_none=True)
            mapped(params, targets).mean().backward()
            return [p.grad for p in model.parameters()]

        return run

    step = fparams.meta_value_and_grad(task, strategy="loop")

    def pure() -> List[Tensor]:
        return list(step(fparams.detach(params), targets)[1].values())

    return {
        "MAML class": maml_class,
        "map_tasks loop": backward("loop"),
        "meta_value_and_grad loop": pure,
        "map_tasks vmap": backward("vmap"),
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--target-ms", type=float, default=300.0)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.repeats, args.target_ms = 3, 1, 0.0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model()
    targets = torch.randn(args.tasks, 2 * DIM)
    fns = paths(model, targets)
    ref = fns["MAML class"]()
    for name, fn in fns.items():
        for got, want in zip(fn(), ref):
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                raise AssertionError(f"bench_toy: {name} computes another meta-gradient than the MAML class")
    seconds = time_interleaved(fns, args.repeats, 1, args.target_ms / 1e3, CLOCKS[args.clock])
    ms = {k: v * 1e3 for k, v in seconds.items()}
    base = ms["MAML class"]
    print(f"maml_toy: {args.tasks} tasks, 1 inner step, {args.clock} clock, {args.threads} thread(s)")
    print("| path | ms / meta-step | vs MAML class |")
    print("|---|---|---|")
    for name, t in ms.items():
        print(f"| {name} | {t:.2f} | {t / base:.2f}x |")
    return ms


if __name__ == "__main__":
    main()
