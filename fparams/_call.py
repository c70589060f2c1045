"""Run an architecture on explicit state: ``split`` and :class:`Architecture`.

Threads: a call puts the given tensors into the module's own slots for the
length of its forward. Calls on one module from several threads take turns
(one lock per module, shared by every :class:`Architecture` over it), so no
call ever sees another's tensors; calls on different modules run side by side.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, NamedTuple, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from ._checks import check_dict, check_instance, check_tensors, key_mismatch
from ._errors import FparamsError, FparamsValueError, public, user_frames
from ._state import rebuild, state_dicts
from ._torch_compat import check_module_slots, is_compiling, refresh_rnn, version
from ._types import Buffers, Params, TensorDict

#: One lock per module, shared by every Architecture over it (a module split twice).
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _module_lock(module: nn.Module) -> threading.RLock:
    """The lock that calls through any Architecture of ``module`` hold while they swap its slots."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


_FULL_TRACEBACKS = bool(os.environ.get("FPARAMS_FULL_TRACEBACKS"))

class BufferRead(NamedTuple):
    """A module buffer that a call read from its module: the tensor, its name, version and value then."""

    tensor: Tensor
    name: str
    version: int
    value: Tensor


class ReadLog:
    """What the calls within :func:`module_reads` read: module buffers and the tensors computed with.

    ``buffers``: every buffer an :class:`Architecture` call took from its
    module (``buffers=None``), by ``id``, with its version and value at the
    first read. ``used``: ids of tensors that fparams' own layers computed
    with (:func:`note_used`, e.g. the running statistics an eval-mode
    BatchNorm normalizes with under vmap).
    """

    __slots__ = ("buffers", "used")

    def __init__(self) -> None:
        self.buffers: Dict[int, BufferRead] = {}
        self.used: Set[int] = set()


#: Per thread: the active :class:`ReadLog`, if any.
_READS = threading.local()


@contextmanager
def module_reads() -> Iterator[ReadLog]:
    """Within: every :class:`Architecture` call that uses its module's own buffers notes them.

    A checkpointed step (``adapt(checkpoint=True)``) needs them to recompute
    exactly: a buffer the step updated in place (a train-mode BatchNorm's
    running statistics) is set back to its value at the first read for the
    recomputation and restored afterwards, so it is neither read wrong nor
    updated twice; a buffer the step computed with and did not update (an
    eval-mode BatchNorm's) is watched like the step's inputs.
    """
    outer = getattr(_READS, "log", None)
    log = ReadLog()
    _READS.log = log
    try:
        yield log
    finally:
        _READS.log = outer
        if outer is not None:
            for key, read in log.buffers.items():
                outer.buffers.setdefault(key, read)
            outer.used |= log.used


def note_used(*tensors: Optional[Tensor]) -> None:
    """Within :func:`module_reads`: the step computed with these tensors (a no-op elsewhere)."""
    log = getattr(_READS, "log", None)
    if log is not None:
        log.used.update(id(t) for t in tensors if t is not None)


def _note_module_buffers(module: nn.Module, names: FrozenSet[str], log: ReadLog) -> None:
    for name, t in module.named_buffers():
        if name in names and id(t) not in log.buffers:
            log.buffers[id(t)] = BufferRead(t, name, version(t), t.detach().clone())


def _named(err: FparamsError) -> FparamsError:
    """What :func:`fparams._errors.public` does to an error leaving ``Architecture.__call__``."""
    if err.function is None:
        err.function = "Architecture"
    return err if _FULL_TRACEBACKS else err.with_traceback(user_frames(err.__traceback__))


def _key_error(arg: str, given: Mapping[str, Any], expected: FrozenSet[str]) -> FparamsValueError:
    return FparamsValueError(
        f"`{arg}` does not match the module. {key_mismatch(given, dict.fromkeys(expected))} "
        f"Pass every name from fparams.split(module) (fparams.combine(adapted, rest) joins a "
        f"partition back together)."
    )


def _check_values(params: TensorDict, buffers: Optional[TensorDict]) -> None:
    """Every param a floating-point tensor, every buffer a tensor."""
    check_tensors("params", params, floating=True)
    if buffers is not None:
        check_tensors("buffers", buffers)


def _check_shapes(module: nn.Module, params: TensorDict) -> None:
    """Run once a call has failed: a param whose shape differs from the module's own is named."""
    own = dict(module.named_parameters())
    for k, t in params.items():
        if k in own and t.shape != own[k].shape:
            raise FparamsValueError(
                f"`params[{k!r}]` has shape {tuple(t.shape)} but the module's parameter has shape "
                f"{tuple(own[k].shape)}, and the call failed (torch's error is chained above). Give "
                f"each parameter its module's shape."
            )


