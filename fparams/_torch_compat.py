"""Every use of a torch private, in one place, each probed once at import.

fparams runs on a range of torch releases (see README). The public API of
torch does not offer everything fparams needs, so a few private internals are
used. Each is looked up here, once, when fparams is imported; where one is
missing or has moved, the name below falls back to something that still works
(slower, or less precise in its error messages), or, where no fallback can
work, to a function that raises a clear error when that feature is used.
``import fparams`` never fails because an internal moved.

What, who uses it, and the fallback where it is missing:

* functorch's interpreter stack and batched-tensor helpers (``_grads``, the
  fast inner-gradient routes): ``FUNCTORCH is None``, and ``adapt`` takes
  ``torch.func.grad`` everywhere (same numbers, slower).
* ``torch.utils._pytree`` (``_tasks``, task batches): none needed, since
  ``torch.func`` itself is built on it.
* ``_BatchNorm`` (``_norms``, recognising the batch counter): the public
  BatchNorm classes.
* the TorchFunctionMode stack, ``_get_current_function_mode`` and
  ``_pop_mode_temporarily`` (``_inner`` steps out of ``exact_norms`` for its
  bookkeeping): the mode stays active throughout (same numbers, slower).
* ``sys._getframe`` (``_norms``, who called ``Tensor.add_``): ``inspect.currentframe``.
* the Module slot dicts ``_parameters`` / ``_buffers`` / ``_modules``
  (``_state``, ``_call``): none; split, clone and update raise a clear error.
* RNN ``_flat_weights`` (``_state``, RNN clones run on their new weights): a
  clear error when an RNN is cloned or updated.
* torch's error texts (``_inner``, ``_norms``: fparams' messages for known
  mistakes): torch's own message surfaces, unexplained.
* dynamo's exception types (``_compile``: a compile failure, or the user's own
  error?): the module that defines the exception's class decides.
* ``torch._dynamo``, imported up front on torch < 2.4 (``implicit``): there an
  ``autograd.Function`` imports it on its first call, and that import fails
  when the call runs under a functorch transform (torch 2.3 then leaves it
  half-imported for the whole process). On newer torch nothing is imported.
* whether autograd's saved-tensor hooks may run under ``vmap``
  (``_torch_compat._saved_tensors_hooks_is_enabled``, read once inside a tiny
  vmap; ``_checkpoint`` checkpoints the vmap route only where they may, which
  torch 2.3 refuses): ``SAVED_HOOKS_UNDER_VMAP = False``, and ``adapt`` runs
  such steps unrecomputed, with a warning.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
import weakref
from collections.abc import Iterable
from types import FrameType
from typing import Any, Callable, ContextManager, Iterator, Optional, Tuple

import torch
from torch import nn

# torch.func flattens its inputs with this module, so a torch that has torch.func has it.
from torch.utils import _pytree as pytree  # noqa: F401 - used as fparams._torch_compat.pytree

# -- functorch internals (the fast inner-gradient routes of _grads.py) ---------------


class _Functorch:
    """The functorch internals ``_grads.py`` uses, looked up as attributes once."""

    def __init__(self) -> None:
        from torch._C import _functorch as ft
        from torch._functorch import pyfunctorch as pyft

        self.unwrap_batched = ft._unwrap_batched
        self.add_batch_dim = ft._add_batch_dim
        self.maybe_get_level = ft.maybe_get_level
        self.interpreter_stack = ft.get_interpreter_stack
        self.current_interpreter = pyft.retrieve_current_functorch_interpreter
        self.pop_interpreter = pyft.temporarily_pop_interpreter_stack
        # fparams.implicit reads every task's residual at once (its convergence checks)
        self.is_wrapped = ft.is_functorch_wrapped_tensor
        self.get_unwrapped = ft.get_unwrapped
        # looked up so that a torch without them turns the routes off
        _ = (pyft.VmapInterpreter.batch_size, pyft.VmapInterpreter.randomness)
        self.VMAP = pyft.TransformType.Vmap


FUNCTORCH: Optional[_Functorch]
try:
    FUNCTORCH = _Functorch()
except (ImportError, AttributeError):  # pragma: no cover - depends on the torch build
    FUNCTORCH = None


# -- BatchNorm's base class ----------------------------------------------------------------

BATCH_NORMS: Tuple[type, ...]
try:
    from torch.nn.modules.batchnorm import _BatchNorm

    BATCH_NORMS = (_BatchNorm,)
except ImportError:  # pragma: no cover - depends on the torch version
    BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# -- is torch.compile tracing? ---------------------------------------------------------------

is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or (lambda: False)


# -- the torch function mode stack ---------------------------------------------------------------


def _no_mode() -> Any:
    return None


#: The innermost active ``TorchFunctionMode``, or None. Without the private
#: accessor it is always None: ``adapt`` then never steps out of ``exact_norms``.
current_function_mode: Callable[[], Any] = getattr(torch.overrides, "_get_current_function_mode", _no_mode)

_pop_mode: Optional[Callable[[], ContextManager[Any]]]
_pop_mode = getattr(torch.overrides, "_pop_mode_temporarily", None)


@contextlib.contextmanager
def pop_function_mode() -> Iterator[Any]:
    """Leave the innermost ``TorchFunctionMode`` for a block; yields that mode."""
    assert _pop_mode is not None  # only called where current_function_mode() found one
    with _pop_mode() as popped:
        yield popped


# -- the caller's frame -----------------------------------------------------------------------


def caller_frame(depth: int) -> Optional[FrameType]:
    """The frame ``depth`` levels above the caller of this function (``sys._getframe(depth + 1)``)."""
    if hasattr(sys, "_getframe"):
        return sys._getframe(depth + 1)
    frame = inspect.currentframe()  # pragma: no cover - Python implementations without _getframe
    for _ in range(depth + 1):  # pragma: no cover
        frame = frame.f_back if frame is not None else None
    return frame  # pragma: no cover


# -- Module slot dicts ------------------------------------------------------------------------


def _has_slots() -> bool:
    m = nn.Linear(1, 1)
    m.register_buffer("b", torch.zeros(1))
    return (
        isinstance(vars(m).get("_parameters"), dict)
        and vars(m)["_parameters"].get("weight") is m.weight
        and isinstance(vars(m).get("_buffers"), dict)
        and isinstance(vars(m).get("_modules"), dict)
    )


#: Does ``nn.Module`` keep its tensors and children in the ``_parameters``,
#: ``_buffers`` and ``_modules`` dicts of its ``__dict__``? (Every torch since 1.0.)
MODULE_SLOTS = _has_slots()


def check_module_slots(where: str) -> None:
    """``NotImplementedError`` where ``nn.Module`` stores its state in some other way."""
    if not MODULE_SLOTS:  # pragma: no cover - depends on the torch version
        raise NotImplementedError(
            f"{where}: this torch ({torch.__version__}) no longer keeps a module's tensors in "
            f"`_parameters` / `_buffers`; fparams needs a release that supports it (see README)."
        )


# -- RNN flat weights ---------------------------------------------------------------------------


def _rnn_layout() -> Tuple[bool, bool]:
    rnn = nn.RNN(1, 1)
    names = isinstance(getattr(rnn, "_flat_weights_names", None), list) and isinstance(
        vars(rnn).get("_flat_weights"), list
    )
    return names, isinstance(vars(rnn).get("_flat_weight_refs"), list)


_RNN_FLAT, _RNN_REFS = _rnn_layout()


def refresh_rnn(module: nn.Module) -> None:
    """Point an RNN module's list of flat weights at the tensors now in its slots.

    ``RNNBase`` runs on that list, not on ``_parameters``. It is rebuilt from
    the slots; ``flatten_parameters()`` is deliberately not called: on cuDNN it
    copies the weights into one buffer in place, which would cut them out of
    the autograd graph. Other modules are left alone.
    """
    if not isinstance(module, nn.RNNBase):
        return
    if not _RNN_FLAT:  # pragma: no cover - depends on the torch version
        raise NotImplementedError(
            f"fparams: this torch ({torch.__version__}) stores RNN weights in a way fparams does "
            f"not know, so a cloned or updated {type(module).__name__} would run on stale weights."
        )
    slots = module._parameters
    weights = [slots.get(n) for n in module._flat_weights_names]
    module.__dict__["_flat_weights"] = weights
    if _RNN_REFS:
        # forward() compares these weak references with the slots (strictly, one
        # per name) to notice swapped weights; an empty list makes it raise.
        module.__dict__["_flat_weight_refs"] = [None if w is None else weakref.ref(w) for w in weights]


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


# -- saved-tensor hooks under vmap ---------------------------------------------------------------------


def _saved_hooks_under_vmap() -> bool:
    # Older torch (2.3) switches autograd's saved-tensor hooks off inside every
    # functorch transform, vmap included; newer ones only inside grad transforms.
    enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    if enabled is None:  # pragma: no cover - depends on the torch version
        return False
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(bool(enabled()))
        return x

    try:
        torch.func.vmap(probe)(torch.zeros(1))
    except Exception:  # pragma: no cover - depends on the torch version
        return False
    return bool(seen and seen[0])


#: May autograd's saved-tensor hooks run under ``vmap`` (what ``adapt(checkpoint=True)``
#: needs on the vmap route)?
SAVED_HOOKS_UNDER_VMAP = _saved_hooks_under_vmap()


# -- torch 2.3: dynamo imported lazily by autograd.Function, broken under a transform ------------


def import_dynamo_if_lazy_import_breaks() -> None:
    """On torch < 2.4, import ``torch._dynamo`` now, outside any transform (see the module docstring)."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 4):  # pragma: no cover - depends on the torch version
        importlib.import_module("torch._dynamo")


