"""Optimizer states load with a plain ``torch.load`` (its default ``weights_only=True``).

Every state class of fparams.optim is a NamedTuple of dicts of tensors; they
are added to torch's allow-list of safe globals once, at import. A state holds
nothing else (no callables), so allowing these classes lets no code run.
"""

from __future__ import annotations

from typing import Any, List

import torch

from . import _alias, _alias_torch, _base, _groups, _moments, _scalers


def state_classes() -> List[Any]:
    """Every NamedTuple state class defined in fparams.optim."""
    found = []
    for module in (_base, _moments, _alias, _scalers, _alias_torch, _groups):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, tuple) and hasattr(value, "_fields"):
                if value.__module__ == module.__name__:
                    found.append(value)
    return found


def allow_states_in_torch_load() -> None:
    """Add the state classes to ``torch.serialization``'s safe globals (torch >= 2.4)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add([c for c in state_classes() if c is not _base.GradientTransformation])
