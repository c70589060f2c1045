"""meta_value_and_grad takes each chunk's gradient before the next chunk runs.

The gradient is checked against torch.func.grad_and_value of the whole mean
loss (one graph for all tasks, the unchunked reference); how many tasks'
graphs are alive at once is checked through autograd's saved-tensor hooks:
every tensor autograd saves is held by a small object whose lifetime is that
of the graph, so a task's graph has been freed exactly when its holders are.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import assert_dicts_close, loss_fn, task_data

TOL = dict(rtol=1e-10, atol=1e-12)
T = 6
CASES = [("vmap", None), ("loop", None), ("chunked", 2), ("chunked", 4), ("auto", None)]


def _task_fn() -> Tuple[Any, Dict[str, Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    arch, params, _ = fparams.split(net)

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Any:
        loss = mse(fparams.adapt(mse, p, xs, ys, lr=0.2, steps=2), xq, yq)
        return loss, {"twice": 2 * loss, "x0": xq[0]}

    return task, fparams.detach(params)


def _unchunked(task: Any, params: Dict[str, Tensor], data: List[Tensor]) -> Any:
    def mean_loss(p: Dict[str, Tensor]) -> Tuple[Tensor, Any]:
        losses, aux = fparams.map_tasks(task, strategy="vmap")(p, *data)
        return losses.mean(), aux

    grads, (value, aux) = torch.func.grad_and_value(mean_loss, has_aux=True)(params)
    return value, aux, grads


@pytest.mark.parametrize("strategy, chunk_size", CASES)
def test_chunked_gradients_equal_the_unchunked_one(strategy: str, chunk_size: Any) -> None:
    task, params = _task_fn()
    data = task_data(T, shots=5, seed=3)
    want_value, want_aux, want_grads = _unchunked(task, params, data)
    step = fparams.meta_value_and_grad(task, has_aux=True, strategy=strategy, chunk_size=chunk_size)
    (value, aux), grads = step(params, *data)
    torch.testing.assert_close(value, want_value, **TOL)
    assert_dicts_close(aux, want_aux, **TOL)
    assert_dicts_close(grads, want_grads, **TOL)
    # detached params: plain values come back, with nothing left to hold a graph
    assert not value.requires_grad and not any(t.requires_grad for t in [*aux.values(), *grads.values()])


class _Holder:
    def __init__(self, tensor: Tensor, task: int) -> None:
        self.tensor, self.task = tensor, task


def _graphs_alive_while_running(
    run: Any, task: Any, params: Dict[str, Tensor], data: List[Tensor]
) -> List[int]:
    """For each task, the number of earlier tasks whose graph is still alive when it starts."""
    holders: List[weakref.ReferenceType[_Holder]] = []
    current = [0]
    alive_at_start: List[int] = []

    def counting(p: Dict[str, Tensor], *args: Tensor) -> Any:
        live = {h.task for h in (r() for r in holders) if h is not None}
        alive_at_start.append(len(live))
        current[0] += 1
        return task(p, *args)

    def pack(t: Tensor) -> _Holder:
        holder = _Holder(t, current[0])
        holders.append(weakref.ref(holder))
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
        run(counting, params, data)
    return alive_at_start


def test_the_loop_holds_one_task_graph_at_a_time() -> None:
    task, params = _task_fn()
    data = task_data(T, shots=5, seed=4)

    def pure(fn: Any, p: Dict[str, Tensor], d: List[Tensor]) -> None:
        fparams.meta_value_and_grad(lambda *a: fn(*a)[0], strategy="loop")(p, *d)

    def backward(fn: Any, p: Dict[str, Tensor], d: List[Tensor]) -> None:
        leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
        fparams.map_tasks(lambda *a: fn(*a)[0], strategy="loop")(leaves, *d).mean().backward()

    assert _graphs_alive_while_running(pure, task, params, data) == [0] * T
    # the same count sees .backward()'s graph grow task by task: the check can fail
    assert _graphs_alive_while_running(backward, task, params, data) == list(range(T))


@pytest.mark.skipif(
    not fparams._torch_compat.SAVED_HOOKS_UNDER_VMAP,
    reason="this torch refuses the counting saved-tensor hooks under vmap",
)
def test_chunks_hold_one_chunk_graph_at_a_time() -> None:
    task, params = _task_fn()
    data = task_data(T, shots=5, seed=5)

    def run(fn: Any, p: Dict[str, Tensor], d: List[Tensor]) -> None:
        def chunk_task(*a: Tensor) -> Tensor:
            return fn(*a)[0]

        fparams.meta_value_and_grad(chunk_task, strategy="chunked", chunk_size=2)(p, *d)

    # under vmap the task function runs once per chunk: 3 chunks of 2 tasks
    assert _graphs_alive_while_running(run, task, params, data) == [0, 0, 0]


def test_params_that_require_grad_keep_every_graph_for_higher_order() -> None:
    # the meta-gradient is differentiable further, as torch.func's is: the graphs stay
    task, params = _task_fn()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    data = task_data(T, shots=5, seed=6)
    (value, _), grads = fparams.meta_value_and_grad(task, has_aux=True, strategy="loop")(leaves, *data)
    assert value.requires_grad and all(g.requires_grad for g in grads.values())


def _ragged(seed: int) -> List[Tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(n, k, generator=g, dtype=torch.float64) for k in (3, 1, 3, 1))
        for n in (2, 5, 3, 7)
    ]


def test_tasks_of_different_sizes_one_at_a_time() -> None:
    task, params = _task_fn()
    tasks = _ragged(7)
    step = fparams.meta_value_and_grad(task, has_aux=True)
    (value, aux), grads = step(params, tasks=tasks)
    # the reference: each task by hand, the mean loss, one torch.func.grad over all of them
    def mean_loss(p: Dict[str, Tensor]) -> Tensor:
        return torch.stack([task(p, *t)[0] for t in tasks]).mean()

    want, want_value = torch.func.grad_and_value(mean_loss)(params)
    torch.testing.assert_close(value, want_value, **TOL)
    assert_dicts_close(grads, want, **TOL)
    assert aux["twice"].shape == (len(tasks),)
    # and the same under an outer transform, where torch.func takes the whole mean
    outer = torch.func.grad(lambda p: step(p, tasks=tasks)[0][0])(params)
    assert_dicts_close(outer, want, **TOL)


def test_tasks_of_different_sizes_hold_one_graph_at_a_time() -> None:
    task, params = _task_fn()
    tasks = _ragged(8)

    def run(fn: Any, p: Dict[str, Tensor], d: List[Tensor]) -> None:
        fparams.meta_value_and_grad(lambda *a: fn(*a)[0])(p, tasks=tasks)

    assert _graphs_alive_while_running(run, task, params, []) == [0] * len(tasks)


def test_tasks_list_errors_name_meta_value_and_grad() -> None:
    task, params = _task_fn()
    tasks = _ragged(9)
    message = r"^fparams\.meta_value_and_grad: a list of per-task tuples .*strategy='vmap'"
    with pytest.raises(ValueError, match=message):
        fparams.meta_value_and_grad(task, strategy="vmap")(params, tasks=tasks)
    with pytest.raises(TypeError, match=r"^fparams\.meta_value_and_grad: pass the tasks either as batches"):
        fparams.meta_value_and_grad(task)(params, tasks[0][0].unsqueeze(0), tasks=tasks)
