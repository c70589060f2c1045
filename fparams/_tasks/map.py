"""``map_tasks``: run a per-task function over a batch of tasks (vmap, a loop, or vmap in chunks)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

import torch

from .._errors import FparamsTypeError, public
from .._norms import exact_norms
from .._torch_compat import is_compiling
from .batching import check_task_list, checked, num_tasks, stack_outputs, task
from .fallback import explained, run_auto, run_vmap
from .plan import AutoMemory, Options, Randomness, Strategy, check_options, plan, vmap_sizes

F = TypeVar("F", bound=Callable[..., Any])

#: The keywords of ``map_tasks`` / ``meta_value_and_grad`` themselves, which the callables they
#: return do not take.
MAP_KEYWORDS = ("strategy", "chunk_size", "randomness", "batch_stats")
STEP_KEYWORDS = MAP_KEYWORDS + ("has_aux", "compile")


def each_task(mode: exact_norms, run: Callable[[int], Any], n: int) -> List[Any]:
    """``run(i)`` for each task in turn, every one under ``mode``.

    The mode applies ``batch_stats`` and watches running statistics across
    tasks (two tasks updating one tensor is an error, as under vmap). It stays
    active for every task: a task that ran no normalization (a guard such as
    ``bn(h) if h.shape[0] > 1 else h``) says nothing about the next one.
    """
    outputs: List[Any] = []
    with mode:
        for i in range(n):
            mode.begin_task(i)  # running statistics updated by two tasks are shared: an error
            outputs.append(run(i))
    return outputs


def _loop(fn: Callable[..., Any], params: Any, batches: Sequence[Any], n: int, mode: exact_norms) -> Any:
    """The loop strategy: ``fn(params, *task_i)`` for each task, outputs stacked."""
    return stack_outputs(each_task(mode, lambda i: fn(params, *task(batches, i)), n))


def check_call(args: Sequence[Any], kwargs: Dict[str, Any], owner: str) -> None:
    """The mapped function's own call: ``f(params, *task_batches)`` or ``f(params, tasks=[...])``."""
    own = sorted(k for k in kwargs if k in (MAP_KEYWORDS if owner == "map_tasks" else STEP_KEYWORDS))
    if own:
        shown = ", ".join(f"{k}=..." for k in own)
        raise FparamsTypeError(
            f"{', '.join(f'`{k}`' for k in own)} {'is an option' if len(own) == 1 else 'are options'} "
            f"of fparams.{owner} itself, not of the "
            f"function it returns: pass it when mapping, fparams.{owner}(fn, {shown}), then call "
            f"the result as f(params, *task_batches)."
        )
    if kwargs:
        raise FparamsTypeError(
            f"the mapped function takes no keyword argument {', '.join(repr(k) for k in sorted(kwargs))}; "
            f"call it as f(params, *task_batches) or f(params, tasks=[...]). Pass per-task values "
            f"as task batches and values shared by all tasks through fn's closure or params."
        )
    if not args:
        raise FparamsTypeError("call the mapped function as f(params, *task_batches); no params were given.")


