"""``python -m fparams.demo``: MAML meta-learns sine-wave regression in one command.

The standard few-shot regression benchmark of Finn et al. (2017): every task is
a sine wave ``A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase
``~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``; a learner sees ``K = 10`` support
points and is scored on 10 query points. A 1-40-40-1 ReLU network is
meta-trained with MAML over batches of tasks in one vectorised call
(:func:`fparams.meta_value_and_grad`, which maps the tasks with
:func:`fparams.map_tasks`) and Adam as the outer optimizer. It is then scored
on held-out tasks before adaptation and after 1 and 10 inner steps, and a plot
of a few held-out tasks is saved.

From a notebook, ``fparams.demo.run(...)`` takes the command line's options
as keywords and returns the scores and a :class:`matplotlib.figure.Figure`; it
shows a ``tqdm.auto`` progress bar and never switches matplotlib's backend.

The pieces are plain functions so that other drivers can reuse them:
``sample_tasks(generator, n)`` draws a task batch, ``make_meta_grad(...)``
gives ``meta_grad(params, batch) -> (loss, grads)``, ``meta_step`` applies one
outer update, ``evaluate`` scores held-out tasks. Under ``torchrun
--nproc_per_node=N -m fparams.demo`` every process draws the same batches and
``shard_meta_grad`` gives each its share of the tasks and averages loss and
gradients over the processes (:mod:`fparams.distributed`); process 0 alone
shows progress, evaluates, reports and plots.

matplotlib and tqdm come with the ``demo`` extra: ``pip install 'fparams[demo]'``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import fparams
import fparams.distributed

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)
SHOTS = 10
QUERIES = 10
EVAL_SEED = 1234
EVAL_TASKS = 100
EVAL_QUERIES = 100
EVAL_STEPS = (0, 1, 10)


class DemoError(Exception):
    """A failure the command line reports as one message, without a traceback."""


MetaGrad = Callable[[Dict[str, Tensor], "TaskBatch"], Tuple[Tensor, Dict[str, Tensor]]]


class TaskBatch(NamedTuple):
    """``n`` sine tasks; every tensor holds the tasks on dim 0."""

    support_x: Tensor  # (n, shots, 1)
    support_y: Tensor
    query_x: Tensor  # (n, queries, 1)
    query_y: Tensor
    amplitude: Tensor  # (n,)
    phase: Tensor  # (n,)

    def data(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The arguments of the per-task loss: support set, then query set."""
        return self.support_x, self.support_y, self.query_x, self.query_y


def sine(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """The task's true function, broadcast over tasks on dim 0 of ``x``."""
    return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


def sample_tasks(generator: torch.Generator, n: int, shots: int = SHOTS, queries: int = QUERIES) -> TaskBatch:
    """Draw ``n`` sine tasks, each with ``shots`` support and ``queries`` query points."""

    def uniform(lo_hi: Tuple[float, float], *shape: int) -> Tensor:
        lo, hi = lo_hi
        return torch.rand(*shape, generator=generator) * (hi - lo) + lo

    amplitude = uniform(AMPLITUDE, n)
    phase = uniform(PHASE, n)
    x = uniform(INPUT_RANGE, n, shots + queries, 1)
    y = sine(x, amplitude, phase)
    return TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], amplitude, phase)


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
        return (arch(params, x) - y).pow(2).mean()

    def task_loss(params: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        fast = fparams.adapt(mse, params, xs, ys, lr=lr, steps=steps, first_order=first_order)
        return mse(fast, xq, yq)

    return task_loss


def make_meta_grad(
    arch: fparams.Architecture, lr: float, steps: int, first_order: bool = False, compile: bool = False
) -> MetaGrad:
    """``meta_grad(params, batch) -> (mean query loss, its gradient)``: one pure call over all tasks."""
    step = fparams.meta_value_and_grad(make_task_loss(arch, lr, steps, first_order), compile=compile)

    def meta_grad(params: Dict[str, Tensor], batch: TaskBatch) -> Tuple[Tensor, Dict[str, Tensor]]:
        # Detached: torch.func computes the gradient; no outer autograd graph is needed.
        return step(fparams.detach(params), *batch.data())

    return meta_grad


def shard_meta_grad(meta_grad: MetaGrad) -> MetaGrad:
    """``meta_grad`` for a ``torchrun`` run: this process's share of the tasks, averaged over all.

    Every process draws the same batch (the same seed) and takes its contiguous
    share (:func:`fparams.distributed.shard_tasks`); the loss and gradients of
    the shares are averaged with :func:`fparams.distributed.all_reduce_grads`,
    weighted by the number of tasks in each share, which gives every process
    the mean over the whole batch, as one process would compute it.
    """

    def sharded(params: Dict[str, Tensor], batch: TaskBatch) -> Tuple[Tensor, Dict[str, Tensor]]:
        share = fparams.distributed.shard_tasks(batch.support_x.shape[0])
        n = share.stop - share.start
        if n > 0:
            loss, grads = meta_grad(params, TaskBatch(*(t[share] for t in batch)))
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
    batch: TaskBatch,
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
    batch: TaskBatch,
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
    arch: fparams.Architecture, params: Dict[str, Tensor], batch: TaskBatch, lr: float, steps: int, x: Tensor
) -> Tensor:
    """Predictions at ``x`` (``(points, 1)``) of the learner adapted to every task of ``batch``."""

    def mse(q: Dict[str, Tensor], a: Tensor, b: Tensor) -> Tensor:
        return (arch(q, a) - b).pow(2).mean()

    def one(p: Dict[str, Tensor], xs: Tensor, ys: Tensor) -> Tensor:
        return arch(fparams.adapt(mse, p, xs, ys, lr=lr, steps=steps, first_order=True), x)

    return fparams.map_tasks(one)(fparams.detach(params), batch.support_x, batch.support_y).detach()


