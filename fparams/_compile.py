"""``torch.compile`` with a clear, one-time fallback to eager execution, that never runs code twice."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

from ._checks import check_callable, warn_in_user_code
from ._errors import FparamsRuntimeError, public
from ._torch_compat import dynamo_frames, is_compile_error

F = TypeVar("F", bound=Callable[..., Any])


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` could not compile a function; it runs eagerly instead."""


@public("compile")
def compile_fallback(fn: F, **compile_kwargs: Any) -> F:
    """``torch.compile(fn)``, falling back to eager ``fn`` where compilation fails.

    Only a failure of torch.compile's own machinery (dynamo, its backends,
    an unsupported construct) counts, and only if eager ``fn`` then succeeds
    on the same inputs: the first such call warns once with
    :class:`CompileFallbackWarning` (naming the function and the error), and
    every later call runs ``fn`` eagerly. An exception that ``fn`` raises
    itself surfaces untouched and compilation stays on; where tracing fails
    because the inputs are wrong (a shape mismatch seen during tracing), the
    error eager ``fn`` raises on them surfaces instead, and compilation stays
    on too. ``compile_kwargs`` go to ``torch.compile``.

    User code never runs twice: where the failure comes after part of ``fn``
    ran already (a graph break, then a later graph that fails to compile), the
    call is not repeated eagerly (its side effects, a BatchNorm's counter or
    an ``opt.step()``, would happen twice); an
    :class:`~fparams.FparamsRuntimeError` says so, and later calls run eagerly.
    (dynamo tells apart only what it compiled during the failing call: a
    function whose first part was compiled by an earlier call and whose later
    part alone fails to recompile is still repeated.)

    Examples:
        >>> import torch, fparams
        >>> f = fparams.compile(lambda x: torch.sin(x) * 2)
        >>> float(f(torch.zeros(())))
        0.0
    """
    check_callable("fn", fn, "to compile")
    compiled = torch.compile(fn, **compile_kwargs)
    eager = False

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal eager
        if eager:
            return fn(*args, **kwargs)
        before = dynamo_frames()
        try:
            return compiled(*args, **kwargs)
        except Exception as err:
            if not is_compile_error(err):
                raise  # the function's own error: compilation is not at fault
            failure = err
        name = getattr(fn, "__qualname__", repr(fn))
        if dynamo_frames() - before > 1:  # a frame ran, then a later one failed to compile
            eager = True
            raise FparamsRuntimeError(
                f"torch.compile failed on {name} after part of it had run ({_first_line(failure)}). "
                f"It is not run again eagerly, since that would repeat what already ran (in-place "
                f"updates, optimizer steps); later calls run eagerly. Make the function compile as a "
                f"whole (torch.compile(..., fullgraph=True) shows where it breaks), or call it eagerly.",
                function="compile",
            ) from failure
        # Eager fn decides: if it raises too, the inputs were at fault, not the compiler.
        out = fn(*args, **kwargs)
        eager = True
        warn_in_user_code(
            f"fparams.compile: torch.compile failed on {name} ({_first_line(failure)}); "
            f"running it eagerly from now on.",
            CompileFallbackWarning,
        )
        return out

    return run  # type: ignore[return-value]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:300]}"
