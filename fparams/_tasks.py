"""Run a per-task function over a batch of tasks: vmap, a loop, or vmap in chunks."""

from __future__ import annotations

import functools
import math
import re
import weakref
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import (
    check_callable,
    check_choice,
    check_dict,
    check_int,
    reports_errors_here,
    warn_in_user_code,
)
from ._compile import compile_fallback
from ._grads import grad_route
from ._kernels import vmap_kernels
from ._norms import exact_norms
from ._torch_compat import is_compiling, pytree
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
        raise ValueError(
            f"{where}: the task arguments disagree on the number of tasks (dim 0): {shown}. Every "
            f"argument holds all tasks on dim 0. For tasks of different sizes, pass one tuple per "
            f"task, f(params, tasks=[(xs0, ys0), (xs1, ys1), ...]) (run by the loop), or pad them "
            f"with fparams.pad_tasks and mask the loss (vmap)."
        )
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

    The threshold comes from ``benchmarks/bench_tasks.py`` (README,
    Performance): many tiny tasks (the sine MLP) run far faster under vmap,
    image tasks of a conv net slower, and one task is cheaper without
    vmap's batching.
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
            for one task or large ones, see :func:`choose_strategy`; with
            ``randomness`` other than ``"error"`` only a single task loops).
            All give the same numbers, up to float rounding. ``"auto"`` also
            runs every function the loop can run: it loops from the start
            over recurrent layers (GRU, LSTM, RNN) and ``spectral_norm``
            (recognised by their parameter names, see ``UNBATCHABLE_PARAM``),
            and where vmap meets another op it cannot run (no batching rule,
            ``.item()``), it runs the loop instead, with one
            :class:`fparams.VmapFallbackWarning`; later calls of the same
            ``fn`` go straight to the loop. Task arguments that vmap changed
            in place before it failed get their values back first.
            ``"vmap"`` and ``"chunked"`` raise a RuntimeError naming the op.
        chunk_size: tasks per vmap call; required for ``"chunked"``, and with
            ``"auto"`` it selects ``"chunked"``.
        randomness: vmap's ``randomness`` for random ops such as dropout:
            ``"error"``, ``"different"`` (independent draws per task) or
            ``"same"`` (one draw shared by all tasks). The loop strategy draws
            per task in order, so random values differ between strategies.
            A random op under ``"error"`` raises a ValueError naming these options.
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
        >>> ragged = [tuple(torch.randn(n, 1) for _ in range(4)) for n in (3, 5)]  # 3 and 5 shots
        >>> fparams.map_tasks(task_loss)(params, tasks=ragged).shape
        torch.Size([2])
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
    def run(params: Any, *task_batches: Any, tasks: Optional[Sequence[Any]] = None) -> Any:
        if tasks is not None:
            return _run_task_list(fn, params, task_batches, tasks, strategy, batch_stats)
        if not task_batches:
            raise TypeError(
                f"{where}: call the mapped function as f(params, *task_batches); no task batch was given."
            )
        n = _num_tasks(where, task_batches)
        chosen = _resolve(strategy, chunk_size, randomness, task_batches, n)
        if strategy == "auto" and chosen != "loop" and _loop_only(fn, params):
            chosen = "loop"  # vmap cannot run this function (decided up front or learnt once)
        norms = exact_norms(batch_stats)
        if chosen == "loop":
            return _loop(fn, params, task_batches, n, norms)
        # The mode is entered inside the mapped function: vmap's own handling
        # of the inputs and outputs then does not pass through it.
        mapped = torch.func.vmap(
            norms.around(fn),
            in_dims=(None,) + (0,) * len(task_batches),
            randomness=randomness,
            chunk_size=chunk_size if chosen == "chunked" else None,
        )
        def run_vmap() -> Any:
            return _explain_vmap_errors(lambda: mapped(params, *task_batches), strategy)

        if strategy != "auto" or is_compiling():
            return run_vmap()

        def run_loop() -> Any:
            return _loop(fn, params, task_batches, n, exact_norms(batch_stats))

        return vmap_or_loop(fn, run_vmap, run_loop, [params, task_batches])

    run.__doc__ = f"map_tasks({getattr(fn, '__name__', 'fn')}): call as f(params, *task_batches)."
    return run


