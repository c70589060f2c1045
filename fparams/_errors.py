"""fparams' own error types, and the one place a public function's name joins a message.

Checks deep inside fparams raise these without knowing which public function
the user called. The public function is decorated with :func:`public`, which
names itself on the error on the way out: the message then reads
``fparams.<name>: <what is wrong and the fix>``. The name is added once, by the
public function nearest to the mistake (fparams' own code calls the private
implementations, not the decorated entry points, so a user's callback that
misuses another fparams function is reported under that function's name).

Each type is also the built-in one (``TypeError``, ``ValueError``,
``RuntimeError``), so a user's ``except ValueError`` keeps working.
"""

from __future__ import annotations

import functools
import os
import types
from typing import Any, Callable, Optional, Type, TypeVar

import torch

__all__ = [
    "FparamsError",
    "FparamsRuntimeError",
    "FparamsTypeError",
    "FparamsValueError",
    "public",
]


class FparamsError(Exception):
    """The base of every error fparams raises about its input or its use.

    ``function`` is the public function the user called (``"adapt"``,
    ``"MAML.adapt"``), set by :func:`public` on the way out; ``message`` is
    the text without it.

    Examples:
        >>> import fparams, torch
        >>> try:
        ...     fparams.sgd_step({"w": torch.zeros(2)}, {"w": torch.zeros(2)}, lr="0.1")
        ... except fparams.FparamsError as err:
        ...     print(err.function, isinstance(err, TypeError))
        sgd_step True
    """

    def __init__(self, message: str, *, function: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.function = function

    def __str__(self) -> str:
        return f"fparams.{self.function}: {self.message}" if self.function else self.message

    def __reduce__(self) -> Any:  # pickles with its function name (multiprocessing, distributed)
        return (_rebuild, (type(self), self.message, self.function))


def _rebuild(kind: Type[FparamsError], message: str, function: Optional[str]) -> FparamsError:
    return kind(message, function=function)


class FparamsTypeError(FparamsError, TypeError):
    """A value of the wrong type: also a ``TypeError``."""


class FparamsValueError(FparamsError, ValueError):
    """A value of the right type that is out of range or does not fit: also a ``ValueError``."""


class FparamsRuntimeError(FparamsError, RuntimeError):
    """A use that cannot give the right answer (an in-place change before backward, a
    missing double backward): also a ``RuntimeError``, as torch raises for the same."""


F = TypeVar("F", bound=Callable[..., Any])

#: Files whose frames a traceback of an fparams error leaves out: fparams' own and torch's.
_INTERNAL = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def user_frames(tb: Optional[types.TracebackType]) -> Optional[types.TracebackType]:
    """``tb`` without the frames of files inside fparams or torch (the user's frames stay)."""
    kept = []
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_INTERNAL):
            kept.append(tb)
        tb = tb.tb_next
    out = None
    for entry in reversed(kept):
        out = types.TracebackType(out, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return out


def public(name: str) -> Callable[[F], F]:
    """Mark ``fn`` as the public entry point ``fparams.<name>``.

    An :class:`FparamsError` leaving ``fn`` gets ``name`` as its ``function``
    unless a public function nearer the mistake named it already, and loses
    the frames inside fparams and torch: the user's own frames stay, so the
    line that made the mistake ends the traceback. Other exceptions, torch's
    included, pass through untouched. Set the environment variable
    ``FPARAMS_FULL_TRACEBACKS=1`` to keep every frame.
    """
    full = bool(os.environ.get("FPARAMS_FULL_TRACEBACKS"))

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True  # noqa: F841 - pytest and IPython hide this frame too
            try:
                return fn(*args, **kwargs)
            except FparamsError as err:
                if err.function is None:
                    err.function = name
                if full:
                    raise
                raise err.with_traceback(user_frames(err.__traceback__))  # noqa: B904 - the same error

        return call  # type: ignore[return-value]

    return decorate


# Shown as ``fparams.FparamsValueError`` in tracebacks (and pickled by that public path).
for _kind in (FparamsError, FparamsTypeError, FparamsValueError, FparamsRuntimeError):
    _kind.__module__ = "fparams"
