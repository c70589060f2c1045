"""Task batches: count the tasks, take one out, stack the per-task outputs, pad or copy per task."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import check_dict, check_int, describe
from .._errors import FparamsTypeError, FparamsValueError, public
from .._torch_compat import tree_utils as pytree
from .._types import Params, TensorDict


def num_tasks(batches: Sequence[Any]) -> int:
    """The number of tasks: dim 0 of every tensor in the task arguments, which must agree."""
    leaves = [t for t in pytree.tree_leaves(list(batches)) if isinstance(t, Tensor)]
    counts = {t.size(0) if t.dim() else -1 for t in leaves}
    if len(counts) == 1 and min(counts) > 0:
        return counts.pop()  # the common case, checked without building any message
    sizes = _task_counts(batches)
    if not sizes:
        raise FparamsValueError("no task argument holds a tensor, so there are no tasks to map over.")
    if len({n for _, n in sizes}) > 1:
        shown = ", ".join(f"{label}: {n}" for label, n in sizes)
        raise FparamsValueError(
            f"the task arguments disagree on the number of tasks (dim 0): {shown}. Every "
            f"argument holds all tasks on dim 0. For tasks of different sizes, pass one tuple per "
            f"task, f(params, tasks=[(xs0, ys0), (xs1, ys1), ...]) (run by the loop), or pad them "
            f"with fparams.pad_tasks and mask the loss (vmap)."
        )
    raise FparamsValueError("the task arguments hold 0 tasks (dim 0 has size 0).")


def _task_counts(batches: Sequence[Any]) -> List[Tuple[str, int]]:
    sizes: List[Tuple[str, int]] = []
    for i, batch in enumerate(batches):
        for path, leaf in pytree.tree_flatten_with_path(batch)[0]:
            if not isinstance(leaf, Tensor):
                continue
            label = f"task_batches[{i}]{pytree.keystr(path)}"
            if leaf.dim() == 0:
                raise FparamsValueError(
                    f"{label} is a 0-dim tensor, but every task argument needs the tasks on dim 0. "
                    f"Pass values shared by all tasks through the function's closure or as params."
                )
            sizes.append((label, leaf.size(0)))
    return sizes


def task_numel(batches: Sequence[Any]) -> int:
    """The element count of one task's largest tensor argument (shapes only, no tensor op)."""
    numel = 0
    for t in pytree.tree_leaves(list(batches)):
        if isinstance(t, Tensor):
            numel = max(numel, math.prod(t.shape[1:]))
    return numel


def task(batches: Sequence[Any], i: int) -> List[Any]:
    """Task ``i``'s arguments, taken from the stacked task batches."""
    return [pytree.tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, b) for b in batches]


def task_slice(batches: Sequence[Any], a: int, b: int) -> List[Any]:
    """Tasks ``a:b`` of the stacked task batches, still stacked."""
    return [pytree.tree_map(lambda t: t[a:b] if isinstance(t, Tensor) else t, x) for x in batches]


def one_task_batch(t: Any) -> Any:
    """A batch of one task (dim 0 of size 1) from one task's value."""
    return t.unsqueeze(0) if isinstance(t, Tensor) else t


def stack_outputs(outputs: Sequence[Any]) -> Any:
    """The per-task outputs (tensors or pytrees of tensors), stacked on a new dim 0."""
    flat, spec = zip(*(pytree.tree_flatten(o) for o in outputs))
    if any(s != spec[0] for s in spec):
        raise FparamsValueError(
            "the function returned differently structured outputs per task "
            f"(task 0: {spec[0]}; task {next(i for i, s in enumerate(spec) if s != spec[0])}: "
            f"{next(s for s in spec if s != spec[0])}). Return the same structure for every task."
        )
    for i, leaves in enumerate(flat):
        for j, leaf in enumerate(leaves):
            if not isinstance(leaf, Tensor):
                raise FparamsTypeError(
                    f"the function returned {describe(leaf)} for task {i} (output leaf {j}); "
                    f"return tensors (e.g. the loss as a 0-dim tensor), which are stacked per task."
                )
    columns = [list(col) for col in zip(*flat)]
    for j, col in enumerate(columns):
        if any(t.shape != col[0].shape for t in col):
            shapes = ", ".join(f"task {i}: {tuple(t.shape)}" for i, t in enumerate(col))
            raise FparamsValueError(
                f"the per-task outputs (leaf {j}) differ in shape ({shapes}), so they cannot be "
                f"stacked. Reduce each task's output to a common shape (e.g. .mean() for a loss)."
            )
    return pytree.tree_unflatten([torch.stack(col) for col in columns], spec[0])


