"""Autograd graph walks: the ops in a gradient's graph that have no double backward."""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch

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
    """The aten op a ``NotImplemented`` node stands for, read from the error it raises.

    The node raises before it looks at its inputs, so any tensors of the right count do;
    torch before 2.4 has no ``_input_metadata`` and says the count in a ``TypeError``.
    """
    try:
        metas = getattr(node, "_input_metadata", None)
        if metas is not None:
            node(*(torch.zeros(m.shape, dtype=m.dtype, device=m.device) for m in metas))
        else:
            node(*[torch.zeros(())] * _arity(node))
    except RuntimeError as err:
        found = _OP_IN_TEXT.search(str(err))
        if found:
            return "aten::" + found.group(1)
    except Exception:  # pragma: no cover - depends on the torch version
        pass
    return "an op"  # pragma: no cover - depends on the torch version


_ARITY_IN_TEXT = re.compile(r"expected (\d+) arguments?")


def _arity(node: Any) -> int:
    """How many gradients ``node`` takes, from the ``TypeError`` a call with none raises."""
    try:
        node()
    except TypeError as err:
        found = _ARITY_IN_TEXT.search(str(err))
        if found:
            return int(found.group(1))
    except RuntimeError:  # it took no inputs and raised its own error: call it again with none
        return 0
    return 0  # pragma: no cover - depends on the torch version


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
