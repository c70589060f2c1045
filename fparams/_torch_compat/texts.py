"""torch's error and warning texts that fparams recognises, and dynamo's exceptions.

Where no capability check can tell in advance, fparams recognises a few of torch's
messages by their text; where torch rewords one, its own message surfaces unexplained.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from typing import Iterator, List, Optional, Sequence

# -- torch's error texts ---------------------------------------------------------------------------
# Where no capability check can tell in advance, fparams recognises a few of
# torch's errors by their text to explain them. Each matcher says which error it
# is for; where torch rewords one, its own message surfaces unexplained.


def is_captured_update_error(err: BaseException) -> bool:
    """torch.func: a tensor captured from outside ``grad``/``vmap`` was changed in place."""
    return "captured Tensor" in str(err)


def is_nonscalar_grad_error(err: BaseException) -> bool:
    """``torch.func.grad``: the function did not return a scalar."""
    text = str(err)
    return "scalar" in text and "grad" in text


def is_vmap_error(err: BaseException) -> bool:
    """A vmap-specific failure (a Python number read from a batched tensor ...)."""
    return "vmap" in str(err)


def is_shared_stats_error(err: BaseException) -> bool:
    """An in-place update of a tensor that has no task dimension, or is captured, under vmap."""
    text = str(err)
    return is_vmap_error(err) or "captured" in text or "doesn't match the broadcast shape" in text


# -- dynamo's exceptions ------------------------------------------------------------------------------

#: Where torch.compile's own exceptions are defined.
_COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch.fx", "torch._subclasses")


def is_compile_error(err: BaseException) -> bool:
    """Did ``err`` come from ``torch.compile``'s machinery rather than from the compiled function?

    dynamo wraps failures of its own, of its backends and of fake-tensor
    propagation in ``torch._dynamo.exc.TorchDynamoException``; an exception
    the function raises itself passes through unwrapped. dynamo is imported by
    ``torch.compile`` itself, so it is looked up lazily, never imported here.
    Without it, the module that defines the exception's class decides.
    """
    exc = sys.modules.get("torch._dynamo.exc")
    base = getattr(exc, "TorchDynamoException", None)
    if isinstance(base, type) and isinstance(err, base):
        return True
    return any(cls.__module__.startswith(_COMPILER_MODULES) for cls in type(err).__mro__)




def unbatchable_op(err: BaseException, batch_sizes: Sequence[int] = ()) -> Optional[str]:
    """The op a vmap error names, where the error is a KNOWN vmap limitation (the loop runs it).

    Only vmap's own refusals count: a missing batching rule without a
    fallback, ``.item()`` or data-dependent control flow, ``.data`` of a fused
    recurrent kernel, a data-dependent output shape, and an in-place write
    whose output lacks exactly the task dimension (its broadcast shape is the
    output's with one of ``batch_sizes`` in front: per task, the shapes
    match). Any other error (a user's shape or broadcast error, which the loop
    would raise as well) gives None and reaches the user unchanged.
    """
    text = str(err)
    if _lacks_only_the_task_dim(text, batch_sizes):  # e.g. a fused RNN kernel's decomposition under grad
        return "an in-place op whose output has no task dimension"
    if "Batching rule not implemented" in text or "fallback path doesn't work" in text:
        found = re.search(r"aten::\w+(\.\w+)?", text)
        return found.group(0) if found else "an op without a batching rule"
    if "calling .item() on a Tensor" in text or "data-dependent control flow" in text:
        return ".item() or data-dependent control flow"
    if "accessing `data` under vmap" in text:  # older torch's recurrent layers
        return "an op that reads .data (a recurrent layer's fused kernel)"
    if "batching operators that can output dynamic shape" in text:
        return "an op whose output shape depends on the data"
    return None


_BROADCAST = re.compile(r"output with shape \[([\d, ]*)\] doesn't match the broadcast shape \[([\d, ]*)\]")


def _lacks_only_the_task_dim(text: str, batch_sizes: Sequence[int]) -> bool:
    found = _BROADCAST.search(text)
    if found is None:
        return False
    out, wanted = ([int(d) for d in g.split(",") if d.strip()] for g in found.groups())
    return len(wanted) == len(out) + 1 and wanted[1:] == out and wanted[0] in batch_sizes


def is_random_op_error(err: BaseException) -> bool:
    """vmap with ``randomness="error"`` met a random op."""
    return "called random operation while in randomness error mode" in str(err)


#: The start of torch's warning where vmap runs an op through its slow per-example fallback.
_SLOW_FALLBACK = "There is a performance drop because we have not yet implemented the batching rule for"


def slow_fallback_op(message: object) -> Optional[str]:
    """The op of torch's "performance drop" warning (vmap's per-example fallback), or None."""
    text = str(message)
    if not text.startswith(_SLOW_FALLBACK):
        return None
    found = re.search(r"aten::[\w.]+?(?=\.?\s|\.$|$)", text)
    return found.group(0) if found else "an op without a batching rule"


class SlowFallback(RuntimeError):
    """Raised in place of torch's "performance drop" warning inside :func:`slow_fallback_raises`."""


@contextlib.contextmanager
def slow_fallback_raises() -> Iterator[None]:
    """Turn torch's slow-fallback warning into an exception for a block (``"auto"`` then loops).

    The warning reaches Python when the op returns, so the block stops right
    after that op. Other warnings keep their filters.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=re.escape(_SLOW_FALLBACK))
        try:
            yield
        except UserWarning as err:
            op = slow_fallback_op(err)
            if op is None:
                raise
            raise SlowFallback(op) from None


@contextlib.contextmanager
def slow_fallback_recorded(found: List[str]) -> Iterator[None]:
    """Collect the ops of torch's slow-fallback warnings in ``found``; other warnings pass on."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for w in caught:
            op = slow_fallback_op(w.message)
            if op is not None:
                found.append(op)
            else:  # re-issued under the caller's filters
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


