"""``python -m fparams.demo``: MAML meta-learns sine-wave regression in one command.

The standard few-shot regression benchmark of Finn et al. (2017): every task is
a sine wave ``A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase
``~ U[0, pi]`` and inputs ``x ~ U[-5, 5]`` (:func:`fparams.datasets.sine_tasks`);
a learner sees ``K = 10`` support points and is scored on 10 query points. A
1-40-40-1 ReLU network is meta-trained with MAML over batches of tasks in one
vectorised call (:func:`fparams.meta_value_and_grad`, which maps the tasks with
:func:`fparams.map_tasks`) and Adam as the outer optimizer. It is then scored
on held-out tasks before adaptation and after 1 and 10 inner steps, and a plot
of a few held-out tasks is saved.

The held-out numbers depend on the machine's float32 rounding, which 1000
meta-steps amplify: :data:`EXPECTED` holds the ranges they fall in on any
machine (measured over seeds and thread counts; ``tests/test_demo.py`` checks
the demo's output against them).

From a notebook, ``fparams.demo.run(...)`` takes the command line's options
as keywords and returns the scores and a :class:`matplotlib.figure.Figure`; it
shows a ``tqdm.auto`` progress bar and never switches matplotlib's backend.

The pieces are plain functions so that other drivers can reuse them:
``make_meta_grad(...)`` gives ``meta_grad(params, batch) -> (loss, grads)``,
``meta_step`` applies one outer update, ``evaluate`` scores held-out tasks. Under
``torchrun --nproc_per_node=N -m fparams.demo`` every process draws the same
batches and ``shard_meta_grad`` gives each its share of the tasks and averages
loss and gradients over the processes (:mod:`fparams.distributed`); process 0
alone shows progress, evaluates, reports and plots.

matplotlib and tqdm come with the ``demo`` extra: ``pip install 'fparams[demo]'``.
"""

from typing import TYPE_CHECKING

from fparams.datasets import sine

from ._cli import build_parser, main
from ._training import (
    EVAL_QUERIES,
    EVAL_SEED,
    EVAL_STEPS,
    EVAL_TASKS,
    EXPECTED,
    QUERIES,
    SHOTS,
    DemoError,
    DemoResult,
    MetaGrad,
    TaskBatch,
    evaluate,
    make_meta_grad,
    make_model,
    make_task_loss,
    meta_step,
    predict,
    run,
    sample_tasks,
    shard_meta_grad,
)

if TYPE_CHECKING:  # at run time, on first use (__getattr__ below)
    from ._figure import ShownFigure, plot

__all__ = [
    "EVAL_QUERIES",
    "EVAL_SEED",
    "EVAL_STEPS",
    "EVAL_TASKS",
    "EXPECTED",
    "QUERIES",
    "SHOTS",
    "DemoError",
    "DemoResult",
    "MetaGrad",
    "ShownFigure",
    "TaskBatch",
    "build_parser",
    "evaluate",
    "main",
    "make_meta_grad",
    "make_model",
    "make_task_loss",
    "meta_step",
    "plot",
    "predict",
    "run",
    "sample_tasks",
    "shard_meta_grad",
    "sine",
]


def __getattr__(name: str) -> object:
    # The figure needs matplotlib (the `demo` extra): imported on first use, so that the command
    # line can say which extra is missing instead of failing on import.
    if name in ("plot", "ShownFigure"):
        from . import _figure

        return getattr(_figure, name)
    raise AttributeError(f"module 'fparams.demo' has no attribute {name!r}")
