"""Helpers shared by the test files."""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple

import torch
from torch import Tensor, nn


def assert_dicts_close(a: Mapping[str, Tensor], b: Mapping[str, Tensor], **tol: float) -> None:
    """Same keys, and every pair of tensors close (``torch.testing.assert_close``)."""
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


class Snap(NamedTuple):
    """What a pure function must not change about one tensor of its input."""

    tensor: Tensor
    value: Tensor
    version: int
    requires_grad: bool


def snapshot(d: Mapping[str, Tensor]) -> Dict[str, Snap]:
    """Record identity, value, ``_version`` and ``requires_grad`` of every entry."""
    return {k: Snap(t, t.detach().clone(), t._version, t.requires_grad) for k, t in d.items()}


def assert_untouched(d: Mapping[str, Tensor], snap: Mapping[str, Snap]) -> None:
    """``d`` still holds the same tensor objects, unchanged in value, version and flag."""
    assert list(d) == list(snap), (list(d), list(snap))
    for k, s in snap.items():
        assert d[k] is s.tensor, f"{k}: a different tensor object"
        assert d[k]._version == s.version, f"{k}: _version {d[k]._version} != {s.version}"
        assert d[k].requires_grad == s.requires_grad, f"{k}: requires_grad changed"
        torch.testing.assert_close(d[k].detach(), s.value, rtol=0, atol=0, equal_nan=True)


def module_snapshot(module: nn.Module) -> Dict[str, Snap]:
    """:func:`snapshot` of every parameter and buffer of ``module``, all names kept."""
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    return snapshot(state)


def assert_module_untouched(module: nn.Module, snap: Mapping[str, Snap]) -> None:
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    assert_untouched(state, snap)


def grads_of(module: nn.Module) -> Dict[str, Tensor]:
    """``.grad`` of every parameter (zeros where none was accumulated)."""
    return {
        k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for k, p in module.named_parameters()
    }


def flat_weights_follow_slots(module: nn.Module) -> List[str]:
    """Names of RNN flat weights that are not the tensors in the module's slots."""
    bad = []
    for prefix, m in module.named_modules():
        if isinstance(m, nn.RNNBase):
            for name, w in zip(m._flat_weights_names, m._flat_weights):
                if w is not m._parameters[name]:
                    bad.append(f"{prefix}.{name}" if prefix else name)
    return bad
