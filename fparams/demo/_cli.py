"""The demo's command line: ``python -m fparams.demo`` and the ``fparams-demo`` script."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from typing import TYPE_CHECKING, List, Optional

import torch

import fparams
import fparams.distributed

from ._training import (
    DEFAULT_SECONDS,
    DPI,
    EVAL_QUERIES,
    EVAL_TASKS,
    EXPECTED,
    SHOTS,
    DemoError,
    DemoResult,
    run,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
        epilog=(
            f"The defaults take {DEFAULT_SECONDS} on a 2-core CPU and print a held-out MSE of "
            f"{EXPECTED[0]} before adaptation, {EXPECTED[1]} after 1 step and {EXPECTED[10]} after "
            "10 steps (float32 rounding differs between machines; the same --seed on the same "
            "machine gives the same numbers)."
        ),
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
    _add_run_options(parser)
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The remaining options: first-order MAML, compilation, seed, threads, output."""
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


def _save(figure: Figure, path: str) -> None:
    try:
        figure.savefig(path, dpi=DPI)
    except OSError as err:
        raise DemoError(f"could not save the plot to {path!r}: {err}") from err


def _join_torchrun() -> int:
    """Join the process group when started by ``torchrun``; the number of processes (1 without).

    gloo, also on GPU machines: the demo keeps its tensors on the CPU.
    """
    if not fparams.distributed.init_from_env(backend="gloo"):
        return 1
    return torch.distributed.get_world_size()


def _defaults(args: argparse.Namespace) -> bool:
    """Whether the run is the default one that :data:`EXPECTED` describes (any seed and threads)."""
    training = ("iterations", "tasks", "steps", "lr", "meta_lr", "first_order")
    return all(getattr(args, name) == build_parser().get_default(name) for name in training)


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace, out: str, progress: bool) -> DemoResult:
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
                progress=progress,
            )
            if result.figure is not None:
                _save(result.figure, out)
    except DemoError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    finally:
        fparams.distributed.shutdown()
    return result


def _report(args: argparse.Namespace, result: DemoResult, world: int, out: str) -> None:
    order = "first-order" if args.first_order else "second-order"
    print(
        f"MAML ({order}, {args.steps} inner step(s) at lr {args.lr}), {args.iterations} iterations "
        f"x {args.tasks} tasks, seed {args.seed}, {result.seconds:.1f} s"
    )
    if world > 1:
        print(f"data-parallel over {world} processes (torchrun): each takes its share of every batch")
    print(f"held-out MSE over {EVAL_TASKS} tasks ({SHOTS} support, {EVAL_QUERIES} query points each):")
    expected = _defaults(args)
    for steps, label in ((0, "before adaptation:"), (1, "after 1 step:"), (10, "after 10 steps:")):
        hint = f"   (expected {EXPECTED[steps]})" if expected else ""
        print(f"  {label:<19} {result.scores[steps]:.4f}{hint}")
    print(f"plot saved to {out}")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m fparams.demo`` and the ``fparams-demo`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _require_extras(parser)
    out = _check_out(parser, args.out)
    world = _join_torchrun()
    main_process = fparams.distributed.is_main_process()
    result = _train(parser, args, out, progress=main_process)
    if main_process:
        _report(args, result, world, out)
    return 0
