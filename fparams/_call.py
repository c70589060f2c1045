"""Run an architecture on explicit state: ``split`` and :class:`Architecture`."""

from __future__ import annotations

from typing import Any, FrozenSet, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ._state import _refresh_rnn, rebuild, state_dicts
from ._types import Buffers, Params, TensorDict


def _key_error(where: str, arg: str, given: Mapping[str, Any], expected: FrozenSet[str]) -> ValueError:
    missing = sorted(expected - given.keys())
    unexpected = sorted(given.keys() - expected)
    parts = []
    if missing:
        parts.append("Missing key(s): " + ", ".join(repr(k) for k in missing) + ".")
    if unexpected:
        parts.append("Unexpected key(s): " + ", ".join(repr(k) for k in unexpected) + ".")
    return ValueError(
        f"{where}: `{arg}` does not match the module. {' '.join(parts)} Pass every "
        f"name from fparams.split(module) (fparams.combine(adapted, rest) joins a "
        f"partition back together)."
    )


class Architecture:
    """A module used only as a function of explicit parameters and buffers.

    ``arch(params, *args, buffers=None, **kwargs)`` runs the module's
    ``forward`` through ``torch.func.functional_call``; ``buffers=None`` uses
    the module's own buffers. Keys are checked strictly: every parameter name
    must be given, and no other. The module itself is never changed by a call
    (buffers a layer updates in place, such as BatchNorm's running statistics,
    are the tensors passed in ``buffers``).

    Example:
        >>> import torch, fparams
        >>> arch, params, buffers = fparams.split(torch.nn.Linear(3, 1))
        >>> arch(params, torch.ones(2, 3)).shape
        torch.Size([2, 1])
    """

    __slots__ = ("module", "param_names", "buffer_names", "_rnns")

    def __init__(self, module: nn.Module, param_names: FrozenSet[str], buffer_names: FrozenSet[str]):
        self.module = module
        self.param_names = param_names
        self.buffer_names = buffer_names
        self._rnns = tuple(m for m in module.modules() if isinstance(m, nn.RNNBase))

    def __repr__(self) -> str:
        return f"Architecture({self.module!r})"

    def check(self, params: TensorDict, buffers: Optional[TensorDict] = None) -> None:
        """Raise ``ValueError`` unless the dicts have exactly this module's names."""
        if params.keys() != self.param_names:
            raise _key_error("Architecture.__call__", "params", params, self.param_names)
        if buffers is not None and buffers.keys() != self.buffer_names:
            raise _key_error("Architecture.__call__", "buffers", buffers, self.buffer_names)

    def __call__(
        self, params: TensorDict, *args: Any, buffers: Optional[TensorDict] = None, **kwargs: Any
    ) -> Any:
        self.check(params, buffers)
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
                _refresh_rnn(rnn)

    def bind(self, params: TensorDict, buffers: Optional[TensorDict] = None) -> nn.Module:
        """A structural copy of the module tree holding these tensors.

        The copy shares everything but its tensor slots with the original; tied
        slots stay tied. ``buffers=None`` keeps the module's own buffers.

        Example:
            >>> import torch, fparams
            >>> arch, params, _ = fparams.split(torch.nn.Linear(3, 1))
            >>> net = arch.bind(fparams.clone(params))
            >>> net.weight is params["weight"]
            False
        """
        self.check(params, buffers)

        def param(name: str, t: Tensor) -> Tensor:
            return params[name]

        def buffer(name: str, t: Tensor) -> Tensor:
            return t if buffers is None else buffers[name]

        return rebuild(self.module, param, buffer)


def split(module: nn.Module) -> Tuple[Architecture, Params, Buffers]:
    """Split ``module`` into an architecture and its parameter and buffer dicts.

    The dicts hold the module's own tensors (not copies), keyed by the names
    ``named_parameters()`` / ``named_buffers()`` give; a tied tensor appears
    once. Gradients taken through them land on the module's Parameters.

    Example:
        >>> import torch, fparams
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> arch, params, buffers = fparams.split(net)
        >>> sorted(params), sorted(buffers)[:1]
        (['0.bias', '0.weight', '1.bias', '1.weight'], ['1.num_batches_tracked'])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fparams.split: `module` must be a torch.nn.Module; got {type(module).__name__}.")
    params, buffers = state_dicts(module)
    return Architecture(module, frozenset(params), frozenset(buffers)), params, buffers
