"""Running a vmap over tasks: its known limits explained, and ``"auto"``'s move to the loop.

Only KNOWN vmap limitations (matched in ``_torch_compat``: a missing batching
rule, ``.item()`` or data-dependent control flow, ...) and torch's slow
per-example fallback make ``"auto"`` take the loop. Any other error, such as
a user's own broadcast error, reaches the user unchanged and changes nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import warn_in_user_code
from .._errors import FparamsRuntimeError, FparamsValueError
from .._kernels import vmap_kernels
from .._torch_compat import (
    SlowFallback,
    has_version_counters,
    is_random_op_error,
    slow_fallback_raises,
    slow_fallback_recorded,
    tree_utils as pytree,
    unbatchable_op,
    version,
)
from .plan import AutoMemory


class VmapFallbackWarning(UserWarning):
    """``strategy="auto"`` ran a function with the loop, or ``"vmap"`` ran torch's slow fallback.

    ``"auto"`` takes the loop where vmap cannot run one of the function's ops
    (no batching rule, ``.item()``, ...) and where vmap would run an op
    through torch's slow per-example fallback ("There is a performance drop
    because we have not yet implemented the batching rule for ..."). It warns
    once per mapped callable, which remembers the move (``mapped.demoted``;
    ``mapped.reset()`` forgets it). An explicit ``strategy="vmap"`` or
    ``"chunked"`` still runs vmap there and warns, naming the op and the loop.
    Pass ``strategy="loop"`` to choose the loop yourself (and silence it).

    Examples:
        >>> import warnings, fparams
        >>> with warnings.catch_warnings():  # where a silent loop would be too slow: an error
        ...     warnings.simplefilter("error", fparams.VmapFallbackWarning)
        >>> issubclass(fparams.VmapFallbackWarning, UserWarning)
        True
    """


def randomness_error() -> FparamsValueError:
    """vmap met a random op with ``randomness="error"``: the options that choose how tasks draw."""
    return FparamsValueError(
        "the task function calls a random op (dropout, torch.rand, ...) "
        "under vmap with randomness='error' (the default). Choose how tasks draw: "
        "map_tasks(..., randomness='different') draws independently per task, "
        "map_tasks(..., randomness='same') draws once for all tasks (the same options exist on "
        "fparams.meta_value_and_grad). strategy='loop' runs the tasks one by one, each drawing "
        "in turn from the global generator, so its numbers differ from vmap's."
    )


def _vmap_error(op: str, strategy: str, err: BaseException) -> FparamsRuntimeError:
    also = "" if strategy == "auto" else ", or strategy='auto', which falls back to the loop"
    said = str(err).splitlines()[0] if str(err) else type(err).__name__
    return FparamsRuntimeError(
        f"vmap cannot run {op}, so strategy={strategy!r} fails on this function. Use "
        f"map_tasks(..., strategy='loop'), which runs one task at a time{also}. torch said: {said}"
    )


def explained(call: Callable[[], Any], strategy: str, sizes: Sequence[int]) -> Any:
    """``call()``, a vmap over tasks, with vmap's errors for random ops and known limits explained.

    ``sizes`` are the batch sizes of the vmap calls (the tasks, or the chunks).
    """
    try:
        with vmap_kernels():  # attention's fused kernels have no batching rule
            return call()
    except RuntimeError as err:
        if is_random_op_error(err):
            raise randomness_error() from err
        op = unbatchable_op(err, sizes)
        if op is None:
            raise  # not a vmap limitation: the user's error, unchanged
        raise _vmap_error(op, strategy, err) from err


def run_vmap(call: Callable[[], Any], strategy: str, memory: AutoMemory, sizes: Sequence[int]) -> Any:
    """An explicit ``"vmap"`` / ``"chunked"``: ``call()``; on its first run, a warning per slow op."""
    if memory.ran:
        return explained(call, strategy, sizes)
    slow: List[str] = []
    with slow_fallback_recorded(slow):
        out = explained(call, strategy, sizes)
    memory.ran = True
    if slow:
        ops = ", ".join(sorted(set(slow)))
        warn_in_user_code(
            f"fparams.{memory.name}: strategy={strategy!r} runs {ops} through torch's slow "
            f"per-example vmap fallback (no batching rule). strategy='loop' (what 'auto' picks "
            f"here) is usually faster.",
            VmapFallbackWarning,
        )
    return out


def run_auto(
    call: Callable[[], Any], run_loop: Callable[[], Any], given: Any, memory: AutoMemory, sizes: Sequence[int]
) -> Any:
    """``"auto"``: ``call()`` (vmap); where vmap meets a known limit, ``run_loop()``, warned once.

    ``given`` holds the call's arguments (a pytree). vmap may have changed a
    task argument in place (per-task BatchNorm statistics) before it reached
    that op. On the callable's first call every tensor it was given is copied
    first, and any that changed gets its value back before the loop runs.
    Once vmap has run the function, only the tensors' version counters are
    kept: where one changed, the loop would apply that change twice, so the
    call raises instead. torch's slow-fallback warning is watched for until
    vmap has run the function once (an op on a path that only a later call
    takes is not seen).
    """
    first = not memory.ran or not has_version_counters()  # without them every call copies
    saved = [(t, version(t), t.detach().clone() if first else None) for t in _tensors(given)]
    # Until vmap has run the function once: a warning filter changes Python's warning state
    # (warnings shown "once" show again), so later calls run without it.
    watch = slow_fallback_raises() if not memory.ran else contextlib.nullcontext()
    try:
        with watch:
            out = explained(call, "auto", sizes)
    except SlowFallback as err:
        op, why = (
            f"{err} (slow per-example fallback)",
            f"vmap would run {err} through torch's slow per-example fallback",
        )
    except FparamsRuntimeError as err:
        found = unbatchable_op(err.__cause__, sizes) if err.__cause__ is not None else None
        if found is None:
            raise
        op, why = found, f"vmap cannot run {found}"
    else:
        memory.ran = True
        return out
    _restore(saved, first, op)
    memory.demoted = op
    warn_in_user_code(
        f"fparams.{memory.name}: {why}, so strategy='auto' runs {memory.fn_name} "
        f"with the loop from now on (same numbers, one task at a time; `.demoted` on the callable "
        f"says why, `.reset()` forgets). Pass strategy='loop' to choose it yourself.",
        VmapFallbackWarning,
    )
    return run_loop()


def _tensors(given: Any) -> List[Tensor]:
    return [t for t in pytree.tree_leaves(given) if isinstance(t, Tensor)]


def _restore(saved: List[Tuple[Tensor, int, Optional[Tensor]]], first: bool, op: str) -> None:
    """Put the inputs vmap changed in place back (first call), or refuse to change them twice."""
    # without version counters every call copies its inputs, and all are put back
    counted = has_version_counters()
    changed = [(t, copy) for t, before, copy in saved if not counted or version(t) != before]
    if changed and not first:
        raise FparamsRuntimeError(
            f"vmap cannot run {op}, and before it failed it had changed {len(changed)} of the "
            f"tensors given to the call in place, so running the loop now would apply those "
            f"changes twice. Use map_tasks(..., strategy='loop') for this function."
        )
    with torch.no_grad():
        for t, copy in changed:
            assert copy is not None  # copied on the first call, the only one that gets here
            t.copy_(copy)