class Architecture:
    """A module used only as a function of explicit parameters and buffers.

    ``arch(params, *args, buffers=None, **kwargs)`` runs the module's
    ``forward`` as ``torch.func.functional_call`` does (a faster equivalent:
    the tensors go straight into the slots of the tree, resolved once, and
    back out afterwards); ``buffers=None`` uses the module's own buffers.
    Keys are checked strictly: every parameter name must be given, and no
    other. The module itself is never changed by a call
    (buffers a layer updates in place, such as BatchNorm's running statistics,
    are the tensors passed in ``buffers``).

    Examples:
        >>> import torch, fparams
        >>> arch, params, buffers = fparams.split(torch.nn.Linear(3, 1))
        >>> arch(params, torch.ones(2, 3)).shape
        torch.Size([2, 1])
    """

    __slots__ = ("module", "param_names", "buffer_names", "_rnns", "_slots", "_lock")

    def __init__(self, module: nn.Module, param_names: FrozenSet[str], buffer_names: FrozenSet[str]):
        self.module = module
        self.param_names = param_names
        self.buffer_names = buffer_names
        self._rnns = tuple(m for m in module.modules() if isinstance(m, nn.RNNBase))
        self._slots: Optional[Tuple[_Slot, ...]] = None
        self._lock = _module_lock(module)

    def __repr__(self) -> str:
        return f"Architecture({self.module!r})"

    def __getstate__(self) -> Dict[str, Any]:  # the lock is the module's, not saved
        return {k: getattr(self, k) for k in ("module", "param_names", "buffer_names", "_rnns")}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        self._slots = None
        self._lock = _module_lock(self.module)

    @public("Architecture.check")
    def check(self, params: TensorDict, buffers: Optional[TensorDict] = None) -> None:
        """Raise ``ValueError`` unless the dicts have exactly this module's names."""
        if not self._keys_match(params, buffers):
            self._mismatch(params, buffers)

    def _keys_match(self, params: object, buffers: object) -> bool:
        try:
            return params.keys() == self.param_names and (  # type: ignore[attr-defined]
                buffers is None or buffers.keys() == self.buffer_names  # type: ignore[attr-defined]
            )
        except AttributeError:  # not a dict
            return False

    def _mismatch(self, params: object, buffers: object) -> None:
        check_dict("params", params)
        assert isinstance(params, Mapping)  # for mypy
        if params.keys() != self.param_names:
            raise _key_error("params", params, self.param_names)
        if buffers is not None:
            check_dict("buffers", buffers)
            assert isinstance(buffers, Mapping)  # for mypy
            raise _key_error("buffers", buffers, self.buffer_names)

    def __call__(
        self, params: TensorDict, *args: Any, buffers: Optional[TensorDict] = None, **kwargs: Any
    ) -> Any:
        # Not decorated with @public: this is the hot path, so the error is
        # named here, in the except clauses, which cost nothing until they run.
        __tracebackhide__ = True  # noqa: F841 - pytest and IPython hide this frame too
        try:
            if not self._keys_match(params, buffers):
                self._mismatch(params, buffers)
            compiling = is_compiling()
            if compiling:  # a lock would break the graph; compiled code is traced, not raced
                return self._call(params, buffers, args, kwargs, compiling)
            if buffers is None and self.buffer_names:
                log = getattr(_READS, "log", None)
                if log is not None:
                    _note_module_buffers(self.module, self.buffer_names, log)
            with self._lock:
                return self._call(params, buffers, args, kwargs, compiling)
        except FparamsError as err:
            raise _named(err)  # noqa: B904 - the same error
        except Exception:
            try:  # bad values get fparams' error; else torch's (or the user's) stands
                _check_values(params, buffers)
                _check_shapes(self.module, params)
            except FparamsError as err:
                raise _named(err)  # noqa: B904 - chained to the original by Python
            raise

    def _call(
        self,
        params: TensorDict,
        buffers: Optional[TensorDict],
        args: Tuple[Any, ...],
        kwargs: Any,
        compiling: bool,
    ) -> Any:
        if not self._rnns and not compiling:
            if self._slots is None:
                self._slots = _tensor_slots(self.module, self.param_names, self.buffer_names)
            if self._slots:
                swaps = _resolve(self.module, self._slots, params, buffers)
                if swaps is not None:
                    return _swap_call(self.module, swaps, args, kwargs)
        state = dict(params) if buffers is None else {**params, **buffers}
        if not self._rnns:
            return torch.func.functional_call(self.module, state, args, kwargs)
        try:
            return torch.func.functional_call(self.module, state, args, kwargs)
        finally:
            # functional_call leaves an RNN's flat-weight list holding the
            # tensors of this call (and their graph) until the module's next
            # forward; point it back at the module's own weights.
            for rnn in self._rnns:
                refresh_rnn(rnn)

    @public("Architecture.bind")
    def bind(self, params: TensorDict, buffers: Optional[TensorDict] = None) -> nn.Module:
        """A structural copy of the module tree holding these tensors.

        The copy shares everything but its tensor slots with the original; tied
        slots stay tied. ``buffers=None`` keeps the module's own buffers.

        Examples:
            >>> import torch, fparams
            >>> arch, params, _ = fparams.split(torch.nn.Linear(3, 1))
            >>> net = arch.bind(fparams.clone(params))
            >>> net.weight is params["weight"]
            False
        """
        if not self._keys_match(params, buffers):
            self._mismatch(params, buffers)
        _check_values(params, buffers)

        def param(name: str, t: Tensor) -> Tensor:
            return params[name]

        def buffer(name: str, t: Tensor) -> Tensor:
            return t if buffers is None else buffers[name]

        return rebuild(self.module, param, buffer)