class MappedTasks:
    """The callable :func:`map_tasks` returns: ``mapped(params, *task_batches)``.

    It holds what ``"auto"`` learned about ``fn``: ``demoted`` is None, or the
    op vmap could not run (or would have run through torch's slow fallback),
    after which ``"auto"`` runs ``fn`` with the loop; ``reset()`` forgets it.
    A new ``map_tasks(fn)`` starts afresh.

    Examples:
        >>> import torch, fparams
        >>> mapped = fparams.map_tasks(lambda p, x: (p["w"] * x).sum())
        >>> mapped({"w": torch.ones(2)}, torch.ones(3, 2)).tolist()
        [2.0, 2.0, 2.0]
        >>> mapped.strategy, mapped.demoted
        ('auto', None)
        >>> mapped.reset()
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        options: Options,
        memory: Optional[AutoMemory] = None,
        losses: bool = False,
    ) -> None:
        self.fn = fn
        self.options = options
        self.memory = memory if memory is not None else AutoMemory("map_tasks", fn)
        self.losses = losses  # meta_value_and_grad's: fn returns a loss (or (loss, aux) with has_aux)
        self.__doc__ = f"map_tasks({getattr(fn, '__name__', 'fn')}): call as f(params, *task_batches)."

    @property
    def strategy(self) -> Strategy:
        """The strategy asked for (``"auto"`` is resolved per call, see :func:`plan`)."""
        return self.options.strategy

    @property
    def demoted(self) -> Optional[str]:
        """Why ``"auto"`` runs this function with the loop from now on (the op), or None."""
        return self.memory.demoted

    def reset(self) -> None:
        """Forget what ``"auto"`` learned: the next call tries vmap again where the shapes say so."""
        self.memory.reset()

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"map_tasks({name}, strategy={self.strategy!r}, demoted={self.demoted!r})"

    @public("map_tasks")
    def __call__(self, *args: Any, tasks: Optional[Sequence[Any]] = None, **kwargs: Any) -> Any:
        check_call(args, kwargs, "map_tasks")
        return self.run(args[0], args[1:], tasks)

    def run(self, params: Any, task_batches: Sequence[Any], tasks: Optional[Sequence[Any]]) -> Any:
        """The mapped call without its public name (``meta_value_and_grad`` calls this)."""
        fn, options = self.fn, self.options
        if tasks is not None:
            check_task_list(task_batches, tasks, options.strategy)
            mode = exact_norms(options.batch_stats)
            return stack_outputs(each_task(mode, lambda i: fn(params, *tasks[i]), len(tasks)))
        if not task_batches:
            raise FparamsTypeError(
                "call the mapped function as f(params, *task_batches); no task batch was given."
            )
        n = num_tasks(task_batches)
        chosen = plan(options, task_batches, n, params, self.memory)

        def run_loop() -> Any:
            return _loop(fn, params, task_batches, n, exact_norms(options.batch_stats))

        if chosen == "loop":
            return run_loop()
        norms = exact_norms(options.batch_stats)
        # The mode is entered inside the mapped function: vmap's own handling
        # of the inputs and outputs then does not pass through it.
        mapped = torch.func.vmap(
            norms.around(checked(fn, self.losses and not options.has_aux)),
            in_dims=(None,) + (0,) * len(task_batches),
            randomness=options.randomness,
            chunk_size=options.chunk_size if chosen == "chunked" else None,
        )

        def call() -> Any:
            return mapped(params, *task_batches)

        sizes = vmap_sizes(chosen, n, options.chunk_size)
        if is_compiling():  # no warning filters or copies to trace: the plain rules
            return explained(call, options.strategy, sizes)
        if options.strategy != "auto":
            return run_vmap(call, options.strategy, self.memory, sizes)
        return run_auto(call, run_loop, [params, task_batches], self.memory, sizes)


@public("map_tasks")
def map_tasks(
    fn: Callable[..., Any],
    *,
    strategy: Strategy = "auto",
    chunk_size: Optional[int] = None,
    randomness: Randomness = "error",
    batch_stats: bool = False,
) -> MappedTasks:
    """Lift a per-task function to a batch of tasks.

    ``map_tasks(fn)(params, *task_batches)`` calls ``fn(params, *task)`` for
    every task, where ``params`` is shared (broadcast) and every other argument
    (a tensor or a pytree of tensors, such as a dict of per-task buffers)
    holds the tasks on dim 0. The per-task outputs (tensors or pytrees of
    tensors of one shape) come back stacked on dim 0. Gradients flow to
    ``params`` whether you call ``.backward()`` on the result or take
    ``torch.func.grad`` of a function that uses it.

    Normalization layers run under :class:`fparams.exact_norms`, so their
    meta-gradients are exact with every strategy.

    Memory: ``.backward()`` on the stacked outputs keeps every task's graph
    until it runs, whatever the strategy (``"chunked"`` bounds the memory of
    the forward computation, not of the graph). To hold one task's or one
    chunk's graph at a time, use :func:`fparams.meta_value_and_grad`; to keep
    one inner step's activations at a time, ``fparams.adapt(...,
    checkpoint=True)``.

    Tasks of different sizes (few-shot episodes with different shot counts)
    cannot be stacked on dim 0. Pass them as one tuple of arguments per task,
    ``f(params, tasks=[(xs0, ys0), (xs1, ys1), ...])``, which runs
    ``fn(params, *tasks[i])`` with the loop and stacks the outputs; or pad
    them with :func:`fparams.pad_tasks` and mask the loss, which vmap runs.

    Args:
        fn: ``fn(params, *task) -> output`` for one task.
        strategy: ``"vmap"`` (one vectorised call), ``"loop"`` (one call per
            task), ``"chunked"`` (vmap over ``chunk_size`` tasks at a time, to
            bound memory) or ``"auto"`` (vmap for many small tasks; the loop
            for one task or large ones, see ``fparams._tasks.plan``; with
            ``randomness`` other than ``"error"`` only a single task loops).
            All give the same numbers, up to float rounding. ``"auto"`` also
            runs every function the loop can run: it loops from the start
            over recurrent layers (GRU, LSTM, RNN) and ``spectral_norm``, and
            where vmap meets another op it cannot run (no batching rule,
            ``.item()``) or would run through torch's slow per-example
            fallback, it runs the loop instead, with one
            :class:`fparams.VmapFallbackWarning`; the returned callable
            remembers it (``.demoted``, ``.reset()``). Only such known vmap
            limitations move it: any other error (your own) reaches you
            unchanged. ``"vmap"`` and ``"chunked"`` raise an error naming the
            op, and warn where torch's slow fallback runs.
        chunk_size: tasks per vmap call; required for ``"chunked"``, and with
            ``"auto"`` it selects ``"chunked"``.
        randomness: vmap's ``randomness`` for random ops such as dropout:
            ``"error"``, ``"different"`` (independent draws per task) or
            ``"same"`` (one draw shared by all tasks). The loop strategy draws
            per task in order, so random values differ between strategies.
        batch_stats: batch normalization uses the statistics of each task's
            batch and never updates running statistics.

    Returns:
        A :class:`MappedTasks`: call it as ``f(params, *task_batches)`` or
        ``f(params, tasks=[...])``.

    Examples:
        >>> import torch, fparams
        >>> arch, params, _ = fparams.split(torch.nn.Linear(1, 1))
        >>> mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()
        >>> def task_loss(p, xs, ys, xq, yq):
        ...     return mse(fparams.adapt(mse, p, xs, ys, lr=0.1), xq, yq)
        >>> xs, ys, xq, yq = (torch.randn(4, 5, 1) for _ in range(4))
        >>> fparams.map_tasks(task_loss)(params, xs, ys, xq, yq).shape
        torch.Size([4])
        >>> ragged = [tuple(torch.randn(n, 1) for _ in range(4)) for n in (3, 5)]  # 3 and 5 shots
        >>> fparams.map_tasks(task_loss)(params, tasks=ragged).shape
        torch.Size([2])
    """
    options = Options(strategy, chunk_size, randomness, batch_stats)
    check_options(fn, options)
    return MappedTasks(fn, options)
