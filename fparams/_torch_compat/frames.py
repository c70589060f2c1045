"""Frames, for exact_norms: the caller's ``self``, the calling module, and ``run_op``."""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any, Callable, Optional, Tuple

from torch import nn

from . import is_compiling

# Frames, for exact_norms (fparams/_norms/mode.py): which BatchNorm's forward called
# ``Tensor.add_`` on its batch counter, and which layer to name in an error. Probed
# once; without ``sys._getframe`` (or under torch.compile, which cannot trace frame
# inspection) the answer is UNKNOWN and exact_norms falls back to the tensor's kind.
_getframe: Optional[Callable[[int], FrameType]] = getattr(sys, "_getframe", None)

#: What :func:`caller_self` returns where frames cannot be read.
UNKNOWN_CALLER = object()


def caller_self(depth: int) -> object:
    """The ``self`` of the function ``depth`` frames above the caller (None if it has none)."""
    if _getframe is None or is_compiling():
        return UNKNOWN_CALLER
    return _getframe(depth + 1).f_locals.get("self")


def calling_module(kinds: Tuple[type, ...], limit: int = 16) -> Optional[nn.Module]:
    """The innermost module of one of ``kinds`` whose method is on the stack (error messages only)."""
    if _getframe is None or is_compiling():
        return None
    frame: Optional[FrameType] = _getframe(1)
    for _ in range(limit):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, kinds) and isinstance(owner, nn.Module):
            return owner
        frame = frame.f_back
    return None


def _op_runner() -> Callable[[Callable[..., Any], Any, dict[str, Any]], Any]:
    # A warning that torch raises in C++ (vmap's "performance drop" fallback ...) is
    # reported at the innermost Python frame. For every op under exact_norms that is the
    # frame that runs it: so that torch's message is not reported at a line of
    # fparams, ops run from this one-line function, compiled under a name of its own.
    source = "def run_op(func, args, kwargs):\n    return func(*args, **kwargs)\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<torch op, run under fparams.exact_norms>", "exec"), namespace)
    runner: Callable[[Callable[..., Any], Any, dict[str, Any]], Any] = namespace["run_op"]
    return runner


#: ``run_op(func, args, kwargs)``: ``func(*args, **kwargs)`` from a frame outside fparams.
run_op = _op_runner()
