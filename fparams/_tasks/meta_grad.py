"""``meta_value_and_grad``: the mean task loss and its gradient, one task's or one chunk's graph at a time."""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import check_flag
from .._errors import public
from .._grads import grad_route
from .._norms import exact_norms
from .._torch_compat import reaches_other_leaves, tree_utils as pytree
from .batching import (
    check_params,
    check_task_list,
    checked,
    concat,
    detached,
    losses_and_aux,
    num_tasks,
    task,
    task_slice,
)
from .compiled import CompiledStep
from .fallback import run_auto, run_vmap
from .map import MappedTasks, check_call, each_task
from .plan import AutoMemory, Chosen, Options, Randomness, Strategy, check_options, plan, vmap_sizes

#: ``task_args(i)``: task ``i``'s arguments where they are not stacked (``tasks=``).
TaskArgs = Optional[Callable[[int], Sequence[Any]]]


class MetaStep:
    """The callable :func:`meta_value_and_grad` returns: ``step(params, *task_batches)``.

    Like :class:`~fparams._tasks.map.MappedTasks`, it holds what ``"auto"``
    learned (``demoted``, ``reset()``).
    """

    def __init__(self, task_fn: Callable[..., Any], options: Options) -> None:
        self.task_fn = task_fn
        self.options = options
        self.memory = AutoMemory("meta_value_and_grad", task_fn)
        self.mapped = MappedTasks(task_fn, options, self.memory, losses=True)

    @property
    def strategy(self) -> Strategy:
        """The strategy asked for."""
        return self.options.strategy

    @property
    def demoted(self) -> Optional[str]:
        """Why ``"auto"`` runs this function with the loop from now on (the op), or None."""
        return self.memory.demoted

    def reset(self) -> None:
        """Forget what ``"auto"`` learned."""
        self.memory.reset()

    @public("meta_value_and_grad")
    def __call__(self, *args: Any, tasks: Optional[Sequence[Any]] = None, **kwargs: Any) -> Any:
        check_call(args, kwargs, "meta_value_and_grad")
        return self.compute(args[0], args[1:], tasks)

    def compute(self, params: Any, task_batches: Sequence[Any], tasks: Optional[Sequence[Any]]) -> Any:
        """The step without its public name."""
        check_params(params)
        if tasks is not None:
            check_task_list(task_batches, tasks, self.options.strategy)
        if grad_route() == "autograd":  # eager, no transform (torch.compile traces the other branch)
            flat, spec = pytree.tree_flatten(params)
            if all(isinstance(t, Tensor) for t in flat):
                if tasks is None:
                    return self._by_chunks(flat, spec, task_batches)
                listed = tasks  # one tuple of arguments per task, one task's graph at a time
                n = len(listed)
                return chunk_grads(self.task_fn, flat, spec, (), self.options, n, "loop", listed.__getitem__)
        grads, value = torch.func.grad_and_value(
            functools.partial(self._objective, tasks=tasks), has_aux=self.options.has_aux
        )(params, *task_batches)
        return value, grads

    def _objective(self, params: Any, *task_batches: Any, tasks: Optional[Sequence[Any]] = None) -> Any:
        losses, aux = losses_and_aux(self.mapped.run(params, task_batches, tasks), self.options.has_aux)
        return (losses.mean(), aux) if self.options.has_aux else losses.mean()

    def _by_chunks(self, flat: List[Tensor], spec: Any, task_batches: Sequence[Any]) -> Any:
        # What torch.func.grad_and_value of the mean task loss computes, by plain
        # autograd, one chunk of tasks at a time (a task for the loop, every task
        # for vmap): each chunk's gradient is taken, and its graph freed, before
        # the next chunk runs.
        options, n = self.options, num_tasks(task_batches)
        chosen = plan(options, task_batches, n, pytree.tree_unflatten(flat, spec), self.memory)

        def run(how: Chosen) -> Any:
            return chunk_grads(self.task_fn, flat, spec, task_batches, options, n, how)

        if chosen == "loop":
            return run("loop")
        sizes = vmap_sizes(chosen, n, options.chunk_size)
        if options.strategy != "auto":
            return run_vmap(lambda: run(chosen), options.strategy, self.memory, sizes)
        return run_auto(
            lambda: run(chosen), lambda: run("loop"), [flat, list(task_batches)], self.memory, sizes
        )


def _chunks(chosen: Chosen, n: int, chunk_size: Optional[int]) -> List[Tuple[int, int]]:
    """The task ranges, mapped by vmap, whose gradients are taken one after the other."""
    size = chunk_size if chosen == "chunked" and chunk_size is not None else n
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def chunk_grads(
    task_fn: Callable[..., Any],
    flat: List[Tensor],
    spec: Any,
    task_batches: Sequence[Any],
    options: Options,
    n: int,
    chosen: Chosen,
    task_args: TaskArgs = None,
) -> Any:
    """The mean task loss and its gradient, a chunk at a time (see :meth:`MetaStep._by_chunks`).

    The results are differentiable further (as torch.func's are) only where
    that needs a graph: grad mode is on and some param, or a tensor the task
    function captures, requires grad. Nothing is written to any ``.grad``.
    """
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    check = torch.is_grad_enabled() and not keep  # for captured tensors that require grad
    total: List[Optional[Tensor]] = [None] * len(flat)
    values: List[Tensor] = []
    auxes: List[Any] = []
    norms = exact_norms(options.batch_stats)

    def chunk(a: int, b: int) -> None:
        nonlocal keep, check, total
        out = _run_chunk(
            task_fn,
            chosen,
            params,
            task_batches,
            (a, b),
            norms,
            options.randomness,
            task_args,
            options.has_aux,
        )
        losses, aux = losses_and_aux(out, options.has_aux)
        loss = losses.sum() / n
        if check and loss.requires_grad:
            keep, check = reaches_other_leaves(loss, inputs), False
        found: Sequence[Optional[Tensor]] = (None,) * len(inputs)
        if loss.requires_grad:
            found = torch.autograd.grad(loss, inputs, create_graph=keep, allow_unused=True)
        total = [g if t is None else t if g is None else t + g for t, g in zip(total, found)]
        values.append(loss if keep else loss.detach())
        if options.has_aux:
            auxes.append(aux if keep else detached(aux))

    with torch.enable_grad():
        inputs = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in flat]
        params = pytree.tree_unflatten(inputs, spec)
        if chosen == "loop":
            each_task(norms, lambda i: chunk(i, i + 1), n)
        else:
            for a, b in _chunks(chosen, n, options.chunk_size):
                chunk(a, b)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, total)]
    value = values[0] if len(values) == 1 else torch.stack(values).sum()
    result = (value, concat(auxes)) if options.has_aux else value
    return result, pytree.tree_unflatten(grads, spec)


