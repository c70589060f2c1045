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
import re  # --- tasks ---
import sys
import warnings  # --- tasks ---
import weakref
from collections.abc import Iterable
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


# --- implicit ---
# torch.func's pytree functions, named here so that callers type-check (mypy --strict)
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_leaves = pytree.tree_leaves

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
# --- tasks ---
# fparams._tasks: which vmap errors and warnings are vmap's own limits (the
# loop runs what they stop), autograd's version counters and a graph walk.
# Where torch rewords a message, its error surfaces unexplained and ``"auto"``
# does not demote (never a wrong answer, at worst a lost speed-up).


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
