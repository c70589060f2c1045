"""Every bad input to map_tasks, meta_value_and_grad, stack_tasks and pad_tasks: an fparams error
that names the function, the argument and the fix (issue 16, uniform validation)."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Type

import pytest
import torch
from torch import Tensor, nn

import fparams
from fparams import FparamsTypeError, FparamsValueError

torch.manual_seed(0)
ARCH, PARAMS, _ = fparams.split(nn.Linear(2, 1))
X, Y = torch.randn(3, 4, 2), torch.randn(3, 4, 1)


def _ok(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return (ARCH(p, x) - y).pow(2).mean()


def _returns(value: Any) -> Callable[..., Any]:
    return lambda p, x, y: value


def _raises(kind: Type[Exception], message: str, call: Callable[[], Any]) -> None:
    with pytest.raises(kind, match="^" + re.escape(message)):
        call()


MAP = "fparams.map_tasks: "
MVG = "fparams.meta_value_and_grad: "

CASES = {
    "strategy-as-call-keyword": (
        FparamsTypeError,
        MAP + "`strategy` is an option of fparams.map_tasks itself, not of the function it returns: "
        "pass it when mapping, fparams.map_tasks(fn, strategy=...), then call the result as "
        "f(params, *task_batches).",
        lambda: fparams.map_tasks(_ok)(PARAMS, X, Y, strategy="vmap"),
    ),
    "two-own-keywords": (
        FparamsTypeError,
        MAP + "`batch_stats`, `chunk_size` are options of fparams.map_tasks itself",
        lambda: fparams.map_tasks(_ok)(PARAMS, X, Y, chunk_size=2, batch_stats=True),
    ),
    "compile-is-not-a-map-tasks-option": (
        FparamsTypeError,
        MAP + "the mapped function takes no keyword argument 'compile';",
        lambda: fparams.map_tasks(_ok)(PARAMS, X, Y, compile=True),
    ),
    "unknown-call-keyword": (
        FparamsTypeError,
        MAP + "the mapped function takes no keyword argument 'foo'; call it as f(params, *task_batches) "
        "or f(params, tasks=[...]).",
        lambda: fparams.map_tasks(_ok)(PARAMS, X, Y, foo=1),
    ),
    "no-params": (
        FparamsTypeError,
        MAP + "call the mapped function as f(params, *task_batches); no params were given.",
        lambda: fparams.map_tasks(_ok)(),
    ),
    "returns-float-vmap": (
        FparamsTypeError,
        MAP + "the function returned float 1.0 for a task; return tensors (e.g. the loss as a 0-dim "
        "tensor), which are stacked per task.",
        lambda: fparams.map_tasks(_returns(1.0))(PARAMS, X, Y),
    ),
    "returns-none-vmap": (
        FparamsTypeError,
        MAP + "the function returned NoneType None for a task;",
        lambda: fparams.map_tasks(_returns(None), strategy="vmap")(PARAMS, X, Y),
    ),
    "returns-float-loop": (
        FparamsTypeError,
        MAP + "the function returned float 1.0 for task 0 (output leaf 0); return tensors",
        lambda: fparams.map_tasks(_returns(1.0), strategy="loop")(PARAMS, X, Y),
    ),
    "returns-none-tasks": (
        FparamsTypeError,
        MAP + "the function returned NoneType None for task 0 (output leaf 0);",
        lambda: fparams.map_tasks(_returns(None))(PARAMS, tasks=[(X[0], Y[0])]),
    ),
    "task-outputs-of-different-shapes": (
        FparamsValueError,
        MAP + "the per-task outputs (leaf 0) differ in shape (task 0: (4, 1), task 1: (2, 1)), so they "
        "cannot be stacked. Reduce each task's output to a common shape (e.g. .mean() for a loss).",
        lambda: fparams.map_tasks(lambda p, x, y: ARCH(p, x))(
            PARAMS, tasks=[(X[0], Y[0]), (X[0, :2], Y[0, :2])]
        ),
    ),
    "batch-stats-not-a-flag": (
        FparamsTypeError,
        MAP + "`batch_stats` must be True or False; got str 'yes'.",
        lambda: fparams.map_tasks(_ok, batch_stats="yes"),
    ),
    "mvg-tuple-without-has-aux-vmap": (
        FparamsTypeError,
        MVG + "`task_fn` returned a tuple of 2 values; it must return one scalar loss per task. To return "
        "more, return (loss, aux) and pass has_aux=True.",
        lambda: fparams.meta_value_and_grad(lambda p, x, y: (_ok(p, x, y), 1))(PARAMS, X, Y),
    ),
    "mvg-tuple-without-has-aux-loop": (
        FparamsTypeError,
        MVG + "`task_fn` returned a tuple of 2 values;",
        lambda: fparams.meta_value_and_grad(lambda p, x, y: (_ok(p, x, y), 1), strategy="loop")(PARAMS, X, Y),
    ),
    "mvg-tuple-without-has-aux-transform": (
        FparamsTypeError,
        MVG + "`task_fn` returned a tuple of 2 values;",
        lambda: torch.func.grad(
            lambda p: fparams.meta_value_and_grad(lambda q, x, y: (_ok(q, x, y), 1))(p, X, Y)[0]
        )(PARAMS),
    ),
    "mvg-returns-none": (
        FparamsTypeError,
        MVG + "the function returned NoneType None for a task;",
        lambda: fparams.meta_value_and_grad(_returns(None))(PARAMS, X, Y),
    ),
    "mvg-aux-not-a-pair": (
        FparamsValueError,
        MVG + "has_aux=True needs task_fn to return (loss, aux); it returned a tensor of shape (3,).",
        lambda: fparams.meta_value_and_grad(_ok, has_aux=True)(PARAMS, X, Y),
    ),
    "mvg-has-aux-not-a-flag": (
        FparamsTypeError,
        MVG + "`has_aux` must be True or False; got str 'no'.",
        lambda: fparams.meta_value_and_grad(_ok, has_aux="no"),
    ),
    "mvg-compile-not-a-flag": (
        FparamsTypeError,
        MVG + "`compile` must be True or False; got str 'False'.",
        lambda: fparams.meta_value_and_grad(_ok, compile="False"),
    ),
    "mvg-batch-stats-not-a-flag": (
        FparamsTypeError,
        MVG + "`batch_stats` must be True or False; got int 1.",
        lambda: fparams.meta_value_and_grad(_ok, batch_stats=1),
    ),
    "mvg-own-keyword-on-the-step": (
        FparamsTypeError,
        MVG + "`has_aux` is an option of fparams.meta_value_and_grad itself, not of the function it "
        "returns: pass it when mapping, fparams.meta_value_and_grad(fn, has_aux=...)",
        lambda: fparams.meta_value_and_grad(_ok)(PARAMS, X, Y, has_aux=True),
    ),
    "mvg-int-params": (
        FparamsTypeError,
        MVG + "`params['weight']` is int 1; the gradient is taken with respect to every value of "
        "`params`, so each must be a floating-point tensor (pass constants through task_fn's closure).",
        lambda: fparams.meta_value_and_grad(_ok)({"weight": 1, "bias": 2}, X, Y),
    ),
    "mvg-integer-tensor-params": (
        FparamsTypeError,
        MVG + "`params['w']` has dtype torch.int64; gradients need floating-point tensors.",
        lambda: fparams.meta_value_and_grad(lambda p, x, y: x.sum())(
            {"w": torch.ones(2, dtype=torch.long)}, X, Y
        ),
    ),
    "mvg-strategy-unknown": (
        FparamsValueError,
        MVG + "`strategy` must be one of ('auto', 'vmap', 'loop', 'chunked'); got 'fast'.",
        lambda: fparams.meta_value_and_grad(_ok, strategy="fast"),
    ),
    "stack-tasks-non-tensor-value": (
        FparamsTypeError,
        "fparams.stack_tasks: `tensors['a']` is float 1.0, not a tensor; stack_tasks copies tensors "
        "(leave other values out, or make them tensors with torch.as_tensor).",
        lambda: fparams.stack_tasks({"a": 1.0}, 2),
    ),
    "pad-tasks-non-tensor-value": (
        FparamsTypeError,
        "fparams.pad_tasks: `tensors[1]` is a str, not a tensor.",
        lambda: fparams.pad_tasks([torch.ones(1), "x"]),
    ),
    "pad-tasks-nan-padding": (
        FparamsValueError,
        "fparams.pad_tasks: `value` must be a finite number (the padding); got float nan.",
        lambda: fparams.pad_tasks([torch.ones(1)], value=float("nan")),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_specific_fparams_error(case: str) -> None:
    kind, message, call = CASES[case]
    _raises(kind, message, call)


def test_the_users_own_error_inside_the_task_is_not_renamed() -> None:
    def task(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        raise KeyError("mine")

    for strategy in ("auto", "loop", "vmap"):
        with pytest.raises(KeyError, match="mine"):
            fparams.map_tasks(task, strategy=strategy)(PARAMS, X, Y)


def test_a_misused_fparams_call_inside_the_task_keeps_its_own_name() -> None:
    def task(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return fparams.adapt(_ok, p, x, y, lr=-1.0)

    with pytest.raises(FparamsValueError, match=r"^fparams\.adapt: `lr`"):
        fparams.meta_value_and_grad(task)(PARAMS, X, Y)
