"""``torch.compile`` with a clear, one-time fallback to eager execution."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

from ._checks import warn_in_user_code
from ._torch_compat import is_compile_error

F = TypeVar("F", bound=Callable[..., Any])


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` could not compile a function; it runs eagerly instead."""


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

    Examples:
        >>> import torch, fparams
        >>> f = fparams.compile(lambda x: torch.sin(x) * 2)
        >>> float(f(torch.zeros(())))
        0.0
    """
    compiled = torch.compile(fn, **compile_kwargs)
    eager = False

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal eager
        if eager:
            return fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as err:
            if not is_compile_error(err):
                raise  # the function's own error: compilation is not at fault
            failure = err
        # Eager fn decides: if it raises too, the inputs were at fault, not the compiler.
        out = fn(*args, **kwargs)
        eager = True
        name = getattr(fn, "__qualname__", repr(fn))
        text = str(failure).strip()
        first = text.splitlines()[0] if text else ""
        warn_in_user_code(
            f"fparams.compile: torch.compile failed on {name} ({type(failure).__name__}: "
            f"{first[:300]}); running it eagerly from now on.",
            CompileFallbackWarning,
        )
        return out

    return run  # type: ignore[return-value]