class VmapFallbackWarning(UserWarning):
    """``map_tasks(strategy="auto")`` ran a function with the loop: vmap cannot run one of its ops.

    Warned once per function; later calls go straight to the loop. Pass
    ``strategy="loop"`` to choose the loop yourself (and silence it).

    Examples:
        >>> import warnings, fparams
        >>> with warnings.catch_warnings():  # where a silent loop would be too slow: an error
        ...     warnings.simplefilter("error", fparams.VmapFallbackWarning)
        >>> issubclass(fparams.VmapFallbackWarning, UserWarning)
        True
    """


# Functions vmap could not run (fn -> the op), and functions it ran once: the
# first vmap call of a function under "auto" is guarded (see vmap_or_loop).
_VMAP_FAILED: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_VMAP_RAN: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

#: Parameter names of layers that vmap cannot run (torch 2.13): the recurrent
#: layers' fused kernels (``aten::gru.input``, ``lstm``, ``rnn_tanh``) and
#: ``torch.nn.utils.spectral_norm``, whose power iteration writes in place
#: (``aten::div.out``). ``"auto"`` loops over such functions from the start.
UNBATCHABLE_PARAM = re.compile(r"(^|\.)(weight_(ih|hh)_l\d+(_reverse)?|weight_orig)$")


def _remember(table: weakref.WeakKeyDictionary[Any, Any], fn: Any, value: Any) -> None:
    try:
        table[fn] = value
    except TypeError:  # not weak-referenceable (a builtin): nothing is remembered
        pass


def _vmap_ran(fn: Any) -> bool:
    try:
        return fn in _VMAP_RAN
    except TypeError:
        return False


def _loop_only(fn: Any, params: Any) -> Optional[str]:
    """Why vmap cannot run ``fn`` (a parameter name or a failed op), or None."""
    if is_compiling():
        return None  # the compiled step keeps the plain strategy rules
    try:
        failed = _VMAP_FAILED.get(fn)
    except TypeError:
        failed = None
    if failed is not None:
        return failed
    if isinstance(params, Mapping):
        for name in params:
            if isinstance(name, str) and UNBATCHABLE_PARAM.search(name):
                return name
    return None


_RANDOM_ERROR = "called random operation while in randomness error mode"


def _unbatchable_op(err: BaseException) -> Optional[str]:
    """The op a vmap error names, where the error says vmap cannot run it (the loop can)."""
    text = str(err)
    if "Batching rule not implemented" in text or "fallback path doesn't work" in text:
        found = re.search(r"aten::\w+(\.\w+)?", text)
        return found.group(0) if found else "an op without a batching rule"
    if "calling .item() on a Tensor" in text or "data-dependent control flow" in text:
        return ".item() or data-dependent control flow"
    if "accessing `data` under vmap" in text:  # older torch's recurrent layers
        return "an op that reads .data (a recurrent layer's fused kernel)"
    if "batching operators that can output dynamic shape" in text:
        return "an op whose output shape depends on the data"
    if "doesn't match the broadcast shape" in text:  # e.g. a fused RNN kernel's decomposition under grad
        return "an in-place op whose output has no task dimension"
    return None


def _randomness_error(err: BaseException) -> ValueError:
    return ValueError(
        "fparams.map_tasks: the task function calls a random op (dropout, torch.rand, ...) "
        "under vmap with randomness='error' (the default). Choose how tasks draw: "
        "map_tasks(..., randomness='different') draws independently per task, "
        "map_tasks(..., randomness='same') draws once for all tasks (the same options exist on "
        "fparams.meta_value_and_grad). strategy='loop' runs the tasks one by one, each drawing "
        "in turn from the global generator, so its numbers differ from vmap's."
    )