def check_task_output(out: Any, losses: bool) -> Any:
    """One task's output (under vmap, before it is stacked): tensors only; with ``losses``,
    not a tuple (``meta_value_and_grad`` without ``has_aux``). Returns ``out``."""
    if losses and isinstance(out, tuple):
        raise FparamsTypeError(
            f"`task_fn` returned a tuple of {len(out)} values; it must return one scalar loss per "
            f"task. To return more, return (loss, aux) and pass has_aux=True."
        )
    for leaf in pytree.tree_leaves(out):
        if not isinstance(leaf, Tensor):
            raise FparamsTypeError(
                f"the function returned {describe(leaf)} for a task; return tensors (e.g. the "
                f"loss as a 0-dim tensor), which are stacked per task."
            )
    return out


def checked(fn: Callable[..., Any], losses: bool) -> Callable[..., Any]:
    """``fn`` whose every output goes through :func:`check_task_output` (for vmap's own check)."""

    def call(*args: Any) -> Any:
        return check_task_output(fn(*args), losses)

    return call


def check_params(params: Any) -> None:
    """``params`` for a gradient: a pytree (a dict) whose leaves are floating-point tensors."""
    for path, leaf in pytree.tree_flatten_with_path(params)[0]:
        label = f"params{pytree.keystr(path)}"
        if not isinstance(leaf, Tensor):
            raise FparamsTypeError(
                f"`{label}` is {describe(leaf)}; the gradient is taken with respect to every value "
                f"of `params`, so each must be a floating-point tensor (pass constants through "
                f"task_fn's closure). Use fparams.split(module) to get params."
            )
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise FparamsTypeError(
                f"`{label}` has dtype {leaf.dtype}; gradients need floating-point tensors. Cast it "
                f"(e.g. .float()) or pass it through task_fn's closure."
            )


def per_task_losses(out: Any) -> Tensor:
    """The stacked per-task losses: a 1-dim tensor, one scalar per task."""
    if isinstance(out, tuple):
        raise FparamsTypeError(
            f"`task_fn` returned a tuple of {len(out)} values; it must return one scalar loss per "
            f"task. To return more, return (loss, aux) and pass has_aux=True."
        )
    if not isinstance(out, Tensor) or out.dim() != 1:
        shape = tuple(out.shape[1:]) if isinstance(out, Tensor) and out.dim() > 0 else None
        raise FparamsValueError(
            f"`task_fn` must return one scalar loss per task; it returned {type(out).__name__} "
            f"with per-task shape {shape}. Reduce it, e.g. .mean()."
        )
    return out


def losses_and_aux(out: Any, has_aux: bool) -> Tuple[Tensor, Any]:
    """The per-task losses (one scalar per task) and, with ``has_aux``, the stacked aux."""
    if not has_aux:
        return per_task_losses(out), None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise FparamsValueError(
            f"has_aux=True needs task_fn to return (loss, aux); it returned {describe(out)}."
        )
    return per_task_losses(out[0]), out[1]


def concat(chunks: List[Any]) -> Any:
    """Chunks of stacked outputs (pytrees), concatenated on dim 0."""
    if len(chunks) == 1:
        return chunks[0]
    flat, specs = zip(*(pytree.tree_flatten(c) for c in chunks))
    return pytree.tree_unflatten([torch.cat(list(col)) for col in zip(*flat)], specs[0])


