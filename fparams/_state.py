"""Split a module into its tensors, and write tensors back into a module tree.

This is the only layer that knows how an ``nn.Module`` stores its state
(``_parameters``, ``_buffers``, ``_modules``). Everything above it works on
plain dicts.

Two traversals live here, and both visit modules and tensors in exactly the
order of ``named_modules()`` / ``named_parameters()``, so the first name a
tensor is reached under is the name it has in the dicts:

* :func:`rebuild` makes a structural copy of the tree (each module shallow
  copied once, shared submodules stay shared) and fills every tensor slot with
  a replacement;
* :func:`rewrite` fills the slots of the existing tree in place.

Both call the replacement function once per tensor *object*, so tied tensors
stay tied, and both refresh the flat-weight lists of RNN modules
(``_torch_compat.refresh_rnn``). ``_torch_compat`` checks once, at import,
that ``nn.Module`` keeps its state in these slot dicts.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor, nn

from ._torch_compat import check_module_slots, refresh_rnn
from ._types import Buffers, Params

#: ``fn(name, tensor) -> tensor``: the replacement for one tensor slot.
Replace = Callable[[str, Tensor], Tensor]
#: Tensors already replaced: ``id(original) -> (original, replacement)``. The
#: original is kept so that an id can never be recycled while the memo lives.
TensorMemo = Dict[int, Tuple[Tensor, Tensor]]
#: The modules of a tree in ``named_modules()`` order, each once, with the
#: prefix its tensors' names start with (``""`` for the root, else ``"a.b."``).
Tree = List[Tuple[str, nn.Module]]


def state_dicts(module: nn.Module) -> Tuple[Params, Buffers]:
    """The module's own parameter and buffer tensors, keyed by dotted name.

    A tensor reachable under several names (tied weights) appears once, under
    the first name ``named_parameters()`` gives it.
    """
    return dict(module.named_parameters()), dict(module.named_buffers())


def tree(module: nn.Module) -> Tree:
    """``named_modules()`` as a list, with prefixes ready to prepend to a slot name.

    Walked once and shared by the checks and the write-back of a shim, instead
    of once by each (``named_parameters()`` walks the modules again).
    """
    return [(prefix + "." if prefix else "", m) for prefix, m in module.named_modules()]


def unique_params(modules: Tree) -> List[Tensor]:
    """``list(parameters())`` of the tree that :func:`tree` walked."""
    out: List[Tensor] = []
    seen = set()
    for _, m in modules:
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _fill(
    module: nn.Module,
    prefix: str,
    params: Replace,
    buffers: Replace,
    memo: TensorMemo,
) -> None:
    # The memo lookup is written out twice, not factored into a helper: this
    # loop runs once per tensor slot on every clone and update.
    slots: Dict[str, Optional[Tensor]] = module._parameters  # type: ignore[assignment]
    for key, t in slots.items():
        if t is not None:
            hit = memo.get(id(t))
            if hit is None or hit[0] is not t:
                new = params(prefix + key, t)
                memo[id(t)] = (t, new)
            else:
                new = hit[1]
            slots[key] = new
    bslots: Dict[str, Optional[Tensor]] = module._buffers
    for key, t in bslots.items():
        if t is not None:
            hit = memo.get(id(t))
            if hit is None or hit[0] is not t:
                new = buffers(prefix + key, t)
                memo[id(t)] = (t, new)
            else:
                new = hit[1]
            bslots[key] = new
    if isinstance(module, nn.RNNBase):
        refresh_rnn(module)


def rebuild(
    module: nn.Module,
    params: Replace,
    buffers: Replace,
    memo: Optional[TensorMemo] = None,
) -> nn.Module:
    """A structural copy of ``module`` whose tensor slots hold replacements.

    Every module of the tree is shallow-copied once (its ``__dict__`` and slot
    dicts are new, everything else is shared); ``params(name, t)`` and
    ``buffers(name, t)`` give the tensor for each slot. The original tree is
    not touched.
    """
    check_module_slots()
    modules: Dict[int, nn.Module] = {}
    return _copy(module, "", params, buffers, memo if memo is not None else {}, modules)


def _copy(
    module: nn.Module,
    prefix: str,
    params: Replace,
    buffers: Replace,
    memo: TensorMemo,
    modules: Dict[int, nn.Module],
) -> nn.Module:
    seen = modules.get(id(module))
    if seen is not None:
        return seen
    new = module.__new__(type(module))
    state = module.__dict__.copy()
    state["_parameters"] = module._parameters.copy()
    state["_buffers"] = module._buffers.copy()
    state["_modules"] = children = module._modules.copy()
    # Not ``new.__dict__ = state``: that goes through Module.__setattr__, whose
    # Parameter / Module / buffer checks cost more than the rest of the copy.
    object.__setattr__(new, "__dict__", state)
    modules[id(module)] = new
    _fill(new, prefix, params, buffers, memo)
    for key, child in children.items():
        if child is not None:
            children[key] = _copy(child, prefix + key + ".", params, buffers, memo, modules)
    return new


def rewrite(
    module: nn.Module,
    params: Replace,
    buffers: Replace,
    memo: Optional[TensorMemo] = None,
    modules: Optional[Tree] = None,
) -> None:
    """Replace the tensors in ``module``'s own slots, in place.

    This is the one place fparams changes a module; only the learn2learn
    shims (``update_module``, ``detach_module``) call it. ``modules`` is
    ``tree(module)`` when the caller has already walked it.
    """
    check_module_slots()
    memo = memo if memo is not None else {}
    for prefix, m in modules if modules is not None else tree(module):
        _fill(m, prefix, params, buffers, memo)
