"""``torch.compile`` with a clear, one-time fallback to eager execution."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` could not compile a function; it runs eagerly instead."""


def compile_fallback(fn: F, **compile_kwargs: Any) -> F:
    """``torch.compile(fn)``, falling back to eager ``fn`` where compilation fails.

    The first call that fails to compile warns once with
    :class:`CompileFallbackWarning` (naming the function and the error) and
    every later call runs ``fn`` eagerly. Errors that eager ``fn`` raises too
    surface as they are. ``compile_kwargs`` go to ``torch.compile``.

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
        if not eager:
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # any failure inside dynamo / inductor
                eager = True
                name = getattr(fn, "__qualname__", repr(fn))
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                warnings.warn(
                    f"fparams.compile: torch.compile failed on {name} ({type(err).__name__}: "
                    f"{first[:300]}); running it eagerly from now on.",
                    CompileFallbackWarning,
                    stacklevel=2,
                )
        return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
