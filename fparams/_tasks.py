"""Run a per-task function over a batch of tasks: vmap, a loop, or vmap in chunks."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import check_callable, check_choice, check_dict, check_int, reports_errors_here
from ._compile import compile_fallback
from ._grads import grad_route
from ._norms import exact_norms
from ._torch_compat import pytree
from ._types import Params, TensorDict

STRATEGIES = ("auto", "vmap", "loop", "chunked")
RANDOMNESS = ("error", "different", "same")


def _num_tasks(where: str, batches: Sequence[Any]) -> int:
    leaves = [t for t in pytree.tree_leaves(list(batches)) if isinstance(t, Tensor)]
    counts = {t.size(0) if t.dim() else -1 for t in leaves}
    if len(counts) == 1 and min(counts) > 0:
        return counts.pop()  # the common case, checked without building any message
    sizes: List[Tuple[str, int]] = []
    for i, batch in enumerate(batches):
        for path, leaf in pytree.tree_flatten_with_path(batch)[0]:
            if not isinstance(leaf, Tensor):
                continue
            label = f"task_batches[{i}]{pytree.keystr(path)}"
            if leaf.dim() == 0:
                raise ValueError(
                    f"{where}: {label} is a 0-dim tensor, but every task argument needs the "
                    f"tasks on dim 0. Pass values shared by all tasks through the function's "
                    f"closure or as params."
                )
            sizes.append((label, leaf.size(0)))
    if not sizes:
        raise ValueError(f"{where}: no task argument holds a tensor, so there are no tasks to map over.")
    if len({n for _, n in sizes}) > 1:
        shown = ", ".join(f"{label}: {n}" for label, n in sizes)
        raise ValueError(f"{where}: the task arguments disagree on the number of tasks (dim 0): {shown}.")
    raise ValueError(f"{where}: the task arguments hold 0 tasks (dim 0 has size 0).")


def _stack(outputs: List[Any]) -> Any:
    flat, spec = zip(*(pytree.tree_flatten(o) for o in outputs))
    if any(s != spec[0] for s in spec):
        raise ValueError("fparams.map_tasks: the function returned differently structured outputs per task.")
    columns = zip(*flat)
    return pytree.tree_unflatten([torch.stack(list(col)) for col in columns], spec[0])


#: ``"auto"`` loops over tasks whose largest tensor argument has at least this
#: many elements (see :func:`choose_strategy`).
LOOP_FROM_NUMEL = 1 << 14


def choose_strategy(num_tasks: int, task_numel: int = 0) -> str:
    """The ``"auto"`` strategy: vmap for many small tasks, a loop otherwise.

    ``task_numel`` is the element count of one task's largest tensor
    argument (0 when unknown). The loop is chosen for a single task, and when
    ``task_numel >= LOOP_FROM_NUMEL`` (16384, e.g. 20 images of 28x28): such
    tasks are compute-bound, so vmap has no per-op overhead left to save,
    while its batching rules for per-task weights (grouped convolutions and
    their double backward) cost more than the plain ops the loop runs. The
    rule reads only the shapes, once per call, so the choice is
    deterministic. :func:`map_tasks` passes ``task_numel`` only with
    ``randomness="error"`` (no random ops: every strategy gives the same
    numbers); note that the loop, unlike vmap, does not reject random ops.

    Measured with ``benchmarks/bench_tasks.py`` on a 2-core CPU, torch 2.13:
    sine MLP, 32 tasks of 10 points (10 elements per task): vmap ~12x faster
    than a loop; 4-block conv net, 8 tasks of 80 28x28 images (62720
    elements): vmap ~2x slower than the loop; 1 task: the loop avoids
    vmap's batching overhead (1.7x).
    """
    if num_tasks == 1 or task_numel >= LOOP_FROM_NUMEL:
        return "loop"
    return "vmap"


def _task_numel(batches: Sequence[Any]) -> int:
    # Shapes only (no tensor op, nothing torch.compile has to break on).
    numel = 0
    for t in pytree.tree_leaves(list(batches)):
        if isinstance(t, Tensor):
            numel = max(numel, math.prod(t.shape[1:]))
    return numel


def map_tasks(
    fn: Callable[..., Any],
    *,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    randomness: str = "error",
    batch_stats: bool = False,
) -> Callable[..., Any]:
    """Lift a per-task function to a batch of tasks.

    ``map_tasks(fn)(params, *task_batches)`` calls ``fn(params, *task)`` for
    every task, where ``params`` is shared (broadcast) and every other argument
    (a tensor or a pytree of tensors, such as a dict of per-task buffers)
    holds the tasks on dim 0. The per-task outputs (tensors or pytrees of
    tensors) come back stacked on dim 0. Gradients flow to ``params`` whether
    you call ``.backward()`` on the result or take ``torch.func.grad`` of a
    function that uses it.

    Normalization layers run under :class:`fparams.exact_norms`, so their
    meta-gradients are exact with every strategy.

    Args:
        fn: ``fn(params, *task) -> output`` for one task.
        strategy: ``"vmap"`` (one vectorised call), ``"loop"`` (one call per
            task), ``"chunked"`` (vmap over ``chunk_size`` tasks at a time, to
            bound memory) or ``"auto"`` (vmap for many small tasks; the loop
            for one task or large ones, see :func:`choose_strategy`; with
            ``randomness`` other than ``"error"`` only a single task loops).
            All give the same numbers, up to float rounding.
        chunk_size: tasks per vmap call; required for ``"chunked"``, and with
            ``"auto"`` it selects ``"chunked"``.
        randomness: vmap's ``randomness`` for random ops such as dropout:
            ``"error"``, ``"different"`` (independent draws per task) or
            ``"same"`` (one draw shared by all tasks). The loop strategy draws
            per task in order, so random values differ between strategies.
        batch_stats: batch normalization uses the statistics of each task's
            batch and never updates running statistics.

    Examples:
        >>> import torch, fparams
        >>> arch, params, _ = fparams.split(torch.nn.Linear(1, 1))
        >>> mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()
        >>> def task_loss(p, xs, ys, xq, yq):
        ...     return mse(fparams.adapt(mse, p, xs, ys, lr=0.1), xq, yq)
        >>> xs, ys, xq, yq = (torch.randn(4, 5, 1) for _ in range(4))
        >>> fparams.map_tasks(task_loss)(params, xs, ys, xq, yq).shape
        torch.Size([4])
    """
    where = "fparams.map_tasks"
    check_callable(where, "fn", fn, "fn(params, *task)")
    check_choice(where, "strategy", strategy, STRATEGIES)
    check_choice(where, "randomness", randomness, RANDOMNESS)
    check_int(where, "chunk_size", chunk_size, 1, none_ok=True)
    if strategy == "chunked" and chunk_size is None:
        raise ValueError(f"{where}: strategy='chunked' needs `chunk_size` (tasks per vmap call).")
    if strategy in ("vmap", "loop") and chunk_size is not None:
        raise ValueError(
            f"{where}: `chunk_size` only applies to strategy='chunked' or 'auto'; got "
            f"strategy={strategy!r} with chunk_size={chunk_size}."
        )

    @reports_errors_here
    def run(params: Any, *task_batches: Any) -> Any:
        if not task_batches:
            raise TypeError(
                f"{where}: call the mapped function as f(params, *task_batches); no task batch was given."
            )
        n = _num_tasks(where, task_batches)
        chosen = _resolve(strategy, chunk_size, randomness, task_batches, n)
        norms = exact_norms(batch_stats)
        if chosen == "loop":
            with norms:
                return _loop(fn, params, task_batches, n, norms)
        # The mode is entered inside the mapped function: vmap's own handling
        # of the inputs and outputs then does not pass through it.
        mapped = torch.func.vmap(
            norms.around(fn),
            in_dims=(None,) + (0,) * len(task_batches),
            randomness=randomness,
            chunk_size=chunk_size if chosen == "chunked" else None,
        )
        return mapped(params, *task_batches)

    run.__doc__ = f"map_tasks({getattr(fn, '__name__', 'fn')}): call as f(params, *task_batches)."
    return run


def _resolve(
    strategy: str, chunk_size: Optional[int], randomness: str, batches: Sequence[Any], n: int
) -> str:
    """The strategy that runs: ``"auto"`` resolved from the tasks' shapes."""
    if strategy != "auto":
        return strategy
    if chunk_size is not None:
        return "chunked"
    # Random draws differ between vmap and the loop: keep vmap's there.
    return choose_strategy(n, _task_numel(batches) if randomness == "error" else 0)