# -- command line -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fparams-demo" if os.path.basename(sys.argv[0]) == "fparams-demo" else "python -m fparams.demo",
        description=(
            "Meta-train MAML on sine-wave regression (amplitude U[0.1, 5], phase U[0, pi], "
            "x in [-5, 5], 10 support and 10 query points per task, a 1-40-40-1 MLP), with "
            "every meta-batch of tasks in one vectorised call (fparams.map_tasks). Then print "
            "the held-out MSE before adaptation and after 1 and 10 inner steps, and save a plot."
        ),
        epilog="The defaults take about 25 s of CPU time. The same --seed gives the same numbers.",
    )
    parser.add_argument(
        "--iterations", type=_positive_int, default=1000, help="meta-training steps (default: %(default)s)"
    )
    parser.add_argument(
        "--tasks", type=_positive_int, default=25, help="tasks per meta-batch (default: %(default)s)"
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=1,
        help="inner gradient steps during meta-training (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=_positive_float, default=0.01, help="inner-loop learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--meta-lr",
        type=_positive_float,
        default=3e-3,
        help="Adam learning rate of the outer loop (default: %(default)s)",
    )
    parser.add_argument(
        "--first-order",
        action="store_true",
        help="first-order MAML: no gradient through the inner gradients",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the meta-step through torch.compile (meta_value_and_grad(compile=True)); "
        "falls back to eager with a warning where compilation fails",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the network and the tasks (default: 0)")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads; this network is so small that more threads only add overhead "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default="fparams_demo.png",
        help="where to save the plot; its directory must exist (default: %(default)s)",
    )
    return parser


