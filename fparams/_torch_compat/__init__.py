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
* a tensor's ``_version`` counter (``_checkpoint``: an input changed in place
  before a checkpointed step is recomputed): every tensor reads 0, and such
  changes go undetected.
* dynamo's frame counter (``_compile``: did part of the function run before
  compilation failed?): 0, and a failure after a graph break falls back to eager
  as before.
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
import sys
import weakref
from types import FrameType
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Set, Tuple

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
        self.VMAP = pyft.TransformType.Vmap  # type: ignore[attr-defined]  # not re-exported


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


def check_module_slots() -> None:
    """``NotImplementedError`` where ``nn.Module`` stores its state in some other way."""
    if not MODULE_SLOTS:  # pragma: no cover - depends on the torch version
        raise NotImplementedError(
            f"fparams: this torch ({torch.__version__}) no longer keeps a module's tensors in "
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


# --- implicit ---
# torch.func's pytree functions, named here so that callers type-check (mypy --strict)
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_leaves = pytree.tree_leaves

# --- tasks ---
# fparams._tasks: which vmap errors and warnings are vmap's own limits (the
# loop runs what they stop), autograd's version counters and a graph walk.
# Where torch rewords a message, its error surfaces unexplained and ``"auto"``
# does not demote (never a wrong answer, at worst a lost speed-up).


def _probe_versions() -> bool:
    t = torch.zeros(1)
    before = getattr(t, "_version", None)
    t.add_(1)
    return isinstance(before, int) and getattr(t, "_version", None) == before + 1


#: Does a tensor count its in-place changes in ``._version``? Without it fparams copies instead.
VERSION_COUNTERS = _probe_versions()


def has_version_counters() -> bool:
    """:data:`VERSION_COUNTERS`, read at call time."""
    return VERSION_COUNTERS


def version(t: torch.Tensor) -> int:
    """``t._version``, autograd's count of in-place changes: bumped by every in-place change of
    ``t`` or a view of its storage. Where torch has no counter every tensor reads 0, and in-place
    changes are then not detected."""
    return int(getattr(t, "_version", 0)) if VERSION_COUNTERS else 0


def _probe_graph_walk() -> bool:
    leaf = torch.zeros(1, requires_grad=True)
    node = (leaf * 2).grad_fn
    try:
        nxt = node.next_functions[0][0]  # type: ignore[union-attr]
        return getattr(nxt, "variable", None) is leaf
    except (AttributeError, IndexError, TypeError):  # pragma: no cover - depends on the torch version
        return False


#: Can autograd's graph be walked (``next_functions``, ``AccumulateGrad.variable``)?
GRAPH_WALK = _probe_graph_walk()


def reaches_other_leaves(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """Does ``out`` depend on a leaf that requires grad other than ``inputs``?

    Without the graph walk the answer is True (the caller keeps a graph it may
    not need: more memory, the same numbers).
    """
    if not GRAPH_WALK:
        return True
    own = {id(t) for t in inputs}
    seen = set()
    stack = [out.grad_fn]
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


#: ``pytree`` again, as a module attribute that ``mypy --strict`` sees as exported (an import is not).
tree_utils = pytree
# --- adapt ---
# Version counters, functorch wrappers and autograd graph reachability (``_inner``,
# ``_checkpoint``), and dynamo's frame counter (``_compile``).


def batched_at(t: torch.Tensor, level: int) -> bool:
    """Is ``t`` a ``vmap`` BatchedTensor of functorch level ``level``?"""
    return FUNCTORCH is not None and bool(FUNCTORCH.maybe_get_level(t) == level)


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its functorch wrappers (vmap's batched, grad's tracking): the physical tensor."""
    if FUNCTORCH is None:  # pragma: no cover - depends on the torch build
        return t
    while FUNCTORCH.is_wrapped(t):
        t = FUNCTORCH.get_unwrapped(t)
    return t


def requires_grad_somewhere(t: torch.Tensor) -> bool:
    """Does ``t``, or a tensor it wraps, require grad? (vmap's wrapper reads False even
    where the physical tensor beneath requires grad.)"""
    while True:
        if t.requires_grad:
            return True
        # dynamo cannot trace functorch's wrapper checks (a graph break): under
        # torch.compile the tensor's own flag decides
        if FUNCTORCH is None or is_compiling() or not FUNCTORCH.is_wrapped(t):
            return False
        t = FUNCTORCH.get_unwrapped(t)


def reached_by(output: torch.Tensor, inputs: List[torch.Tensor], stops: List[torch.Tensor]) -> List[bool]:
    """Which of ``inputs`` ``output``'s autograd graph reaches, by a walk of its nodes.

    Each input is found by its own node (``grad_fn``, or the ``AccumulateGrad``
    of a leaf); the walk does not go below an input's node, nor below the node
    of a tensor in ``stops`` (tensors whose history is known not to matter).
    """
    wanted: Dict[Any, int] = {}
    leaves: Dict[int, int] = {}
    for i, t in enumerate(inputs):
        if t.grad_fn is not None:
            wanted[t.grad_fn] = i
        else:
            leaves[id(t)] = i
    seen: Set[Any] = {t.grad_fn for t in stops if t.grad_fn is not None}
    found = [False] * len(inputs)
    todo: List[Any] = [output.grad_fn] if output.grad_fn is not None else []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in wanted:
            found[wanted[node]] = True
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None and id(variable) in leaves:
            found[leaves[id(variable)]] = True
        todo.extend(n for n, _ in node.next_functions)
    return found


def dynamo_frames() -> int:
    """How many frames dynamo has tried to convert in this process (0 without dynamo)."""
    utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(utils, "counters", None)
    try:
        return int(counters["frames"]["total"]) if counters is not None else 0
    except (KeyError, TypeError):  # pragma: no cover - depends on the torch version
        return 0



#: ``torch.utils._pytree`` under a name that ``mypy --strict`` sees as exported.
trees = pytree


# The rest of the torch internals, by kind: imported last, since they use the probes above.
from .frames import (
    UNKNOWN_CALLER as UNKNOWN_CALLER,
    _getframe as _getframe,
    caller_self as caller_self,
    calling_module as calling_module,
    run_op as run_op,
)
from .graph import (
    _node_op as _node_op,
    ops_without_double_backward as ops_without_double_backward,
)
from .texts import (
    SlowFallback as SlowFallback,
    is_captured_update_error as is_captured_update_error,
    is_compile_error as is_compile_error,
    is_nonscalar_grad_error as is_nonscalar_grad_error,
    is_random_op_error as is_random_op_error,
    is_shared_stats_error as is_shared_stats_error,
    is_vmap_error as is_vmap_error,
    slow_fallback_op as slow_fallback_op,
    slow_fallback_raises as slow_fallback_raises,
    slow_fallback_recorded as slow_fallback_recorded,
    unbatchable_op as unbatchable_op,
)
