"""Type aliases shared by every layer of fparams.

A module's state is two flat dicts keyed by the dotted names that
``named_parameters()`` and ``named_buffers()`` give. Every pure function in
fparams takes and returns such dicts.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Mapping, Union

from torch import Tensor

#: Parameters of a module, keyed by dotted name (``"0.weight"``).
Params = Dict[str, Tensor]
#: Buffers of a module (running statistics ...), keyed by dotted name.
Buffers = Dict[str, Tensor]
#: Per-parameter additive updates, keyed like the params they update.
Updates = Dict[str, Tensor]
#: Per-parameter gradients, keyed like the params they belong to.
Grads = Dict[str, Tensor]
#: Read-only view of any of the above.
TensorDict = Mapping[str, Tensor]

#: A learning rate: a number, a scalar (or broadcastable) tensor, or one
#: tensor per parameter name (Meta-SGD).
LR = Union[float, Tensor, Mapping[str, Tensor]]

#: Which entries of a dict a transform applies to. One of
#:
#: * a ``str``: a glob pattern over dotted names (``"head.*"``); an exact name
#:   is a glob that matches only itself;
#: * a compiled regular expression, matched with ``re.search``;
#: * an iterable of such strings or patterns (any may match);
#: * a predicate ``fn(name, tensor) -> bool``.
Filter = Union[
    str,
    "re.Pattern[str]",
    Iterable[Union[str, "re.Pattern[str]"]],
    Callable[[str, Tensor], bool],
]