def _check_out(parser: argparse.ArgumentParser, out: str) -> str:
    path = os.path.abspath(os.path.expanduser(out))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        parser.error(f"argument --out: {out!r} is a directory; give a file name such as {out}/demo.png")
    if not os.path.isdir(folder):
        parser.error(f"argument --out: the directory {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        parser.error(f"argument --out: the directory {folder!r} is not writable")
    import matplotlib.figure

    kinds = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix not in kinds:
        parser.error(
            f"argument --out: cannot tell the image format from {out!r}; end it in one of "
            f"{', '.join('.' + k for k in sorted(kinds))}"
        )
    return path


def _require_extras(parser: argparse.ArgumentParser) -> None:
    missing = []
    for name in ("matplotlib", "tqdm"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        parser.exit(
            1,
            f"{parser.prog}: error: the demo needs {' and '.join(missing)}, which come with the "
            f"`demo` extra: pip install 'fparams[demo]'\n",
        )


def plot(
    arch: fparams.Architecture,
    params: Dict[str, Tensor],
    batch: TaskBatch,
    lr: float,
    scores: Dict[int, float],
) -> Figure:
    """Three held-out tasks: true curve, support points, predictions before and after adapting.

    A :class:`matplotlib.figure.Figure` made directly, without pyplot: the
    matplotlib backend (a notebook's inline one included) is left as it is.
    """
    shown = TaskBatch(*(t[:3] for t in batch))
    x = torch.linspace(*INPUT_RANGE, 200).unsqueeze(-1)
    truth = sine(x.expand(3, -1, -1), shown.amplitude, shown.phase)
    curves = {s: predict(arch, params, shown, lr, s, x) for s in (0, 1, 10)}
    fig = _figure_class()(figsize=(13, 3.8), layout="tight")
    axes = fig.subplots(1, 3, sharey=True)
    for i, ax in enumerate(axes):
        ax.plot(x, truth[i], color="black", lw=2, label="true function")
        ax.plot(x, curves[0][i], "--", color="tab:gray", label="meta-learned init (0 steps)")
        ax.plot(x, curves[1][i], color="tab:orange", label="after 1 step")
        ax.plot(x, curves[10][i], color="tab:blue", label="after 10 steps")
        ax.scatter(
            shown.support_x[i], shown.support_y[i], color="tab:red", zorder=3, label="10 support points"
        )
        ax.set_title(f"held-out task: A={float(shown.amplitude[i]):.2f}, phase={float(shown.phase[i]):.2f}")
        ax.set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(
        f"MAML on sine waves with fparams: held-out MSE {scores[0]:.2f} before adaptation, "
        f"{scores[1]:.2f} after 1 step, {scores[10]:.2f} after 10 steps"
    )
    return fig


def _figure_class() -> type:
    """``Figure`` that Jupyter shows as a PNG even where pyplot (and so its inline backend) was never
    imported; where it was, IPython's formatter for figures draws it as usual."""
    from matplotlib.figure import Figure

    class ShownFigure(Figure):
        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()

    return ShownFigure


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
    """
    from tqdm.auto import tqdm

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
            loss = meta_step(meta_grad, params, optimizer, sample_tasks(generator, tasks))
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
        held_out = sample_tasks(torch.Generator().manual_seed(EVAL_SEED), EVAL_TASKS, SHOTS, EVAL_QUERIES)
        scores = evaluate(arch, params, held_out, lr)
        figure = plot(arch, params, held_out, lr, scores)
        return DemoResult(scores, figure, losses, arch, params, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)


def _save(figure: Figure, path: str) -> None:
    try:
        figure.savefig(path, dpi=100)
    except OSError as err:
        raise DemoError(f"could not save the plot to {path!r}: {err}") from err


def _join_torchrun() -> int:
    """Join the process group when started by ``torchrun``; the number of processes (1 without).

    gloo, also on GPU machines: the demo keeps its tensors on the CPU.
    """
    if not fparams.distributed.init_from_env(backend="gloo"):
        return 1
    return torch.distributed.get_world_size()


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m fparams.demo`` and the ``fparams-demo`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _require_extras(parser)
    out = _check_out(parser, args.out)

    world = _join_torchrun()
    main_process = fparams.distributed.is_main_process()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", fparams.CompileFallbackWarning)
            result = run(
                iterations=args.iterations,
                tasks=args.tasks,
                steps=args.steps,
                lr=args.lr,
                meta_lr=args.meta_lr,
                first_order=args.first_order,
                compile=args.compile,
                seed=args.seed,
                threads=args.threads,
                progress=main_process,
            )
            if result.figure is not None:
                _save(result.figure, out)
    except DemoError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    finally:
        fparams.distributed.shutdown()
    scores, elapsed = result.scores, result.seconds

    if not main_process:
        return 0
    order = "first-order" if args.first_order else "second-order"
    print(
        f"MAML ({order}, {args.steps} inner step(s) at lr {args.lr}), {args.iterations} iterations "
        f"x {args.tasks} tasks, seed {args.seed}, {elapsed:.1f} s"
    )
    if world > 1:
        print(f"data-parallel over {world} processes (torchrun): each takes its share of every batch")
    print(f"held-out MSE over {EVAL_TASKS} tasks ({SHOTS} support, {EVAL_QUERIES} query points each):")
    print(f"  before adaptation:  {scores[0]:.4f}")
    print(f"  after 1 step:       {scores[1]:.4f}")
    print(f"  after 10 steps:     {scores[10]:.4f}")
    print(f"plot saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