class _Slot(NamedTuple):
    """Where one tensor of the dicts lives in the module tree (tied tensors have several)."""

    path: Tuple[str, ...]  # submodule names from the root
    is_param: bool  # in ``_parameters`` (else ``_buffers``)
    attr: str
    key: str  # its key in the params / buffers dict


def _tensor_slots(
    module: nn.Module, param_names: FrozenSet[str], buffer_names: FrozenSet[str]
) -> Tuple[_Slot, ...]:
    """Every parameter and buffer slot of ``module``, with the dict key its tensor has.

    Empty (use ``torch.func.functional_call``) for trees it does not cover: a
    TorchScript or DataParallel module, or a tensor that is both a parameter
    and a buffer.
    """
    if isinstance(module, (torch.jit.ScriptModule, nn.DataParallel)):
        return ()
    first: Dict[int, Tuple[bool, str]] = {}
    slots = []
    for is_param, named in (
        (True, module.named_parameters(remove_duplicate=False)),
        (False, module.named_buffers(remove_duplicate=False)),
    ):
        for name, t in named:
            kind, key = first.setdefault(id(t), (is_param, name))
            if kind != is_param or key not in (param_names if is_param else buffer_names):
                return ()
            *path, attr = name.split(".")
            slots.append(_Slot(tuple(path), is_param, attr, key))
    return tuple(slots)


def _resolve(
    module: nn.Module, slots: Tuple[_Slot, ...], params: TensorDict, buffers: Optional[TensorDict]
) -> Optional[List[Tuple[Dict[str, Any], str, Tensor]]]:
    """``(slot dict, name, new tensor)`` for each slot to fill; None if the tree has changed shape."""
    swaps = []
    for s in slots:
        if s.is_param:
            new = params[s.key]
        elif buffers is None:
            continue
        else:
            new = buffers[s.key]
        m = module
        for name in s.path:
            m = m._modules.get(name)  # type: ignore[assignment]
            if m is None:
                return None
        d = m._parameters if s.is_param else m._buffers
        if d.get(s.attr) is None:
            return None
        swaps.append((d, s.attr, new))
    return swaps


def _swap_call(
    module: nn.Module, swaps: List[Tuple[Dict[str, Any], str, Tensor]], args: Tuple[Any, ...], kwargs: Any
) -> Any:
    # What torch.func.functional_call does for parameter and buffer names
    # (tied names filled alike; tensors written straight into the slot dicts,
    # the originals put back afterwards, even on error), without rebuilding
    # the tied-name map and the member accessor on every call.
    originals = [(d, name, d[name]) for d, name, _ in swaps]
    try:
        for d, name, new in swaps:
            d[name] = new
        return module(*args, **kwargs)
    finally:
        for d, name, old in reversed(originals):
            d[name] = old


@public("split")
def split(module: nn.Module) -> Tuple[Architecture, Params, Buffers]:
    """Split ``module`` into an architecture and its parameter and buffer dicts.

    The dicts hold the module's own tensors (not copies), keyed by the names
    ``named_parameters()`` / ``named_buffers()`` give; a tied tensor appears
    once. Gradients taken through them land on the module's Parameters.

    Examples:
        >>> import torch, fparams
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> arch, params, buffers = fparams.split(net)
        >>> sorted(params), sorted(buffers)[:1]
        (['0.bias', '0.weight', '1.bias', '1.weight'], ['1.num_batches_tracked'])
    """
    check_instance("module", module, nn.Module, "a torch.nn.Module")
    check_module_slots()
    params, buffers = state_dicts(module)
    return Architecture(module, frozenset(params), frozenset(buffers)), params, buffers