def _run_chunk(
    task_fn: Callable[..., Any],
    chosen: Chosen,
    params: Any,
    batches: Sequence[Any],
    span: Tuple[int, int],
    norms: exact_norms,
    randomness: Randomness,
    task_args: TaskArgs,
    has_aux: bool,
) -> Any:
    """The outputs of tasks ``span[0]:span[1]``, stacked, as :func:`map_tasks` computes them."""
    a, b = span
    if chosen == "loop":  # one task, under ``norms`` while :func:`each_task` keeps it
        args = task(batches, a) if task_args is None else task_args(a)
        return pytree.tree_map(
            lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, task_fn(params, *args)
        )
    chunk = task_slice(batches, a, b)
    # the mode is entered inside the mapped function, as map_tasks does
    dims = (None,) + (0,) * len(chunk)
    fn = checked(task_fn, not has_aux)
    mapped = torch.func.vmap(norms.around(fn), in_dims=dims, randomness=randomness)
    return mapped(params, *chunk)


@public("meta_value_and_grad")
def meta_value_and_grad(
    task_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    chunk_size: Optional[int] = None,
    randomness: Randomness = "error",
    batch_stats: bool = False,
    compile: bool = False,
) -> Callable[..., Any]:
    """The whole meta-step as one pure call: mean task loss and its gradient.

    Returns ``step(params, *task_batches) -> (loss, grads)`` (with
    ``has_aux=True``, ``task_fn`` returns ``(loss, aux)`` and ``step`` gives
    ``((loss, stacked_aux), grads)``). ``grads`` has the keys of ``params``
    (any pytree of tensors works). The tasks are mapped with
    :func:`map_tasks` and its options; the step remembers what ``"auto"``
    learned as the mapped callable does (``step.demoted``, ``step.reset()``).
    With ``compile=True`` the step runs through :func:`fparams.compile`, which
    falls back to eager with a warning where compilation fails; where the
    strategy is the loop, one task's step is compiled once and called for
    every task (the gradient of the mean loss is the mean of the per-task
    gradients), rather than one graph per task.

    Tasks of different sizes go in as one tuple of arguments per task,
    ``step(params, tasks=[(xs0, ys0, xq0, yq0), ...])``, run by the loop as
    :func:`map_tasks` runs them.

    Memory: in eager code each chunk's gradient is taken, and its graph
    freed, before the next chunk runs: one task at a time with the loop
    strategy (what ``"auto"`` picks for large tasks), ``chunk_size`` tasks
    with ``"chunked"``, all tasks at once with ``"vmap"``. Peak memory is then
    that of one chunk, not of the meta-batch, and the gradient is the same
    (the mean loss is a sum over chunks). That holds where the results need
    no graph: pass detached params (``fparams.detach(params)``). Params that
    require grad ask for a meta-gradient that is itself differentiable, as
    ``torch.func.grad`` gives it, so every chunk's graph is kept (about 3x the
    memory of ``.backward()``); so does a tensor that requires grad and that
    ``task_fn`` captures (put learned hyperparameters in ``params``). Under a
    ``torch.func`` transform or ``torch.compile`` the step is
    ``torch.func.grad_and_value`` of the mean loss over all tasks.

    Args:
        task_fn: ``task_fn(params, *task) -> loss`` (a 0-dim tensor), or
            ``(loss, aux)`` with ``has_aux``.
        has_aux: ``task_fn`` returns ``(loss, aux)``.
        strategy: as for :func:`map_tasks`.
        chunk_size: as for :func:`map_tasks`.
        randomness: as for :func:`map_tasks`.
        batch_stats: as for :func:`map_tasks`.
        compile: run the step through :func:`fparams.compile`.

    Returns:
        ``step(params, *task_batches)`` or ``step(params, tasks=[...])``.

    Examples:
        >>> import torch, fparams
        >>> arch, params, _ = fparams.split(torch.nn.Linear(1, 1))
        >>> mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()
        >>> step = fparams.meta_value_and_grad(
        ...     lambda p, xs, ys, xq, yq: mse(fparams.adapt(mse, p, xs, ys, lr=0.1), xq, yq))
        >>> loss, grads = step(params, *(torch.randn(4, 5, 1) for _ in range(4)))
        >>> sorted(grads)
        ['bias', 'weight']
    """
    options = Options(strategy, chunk_size, randomness, batch_stats, has_aux)
    check_options(task_fn, options)
    check_flag("compile", compile)
    step = MetaStep(task_fn, options)
    if not compile:
        return step
    return CompiledStep(step)
