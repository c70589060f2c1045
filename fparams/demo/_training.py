"""The demo's training pieces: model, meta-gradient, evaluation, and :func:`run`."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import fparams
import fparams.distributed
from fparams.datasets import SineTasks, sine_tasks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SHOTS = 10
QUERIES = 10
EVAL_SEED = 1234
EVAL_TASKS = 100
EVAL_QUERIES = 100
EVAL_STEPS = (0, 1, 10)


class DemoError(Exception):
    """A failure the command line reports as one message, without a traceback."""


#: The demo's task batches: :class:`fparams.datasets.SineTasks` (its old name, kept for drivers).
TaskBatch = SineTasks

MetaGrad = Callable[[Dict[str, Tensor], SineTasks], Tuple[Tensor, Dict[str, Tensor]]]
#: Resolution of the demo's images (saved and shown in Jupyter).
DPI = 150


class Range(NamedTuple):
    """Where a held-out MSE of the default run falls, on any machine."""

    low: float
    high: float

    def __contains__(self, value: object) -> bool:
        return isinstance(value, float) and self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


#: The default run's held-out MSE by inner steps, as ranges that hold across machines: measured over
#: seeds 0-6 and 1 or 2 threads (2.68-2.78, 0.60-0.81 and 0.26-0.48), with a margin. Float32
#: rounding differs between CPUs and 1000 meta-steps amplify it; a seed changes more than a machine.
EXPECTED: Dict[int, Range] = {0: Range(2.5, 3.0), 1: Range(0.5, 0.95), 10: Range(0.2, 0.6)}
#: What the defaults cost: measured 8-25 s on a 2-core CPU (1 thread), idle to shared.
DEFAULT_SECONDS = "10-30 s"


def sample_tasks(generator: torch.Generator, n: int, shots: int = SHOTS, queries: int = QUERIES) -> SineTasks:
    """``fparams.datasets.sine_tasks(n, shots, queries, generator=generator)``, the old signature."""
    return sine_tasks(n, shots, queries, generator=generator)


def make_model(seed: int) -> nn.Module:
    """The 1-40-40-1 ReLU network of the MAML paper, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def make_task_loss(
    arch: fparams.Architecture, lr: float, steps: int, first_order: bool
) -> Callable[..., Tensor]:
    """``task_loss(params, support_x, support_y, query_x, query_y)`` for one task:
    adapt on the support set, then the MSE on the query set."""

    def mse(params: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        prediction: Tensor = arch(params, x)
        return (prediction - y).pow(2).mean()

    def task_loss(params: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        fast = fparams.adapt(mse, params, xs, ys, lr=lr, steps=steps, first_order=first_order)
        return mse(fast, xq, yq)

    return task_loss


def make_meta_grad(
    arch: fparams.Architecture, lr: float, steps: int, first_order: bool = False, compile: bool = False
) -> MetaGrad:
    """``meta_grad(params, batch) -> (mean query loss, its gradient)``: one pure call over all tasks."""
    step = fparams.meta_value_and_grad(make_task_loss(arch, lr, steps, first_order), compile=compile)

    def meta_grad(params: Dict[str, Tensor], batch: SineTasks) -> Tuple[Tensor, Dict[str, Tensor]]:
        # Detached: torch.func computes the gradient; no outer autograd graph is needed.
        loss, grads = step(fparams.detach(params), *batch.data())
        return loss, grads

    return meta_grad


def shard_meta_grad(meta_grad: MetaGrad) -> MetaGrad:
    """``meta_grad`` for a ``torchrun`` run: this process's share of the tasks, averaged over all.

    Every process draws the same batch (the same seed) and takes its contiguous
    share (:func:`fparams.distributed.shard_tasks`); the loss and gradients of
    the shares are averaged with :func:`fparams.distributed.all_reduce_grads`,
    weighted by the number of tasks in each share, which gives every process
    the mean over the whole batch, as one process would compute it.
    """

    def sharded(params: Dict[str, Tensor], batch: SineTasks) -> Tuple[Tensor, Dict[str, Tensor]]:
        share = fparams.distributed.shard_tasks(batch.support_x.shape[0])
        n = share.stop - share.start
        if n > 0:
            loss, grads = meta_grad(params, SineTasks(*(t[share] for t in batch)))
        else:  # fewer tasks than processes
            loss, grads = torch.zeros(()), fparams.zeros_like(params)
        grads = fparams.distributed.all_reduce_grads(grads, weight=n)
        loss = fparams.distributed.all_reduce_grads({"loss": loss.detach()}, weight=n)["loss"]
        return loss, grads

    return sharded


def meta_step(
    meta_grad: MetaGrad,
    params: Dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    batch: SineTasks,
) -> float:
    """One outer update of ``params`` (leaf tensors owned by ``optimizer``); returns the meta-loss."""
    loss, grads = meta_grad(params, batch)
    # Under torchrun, meta_grad is shard_meta_grad(...): already averaged across processes.
    for name, p in params.items():
        p.grad = grads[name]
    optimizer.step()
    return float(loss)


def evaluate(
    arch: fparams.Architecture,
    params: Dict[str, Tensor],
    batch: SineTasks,
    lr: float,
    steps: Sequence[int] = EVAL_STEPS,
) -> Dict[int, float]:
    """Mean query MSE over the tasks of ``batch`` after each number of inner steps."""
    fixed = fparams.detach(params)
    return {
        s: float(
            fparams.map_tasks(make_task_loss(arch, lr, s, first_order=True))(fixed, *batch.data()).mean()
        )
        for s in steps
    }


def predict(
    arch: fparams.Architecture, params: Dict[str, Tensor], batch: SineTasks, lr: float, steps: int, x: Tensor
) -> Tensor:
    """Predictions at ``x`` (``(points, 1)``) of the learner adapted to every task of ``batch``."""

    def mse(q: Dict[str, Tensor], a: Tensor, b: Tensor) -> Tensor:
        prediction: Tensor = arch(q, a)
        return (prediction - b).pow(2).mean()

    def one(p: Dict[str, Tensor], xs: Tensor, ys: Tensor) -> Tensor:
        out: Tensor = arch(fparams.adapt(mse, p, xs, ys, lr=lr, steps=steps, first_order=True), x)
        return out

    out: Tensor = fparams.map_tasks(one)(fparams.detach(params), batch.support_x, batch.support_y)
    return out.detach()


class DemoResult(NamedTuple):
    """What :func:`run` returns; in a notebook, show ``result.figure``.

    Attributes:
        scores: held-out MSE by number of inner steps (0, 1, 10); ``{}`` off process 0.
        figure: three held-out tasks (:func:`plot`); ``None`` off process 0.
        losses: the meta-loss of every meta-step.
        arch: the network's architecture.
        params: the meta-trained parameters.
        seconds: wall time of meta-training and evaluation.
    """

    scores: Dict[int, float]
    figure: Optional[Figure]
    losses: List[float]
    arch: fparams.Architecture
    params: Dict[str, Tensor]
    seconds: float

    def __repr__(self) -> str:  # one line: a notebook shows this, not every loss and tensor
        scores = ", ".join(f"{steps}: {mse:.4f}" for steps, mse in self.scores.items())
        return (
            f"DemoResult(scores={{{scores}}}, iterations={len(self.losses)}, "
            f"params={sum(p.numel() for p in self.params.values())} numbers, seconds={self.seconds:.1f})"
        )


def run(
    *,
    iterations: int = 1000,
    tasks: int = 25,
    steps: int = 1,
    lr: float = 0.01,
    meta_lr: float = 3e-3,
    first_order: bool = False,
    compile: bool = False,
    seed: int = 0,
    threads: Optional[int] = 1,
    progress: bool = True,
) -> DemoResult:
    """Meta-train, evaluate and plot: the demo as a function, for notebooks and scripts.

    The keywords are the command line's options, with the same defaults, so
    ``run()`` gives the numbers ``python -m fparams.demo`` prints. The progress
    bar is ``tqdm.auto``'s (a widget in Jupyter) and shows the meta-loss.
    ``threads`` sets torch's CPU threads for the run and restores them after
    (``None`` leaves them alone). Nothing is printed, saved or switched
    globally: the figure is a :class:`matplotlib.figure.Figure`, so the
    notebook's matplotlib backend stays as it was.

    Examples:
        ``fparams.demo.run()`` in a notebook; here a short run without the bar:

        >>> import fparams.demo, matplotlib.figure
        >>> result = fparams.demo.run(iterations=2, tasks=4, progress=False)
        >>> sorted(result.scores), isinstance(result.figure, matplotlib.figure.Figure)
        ([0, 1, 10], True)
        >>> repr(result).startswith("DemoResult(scores={0: ")
        True
    """
    from tqdm.auto import tqdm

    from ._figure import plot

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        model = make_model(seed)
        arch, params, _ = fparams.split(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=meta_lr)
        meta_grad = make_meta_grad(arch, lr, steps, first_order, compile)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            meta_grad = shard_meta_grad(meta_grad)
        generator = torch.Generator().manual_seed(seed)

        losses: List[float] = []
        bar = tqdm(range(iterations), desc="meta-training", disable=not progress)
        for it in bar:
            loss = meta_step(meta_grad, params, optimizer, sine_tasks(tasks, generator=generator))
            if not math.isfinite(loss):
                raise DemoError(
                    f"the meta-loss became {loss} at iteration {it}; lower --lr (inner) or --meta-lr"
                )
            losses.append(loss)
            if it % 10 == 0 or it == iterations - 1:
                bar.set_postfix(meta_loss=f"{loss:.3f}")
        bar.close()

        if not fparams.distributed.is_main_process():  # under torchrun, process 0 evaluates and plots
            return DemoResult({}, None, losses, arch, params, time.perf_counter() - start)
        held_out = sine_tasks(
            EVAL_TASKS, SHOTS, EVAL_QUERIES, generator=torch.Generator().manual_seed(EVAL_SEED)
        )
        scores = evaluate(arch, params, held_out, lr)
        figure = plot(arch, params, held_out, lr, scores)
        return DemoResult(scores, figure, losses, arch, params, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