def _task(batches: Sequence[Any], i: int) -> List[Any]:
    return [pytree.tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, b) for b in batches]


def _loop(fn: Callable[..., Any], params: Any, batches: Sequence[Any], n: int, mode: exact_norms) -> Any:
    def task(i: int) -> Any:
        mode.begin_task(i)  # running statistics updated by two tasks are shared: an error
        return fn(params, *_task(batches, i))

    return _stack([task(i) for i in range(n)])


def stack_tasks(tensors: TensorDict, num_tasks: int) -> Params:
    """One private copy of every tensor per task, stacked on a new dim 0.

    Use it to give each task its own BatchNorm running statistics: pass the
    result to the mapped function as a task argument, and return the updated
    buffers from it.

    Examples:
        >>> import torch, fparams
        >>> fparams.stack_tasks({"running_mean": torch.zeros(3)}, 4)["running_mean"].shape
        torch.Size([4, 3])
    """
    check_dict("fparams.stack_tasks", "tensors", tensors)
    check_int("fparams.stack_tasks", "num_tasks", num_tasks, 1)
    return {k: t.detach().unsqueeze(0).repeat(num_tasks, *([1] * t.dim())) for k, t in tensors.items()}


def _per_task_losses(out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 1:
        shape = tuple(out.shape[1:]) if isinstance(out, Tensor) and out.dim() > 0 else None
        raise ValueError(
            f"fparams.meta_value_and_grad: `task_fn` must return one scalar loss per task; it "
            f"returned {type(out).__name__} with per-task shape {shape}. Reduce it, e.g. .mean()."
        )
    return out


def meta_value_and_grad(
    task_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    randomness: str = "error",
    batch_stats: bool = False,
    compile: bool = False,
) -> Callable[..., Any]:
    """The whole meta-step as one pure call: mean task loss and its gradient.

    Returns ``step(params, *task_batches) -> (loss, grads)`` (with
    ``has_aux=True``, ``task_fn`` returns ``(loss, aux)`` and ``step`` gives
    ``((loss, stacked_aux), grads)``). ``grads`` has the keys of ``params``
    (any pytree of tensors works). The tasks are mapped with
    :func:`map_tasks` and its options. With ``compile=True`` the step runs
    through :func:`fparams.compile`, which falls back to eager with a warning
    where compilation fails; where the strategy is the loop, one task's step
    is compiled once and called for every task (the gradient of the mean loss
    is the mean of the per-task gradients), rather than one graph per task.

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
    mapped = map_tasks(
        task_fn, strategy=strategy, chunk_size=chunk_size, randomness=randomness, batch_stats=batch_stats
    )

    def objective(params: Any, *task_batches: Any) -> Any:
        out = mapped(params, *task_batches)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(
                    "fparams.meta_value_and_grad: has_aux=True needs task_fn to return (loss, aux)."
                )
            return _per_task_losses(out[0]).mean(), out[1]
        return _per_task_losses(out).mean()

    @reports_errors_here
    def step(params: Any, *task_batches: Any) -> Any:
        if grad_route() == "autograd":  # eager, no transform (torch.compile traces the other branch)
            flat, spec = pytree.tree_flatten(params)
            if all(isinstance(t, Tensor) for t in flat) and any(t.requires_grad for t in flat):
                return _autograd_value_and_grad(objective, has_aux, flat, spec, task_batches)
        grads, value = torch.func.grad_and_value(objective, has_aux=has_aux)(params, *task_batches)
        return value, grads

    if not compile:
        return step
    return _compiled_step(task_fn, step, has_aux, strategy, chunk_size, randomness, batch_stats)


def _compiled_step(
    task_fn: Callable[..., Any],
    step: Callable[..., Any],
    has_aux: bool,
    strategy: str,
    chunk_size: Optional[int],
    randomness: str,
    batch_stats: bool,
) -> Callable[..., Any]:
    # vmap: the whole step is one graph. The loop: one task's step is compiled
    # once and called per task (the same shapes, so one graph); the mean of the
    # per-task gradients is the gradient of the mean loss. Compiling the
    # unrolled loop instead would make one graph per task, each compiled anew
    # (benchmarks/bench_tasks.py measures the compile times).
    whole = compile_fallback(step)

    def one_task(params: Any, *task: Any) -> Any:
        def loss(p: Any, *t: Any) -> Any:
            with exact_norms(batch_stats):
                out = task_fn(p, *t)
            value = out[0] if has_aux else out
            if not isinstance(value, Tensor) or value.dim() != 0:  # the message of the batched step
                _per_task_losses(value.unsqueeze(0) if isinstance(value, Tensor) else value)
            return out

        grads, value = torch.func.grad_and_value(loss, has_aux=has_aux)(params, *task)
        return value, grads

    per_task = compile_fallback(one_task)

    @reports_errors_here
    def run(params: Any, *task_batches: Any) -> Any:
        n = _num_tasks("fparams.meta_value_and_grad", task_batches)
        if _resolve(strategy, chunk_size, randomness, task_batches, n) != "loop":
            return whole(params, *task_batches)
        values, grads = zip(*(per_task(params, *_task(task_batches, i)) for i in range(n)))
        mean_grads = pytree.tree_map(lambda *g: torch.stack(g).mean(0), *grads)
        if has_aux:
            losses, aux = zip(*values)
            return (torch.stack(losses).mean(), _stack(list(aux))), mean_grads
        return torch.stack(values).mean(), mean_grads

    return run


def _autograd_value_and_grad(
    objective: Callable[..., Any], has_aux: bool, flat: List[Tensor], spec: Any, task_batches: Sequence[Any]
) -> Any:
    # What torch.func.grad_and_value computes, by plain autograd (no transform
    # is active, some param requires grad): the inner loops inside then take
    # their fast routes too. As with torch.func, the results stay
    # differentiable (with respect to the params and to anything the task
    # function captures), and nothing is written to any .grad.
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in flat]
        out = objective(pytree.tree_unflatten(inputs, spec), *task_batches)
        value = out[0] if has_aux else out
        found: Sequence[Optional[Tensor]] = (None,) * len(inputs)  # if it does not depend on them
        if value.requires_grad:
            found = torch.autograd.grad(value, inputs, create_graph=keep_graph, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, found)]
    if not keep_graph:
        out = pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
    return out, pytree.tree_unflatten(grads, spec)