def _vmap_error(op: str, strategy: str, err: BaseException) -> RuntimeError:
    also = "" if strategy == "auto" else ", or strategy='auto', which falls back to the loop"
    return RuntimeError(
        f"fparams.map_tasks: vmap cannot run {op}, so strategy={strategy!r} fails on this "
        f"function. Use map_tasks(..., strategy='loop'), "
        f"which runs one task at a time{also}. "
        f"torch said: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    )


def _explain_vmap_errors(call: Callable[[], Any], strategy: str) -> Any:
    """``call()``, a vmap over tasks, with vmap's errors for random ops and missing rules explained."""
    try:
        with vmap_kernels():  # arch: attention's fused kernels have no batching rule
            return call()
    except RuntimeError as err:
        if _RANDOM_ERROR in str(err):
            raise _randomness_error(err) from err
        op = _unbatchable_op(err)
        if op is None:
            raise
        raise _vmap_error(op, strategy, err) from err


def vmap_or_loop(
    fn: Callable[..., Any],
    run_vmap: Callable[[], Any],
    run_loop: Callable[[], Any],
    given: Any,
    stacklevel: int = 3,
) -> Any:
    """``"auto"``: ``run_vmap()``; on an op vmap cannot run, ``run_loop()``, warned once per ``fn``.

    ``run_vmap`` raises the errors of :func:`_explain_vmap_errors`; ``given``
    holds the call's arguments (a pytree).

    vmap may have changed a task argument in place (per-task BatchNorm
    statistics) before it reached that op. On the first call of ``fn`` every
    tensor the call was given is copied first, and any that changed gets its
    value back before the loop runs, so the loop starts from the same state
    as a plain loop would. Once vmap has run ``fn``, only the tensors' version
    counters are kept: where one changed, the loop would apply that change
    twice, so the call raises instead. State the function captures instead of
    taking as an argument is not restored (BatchNorm statistics shared by all
    tasks are refused by vmap before they change).
    """
    tensors = [t for t in pytree.tree_leaves(given) if isinstance(t, Tensor)]
    first = not _vmap_ran(fn)
    saved = [(t, t._version, t.detach().clone() if first else None) for t in tensors]
    try:
        out = run_vmap()
    except RuntimeError as err:
        op = _unbatchable_op(err.__cause__) if err.__cause__ is not None else None
        if op is None:
            raise
        changed = [(t, copy) for t, version, copy in saved if t._version != version]
        if changed and not first:
            raise RuntimeError(
                f"fparams.map_tasks: vmap cannot run {op}, and before it failed it had changed "
                f"{len(changed)} of the tensors given to the call in place, so running the loop now "
                f"would apply those changes twice. Use map_tasks(..., strategy='loop') for this function."
            ) from err
        with torch.no_grad():
            for t, copy in changed:
                assert copy is not None  # copied on the first call, the only one that gets here
                t.copy_(copy)
        _remember(_VMAP_FAILED, fn, op)
        name = getattr(fn, "__name__", type(fn).__name__)
        warn_in_user_code(
            f"fparams.map_tasks: vmap cannot run {op}, so strategy='auto' runs {name} with the loop "
            f"from now on (same numbers, one task at a time). Pass strategy='loop' to choose it "
            f"yourself.",
            VmapFallbackWarning,
        )
        return run_loop()
    _remember(_VMAP_RAN, fn, True)
    return out


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
    return _stack(_each_task(mode, lambda i: fn(params, *_task(batches, i)), n))


def _each_task(mode: exact_norms, run: Callable[[int], Any], n: int) -> List[Any]:
    """``run(i)`` for each task in turn, under ``mode`` while it has work to do.

    The mode watches running statistics across tasks (two tasks updating one
    tensor is an error, as under vmap). It costs a Python call per torch op,
    so once a task has run no normalization, the rest run without the mode.
    """
    outputs: List[Any] = []
    rest = iter(range(n))
    with mode:
        for i in rest:
            mode.begin_task(i)  # running statistics updated by two tasks are shared: an error
            outputs.append(run(i))
            if not mode.used:
                break
    outputs.extend(run(i) for i in rest)
    return outputs


def _run_task_list(
    fn: Callable[..., Any],
    params: Any,
    task_batches: Sequence[Any],
    tasks: Sequence[Any],
    strategy: str,
    batch_stats: bool,
) -> Any:
    """``f(params, tasks=[(xs0, ys0), ...])``: one tuple of arguments per task, run by the loop."""
    _check_task_list("fparams.map_tasks", task_batches, tasks, strategy)
    return _stack(_each_task(exact_norms(batch_stats), lambda i: fn(params, *tasks[i]), len(tasks)))


def _check_task_list(where: str, task_batches: Sequence[Any], tasks: Any, strategy: str) -> None:
    """``tasks=``: a non-empty list of per-task argument tuples, for the loop, given alone."""
    if task_batches:
        raise TypeError(
            f"{where}: pass the tasks either as batches, f(params, *task_batches), or as a list of "
            f"per-task tuples, f(params, tasks=[...]); got both."
        )
    if isinstance(tasks, (Tensor, Mapping)) or not isinstance(tasks, (list, tuple)):
        raise TypeError(
            f"{where}: `tasks` must be a list with one tuple of arguments per task, e.g. "
            f"[(xs0, ys0), (xs1, ys1)]; got {type(tasks).__name__}."
        )
    if not tasks:
        raise ValueError(f"{where}: `tasks` is empty, so there are no tasks to map over.")
    for i, args in enumerate(tasks):
        if not isinstance(args, tuple):
            raise TypeError(
                f"{where}: `tasks[{i}]` must be a tuple of that task's arguments (fn(params, *tasks[{i}])); "
                f"got {type(args).__name__}. Wrap a single argument as (x,)."
            )
    if strategy in ("vmap", "chunked"):
        raise ValueError(
            f"{where}: a list of per-task tuples (`tasks=`) runs with the loop, since tasks of "
            f"different sizes cannot be stacked; got strategy={strategy!r}. Use strategy='auto' or "
            f"'loop', or pad the tasks with fparams.pad_tasks for vmap."
        )


def pad_tasks(tensors: Sequence[Tensor], value: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Stack tasks of different sizes: pad dim 0 of each to the largest, and say which rows are real.

    Returns ``(batch, mask)``: ``batch[i, :n_i]`` is ``tensors[i]`` (``n_i``
    rows), the rest is ``value``; ``mask`` is a bool tensor of shape
    ``(num_tasks, max_rows)``, True on real rows. Pass both as task arguments
    to :func:`map_tasks` (vmap) and mask the loss, e.g.
    ``(err.pow(2).sum(-1) * m).sum() / m.sum()``, which equals each task's mean
    over its own rows (keep ``value`` finite: ``0 * nan`` is nan, and the
    padded rows still run through the network). Layers that mix rows (BatchNorm in train mode) would
    see the padding: use the per-task form ``f(params, tasks=[...])`` for them.

    Examples:
        >>> import torch, fparams
        >>> batch, mask = fparams.pad_tasks([torch.ones(2, 3), torch.ones(4, 3)])
        >>> batch.shape, mask.sum(1).tolist()
        (torch.Size([2, 4, 3]), [2, 4])
    """
    where = "fparams.pad_tasks"
    if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(
            f"{where}: `tensors` must be a list with one tensor per task (rows on dim 0); "
            f"got {type(tensors).__name__}."
        )
    if not tensors:
        raise ValueError(f"{where}: `tensors` is empty; give one tensor per task.")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: `tensors[{i}]` is a {type(t).__name__}, not a tensor.")
        if t.dim() == 0:
            raise ValueError(f"{where}: `tensors[{i}]` is 0-dim; each task needs its rows on dim 0.")
    first = tensors[0]
    bad = [
        f"tensors[{i}]: {tuple(t.shape)} {t.dtype} {t.device}"
        for i, t in enumerate(tensors)
        if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype or t.device != first.device
    ]
    if bad:
        raise ValueError(
            f"{where}: the tasks may differ only in their number of rows (dim 0); tensors[0] is "
            f"{tuple(first.shape)} {first.dtype} {first.device}, but " + ", ".join(bad) + "."
        )
    rows = max(t.size(0) for t in tensors)
    batch = first.new_full((len(tensors), rows, *first.shape[1:]), value)
    mask = torch.zeros(len(tensors), rows, dtype=torch.bool, device=first.device)
    for i, t in enumerate(tensors):
        batch[i, : t.size(0)] = t
        mask[i, : t.size(0)] = True
    return batch, mask


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


def _losses_and_aux(out: Any, has_aux: bool) -> Tuple[Tensor, Any]:
    """The per-task losses (one scalar per task) and, with ``has_aux``, the stacked aux."""
    if not has_aux:
        return _per_task_losses(out), None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("fparams.meta_value_and_grad: has_aux=True needs task_fn to return (loss, aux).")
    return _per_task_losses(out[0]), out[1]


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
    ``task_fn`` captures (put learned hyperparameters in ``params``). With
    ``.backward()`` on :func:`map_tasks`' output, by contrast, every task's
    graph lives until the backward pass, whatever the strategy. The inner
    loops' own memory is bounded by ``fparams.adapt(..., checkpoint=True)``.
    Under a ``torch.func`` transform or ``torch.compile`` the step is
    ``torch.func.grad_and_value`` of the mean loss over all tasks.

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

    def objective(params: Any, *task_batches: Any, tasks: Optional[Sequence[Any]] = None) -> Any:
        losses, aux = _losses_and_aux(mapped(params, *task_batches, tasks=tasks), has_aux)
        return (losses.mean(), aux) if has_aux else losses.mean()

    @reports_errors_here
    def step(params: Any, *task_batches: Any, tasks: Optional[Sequence[Any]] = None) -> Any:
        if tasks is not None:
            _check_task_list("fparams.meta_value_and_grad", task_batches, tasks, strategy)
        if grad_route() == "autograd":  # eager, no transform (torch.compile traces the other branch)
            flat, spec = pytree.tree_flatten(params)
            if all(isinstance(t, Tensor) for t in flat):
                if tasks is None:
                    return _by_chunks(task_fn, has_aux, flat, spec, task_batches, options)
                listed = tasks  # one tuple of arguments per task, one task's graph at a time
                return _chunk_grads(
                    task_fn, has_aux, flat, spec, (), options, len(listed), "loop", lambda i: listed[i]
                )
        grads, value = torch.func.grad_and_value(
            functools.partial(objective, tasks=tasks), has_aux=has_aux
        )(params, *task_batches)
        return value, grads

    options = _Options(strategy, chunk_size, randomness, batch_stats)
    if not compile:
        return step
    return _compiled_step(task_fn, step, has_aux, strategy, chunk_size, randomness, batch_stats)


def _one_task_batch(t: Any) -> Any:
    return t.unsqueeze(0) if isinstance(t, Tensor) else t


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
        if not is_compiling():  # compile_fallback's eager call: plain autograd, as without compile
            value, grads = step(params, *(pytree.tree_map(_one_task_batch, x) for x in task))
            return ((value[0], pytree.tree_map(lambda t: t[0], value[1])) if has_aux else value), grads

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
    def run(params: Any, *task_batches: Any, tasks: Optional[Sequence[Any]] = None) -> Any:
        if tasks is not None:  # one tuple of arguments per task: the loop, a graph per shape
            _check_task_list("fparams.meta_value_and_grad", task_batches, tasks, strategy)
            values, grads = zip(*(per_task(params, *args) for args in tasks))
        else:
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


class _Options(NamedTuple):
    strategy: str
    chunk_size: Optional[int]
    randomness: str
    batch_stats: bool


def _chunks(chosen: str, n: int, chunk_size: Optional[int]) -> List[Tuple[int, int]]:
    """The task ranges, mapped by vmap, whose gradients are taken one after the other."""
    size = chunk_size if chosen == "chunked" and chunk_size is not None else n
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _by_chunks(
    task_fn: Callable[..., Any],
    has_aux: bool,
    flat: List[Tensor],
    spec: Any,
    task_batches: Sequence[Any],
    options: _Options,
) -> Any:
    # What torch.func.grad_and_value of the mean task loss computes, by plain
    # autograd, one chunk of tasks at a time (a task for the loop, every task
    # for vmap): each chunk's gradient is taken, and its graph freed, before
    # the next chunk runs. The inner loops inside take their fast routes too.
    # The results are differentiable further (as torch.func's are) only where
    # that needs a graph: grad mode is on and some param, or a tensor the task
    # function captures, requires grad. Nothing is written to any .grad.
    where = "fparams.meta_value_and_grad"
    n = _num_tasks(where, task_batches)
    chosen = _resolve(options.strategy, options.chunk_size, options.randomness, task_batches, n)
    strategy = options.strategy
    if strategy == "auto" and chosen != "loop" and _loop_only(task_fn, pytree.tree_unflatten(flat, spec)):
        chosen = "loop"  # vmap cannot run this function (decided up front or learnt once), as in map_tasks

    def run(how: str) -> Any:
        return _chunk_grads(task_fn, has_aux, flat, spec, task_batches, options, n, how)

    if chosen == "loop":
        return run("loop")

    def run_vmap() -> Any:
        return _explain_vmap_errors(lambda: run(chosen), strategy)

    if strategy != "auto":
        return run_vmap()
    return vmap_or_loop(task_fn, run_vmap, lambda: run("loop"), [flat, list(task_batches)], stacklevel=4)


def _chunk_grads(
    task_fn: Callable[..., Any],
    has_aux: bool,
    flat: List[Tensor],
    spec: Any,
    task_batches: Sequence[Any],
    options: _Options,
    n: int,
    chosen: str,
    task_args: Optional[Callable[[int], Sequence[Any]]] = None,
) -> Any:
    """The mean task loss and its gradient, a chunk at a time (see :func:`_by_chunks`).

    ``task_args(i)`` gives task ``i``'s arguments where they are not stacked
    in ``task_batches`` (``tasks=``, run by the loop).
    """
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    check = torch.is_grad_enabled() and not keep  # for captured tensors that require grad
    total: List[Optional[Tensor]] = [None] * len(flat)
    values: List[Tensor] = []
    auxes: List[Any] = []
    norms = exact_norms(options.batch_stats)

    def chunk(a: int, b: int) -> None:
        nonlocal keep, check, total
        out = _run_chunk(task_fn, chosen, params, task_batches, a, b, norms, options.randomness, task_args)
        losses, aux = _losses_and_aux(out, has_aux)
        loss = losses.sum() / n
        if check and loss.requires_grad:
            keep, check = _reaches_other_leaves(loss, inputs), False
        found: Sequence[Optional[Tensor]] = (None,) * len(inputs)
        if loss.requires_grad:
            found = torch.autograd.grad(loss, inputs, create_graph=keep, allow_unused=True)
        total = [g if t is None else t if g is None else t + g for t, g in zip(total, found)]
        values.append(loss if keep else loss.detach())
        if has_aux:
            auxes.append(aux if keep else _detached(aux))

    with torch.enable_grad():
        inputs = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in flat]
        params = pytree.tree_unflatten(inputs, spec)
        if chosen == "loop":
            _each_task(norms, lambda i: chunk(i, i + 1), n)
        else:
            for a, b in _chunks(chosen, n, options.chunk_size):
                chunk(a, b)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, total)]
    value = values[0] if len(values) == 1 else torch.stack(values).sum()
    result = (value, _cat(auxes)) if has_aux else value
    return result, pytree.tree_unflatten(grads, spec)


def _run_chunk(
    task_fn: Callable[..., Any],
    chosen: str,
    params: Any,
    batches: Sequence[Any],
    a: int,
    b: int,
    norms: exact_norms,
    randomness: str,
    task_args: Optional[Callable[[int], Sequence[Any]]] = None,
) -> Any:
    """The outputs of tasks ``a:b``, stacked, as :func:`map_tasks` computes them."""
    if chosen == "loop":  # one task, under ``norms`` while :func:`_each_task` keeps it
        args = _task(batches, a) if task_args is None else task_args(a)
        return pytree.tree_map(lambda t: t.unsqueeze(0), task_fn(params, *args))
    chunk = [pytree.tree_map(lambda t: t[a:b] if isinstance(t, Tensor) else t, x) for x in batches]
    # the mode is entered inside the mapped function, as map_tasks does
    dims = (None,) + (0,) * len(chunk)
    mapped = torch.func.vmap(norms.around(task_fn), in_dims=dims, randomness=randomness)
    return mapped(params, *chunk)


def _reaches_other_leaves(loss: Tensor, inputs: Sequence[Tensor]) -> bool:
    """Does ``loss`` depend on a tensor that requires grad besides ``inputs``?

    Such a tensor is one the task function captured (a learned rate in its
    closure): the results must then stay differentiable with respect to it.
    """
    own = {id(t) for t in inputs}
    seen = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad: a leaf that requires grad
        if leaf is not None and id(leaf) not in own:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _detached(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _cat(chunks: List[Any]) -> Any:
    if len(chunks) == 1:
        return chunks[0]
    flat, specs = zip(*(pytree.tree_flatten(c) for c in chunks))
    return pytree.tree_unflatten([torch.cat(list(col)) for col in zip(*flat)], specs[0])