def detached(tree: Any) -> Any:
    """``tree`` with every tensor detached."""
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def check_task_list(task_batches: Sequence[Any], tasks: Any, strategy: str) -> None:
    """``tasks=``: a non-empty list of per-task argument tuples, for the loop, given alone."""
    if task_batches:
        raise FparamsTypeError(
            "pass the tasks either as batches, f(params, *task_batches), or as a list of "
            "per-task tuples, f(params, tasks=[...]); got both."
        )
    if isinstance(tasks, (Tensor, Mapping)) or not isinstance(tasks, (list, tuple)):
        raise FparamsTypeError(
            f"`tasks` must be a list with one tuple of arguments per task, e.g. "
            f"[(xs0, ys0), (xs1, ys1)]; got {type(tasks).__name__}."
        )
    if not tasks:
        raise FparamsValueError("`tasks` is empty, so there are no tasks to map over.")
    for i, args in enumerate(tasks):
        if not isinstance(args, tuple):
            raise FparamsTypeError(
                f"`tasks[{i}]` must be a tuple of that task's arguments (fn(params, *tasks[{i}])); "
                f"got {type(args).__name__}. Wrap a single argument as (x,)."
            )
    if strategy in ("vmap", "chunked"):
        raise FparamsValueError(
            f"a list of per-task tuples (`tasks=`) runs with the loop, since tasks of "
            f"different sizes cannot be stacked; got strategy={strategy!r}. Use strategy='auto' or "
            f"'loop', or pad the tasks with fparams.pad_tasks for vmap."
        )


@public("pad_tasks")
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

    Args:
        tensors: one tensor per task, rows on dim 0; the other dims, the dtype
            and the device agree.
        value: the padding value (a finite number).

    Returns:
        ``(batch, mask)`` as above.

    Examples:
        >>> import torch, fparams
        >>> batch, mask = fparams.pad_tasks([torch.ones(2, 3), torch.ones(4, 3)])
        >>> batch.shape, mask.sum(1).tolist()
        (torch.Size([2, 4, 3]), [2, 4])
    """
    _check_pad_inputs(tensors, value)
    first = tensors[0]
    rows = max(t.size(0) for t in tensors)
    batch = first.new_full((len(tensors), rows, *first.shape[1:]), value)
    mask = torch.zeros(len(tensors), rows, dtype=torch.bool, device=first.device)
    for i, t in enumerate(tensors):
        batch[i, : t.size(0)] = t
        mask[i, : t.size(0)] = True
    return batch, mask


def _check_pad_inputs(tensors: object, value: object) -> None:
    if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)):
        raise FparamsTypeError(
            f"`tensors` must be a list with one tensor per task (rows on dim 0); "
            f"got {type(tensors).__name__}."
        )
    if not tensors:
        raise FparamsValueError("`tensors` is empty; give one tensor per task.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FparamsValueError(f"`value` must be a finite number (the padding); got {describe(value)}.")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise FparamsTypeError(f"`tensors[{i}]` is a {type(t).__name__}, not a tensor.")
        if t.dim() == 0:
            raise FparamsValueError(f"`tensors[{i}]` is 0-dim; each task needs its rows on dim 0.")
    first = tensors[0]
    bad = [
        f"tensors[{i}]: {tuple(t.shape)} {t.dtype} {t.device}"
        for i, t in enumerate(tensors)
        if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype or t.device != first.device
    ]
    if bad:
        raise FparamsValueError(
            f"the tasks may differ only in their number of rows (dim 0); tensors[0] is "
            f"{tuple(first.shape)} {first.dtype} {first.device}, but " + ", ".join(bad) + "."
        )


@public("stack_tasks")
def stack_tasks(tensors: TensorDict, num_tasks: int) -> Params:
    """One private copy of every tensor per task, stacked on a new dim 0.

    Use it to give each task its own BatchNorm running statistics: pass the
    result to the mapped function as a task argument, and return the updated
    buffers from it.

    Args:
        tensors: a dict of tensors (e.g. a module's buffers from ``fparams.split``).
        num_tasks: how many copies (an int >= 1).

    Returns:
        A dict with the same keys; each value has a new dim 0 of size ``num_tasks``.

    Examples:
        >>> import torch, fparams
        >>> fparams.stack_tasks({"running_mean": torch.zeros(3)}, 4)["running_mean"].shape
        torch.Size([4, 3])
    """
    check_dict("tensors", tensors)
    check_int("num_tasks", num_tasks, 1)
    for k, t in tensors.items():
        if not isinstance(t, Tensor):
            raise FparamsTypeError(
                f"`tensors[{k!r}]` is {describe(t)}, not a tensor; stack_tasks copies tensors "
                f"(leave other values out, or make them tensors with torch.as_tensor)."
            )
    return {k: t.detach().unsqueeze(0).repeat(num_tasks, *([1] * t.dim())) for k, t in tensors.items()}