# --- arch ---
# -- ops without a double backward (``_kernels`` names them in its error) --------------------------
# Where an op's backward has no derivative of its own, torch records a ``NotImplemented``
# node in a gradient's graph (create_graph=True); calling that node raises torch's error,
# whose text names the op. A few ops (cdist, pdist) record a formula node that raises
# instead. Where these names or that text change, the walk finds fewer ops (or names "an
# op") and torch's own error surfaces at the outer backward, unexplained.

_NOT_IMPLEMENTED_NODE = "torch::autograd::NotImplemented"
#: Formula nodes whose double backward is ``not_implemented`` in torch's derivatives.yaml.
_RAISING_NODES = {
    "CdistBackwardBackward0": "aten::_cdist_backward",
    "PdistBackwardBackward0": "aten::_pdist_backward",
}
_OP_IN_TEXT = re.compile(r"derivative for (?:aten::)?'?([A-Za-z0-9_.]+)'? is not implemented")


def _node_op(node: Any) -> str:
    """The aten op a ``NotImplemented`` node stands for, read from the error it raises."""
    try:
        metas = node._input_metadata
        node(*(torch.zeros(m.shape, dtype=m.dtype, device=m.device) for m in metas))
    except RuntimeError as err:
        found = _OP_IN_TEXT.search(str(err))
        if found:
            return "aten::" + found.group(1)
    except Exception:  # pragma: no cover - depends on the torch version
        pass
    return "an op"  # pragma: no cover - depends on the torch version


def ops_without_double_backward(tensors: Iterable[Any]) -> list[str]:
    """The ops in the graphs of ``tensors`` whose backward has no derivative, sorted.

    One walk over the nodes reachable from the tensors' ``grad_fn``, each node once.
    """
    stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = set()
    found = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        name = node.name()
        if name == _NOT_IMPLEMENTED_NODE:
            found.add(_node_op(node))
        elif name in _RAISING_NODES:
            found.add(_RAISING_NODES[name])
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return sorted(found)
