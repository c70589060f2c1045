"""Which strategy runs a batch of tasks: one :func:`plan` for ``map_tasks`` and ``meta_value_and_grad``.

What ``"auto"`` learns about a function (vmap cannot run one of its ops, so
the loop runs it from then on) is kept in an :class:`AutoMemory` that belongs
to the callable ``map_tasks`` / ``meta_value_and_grad`` returned, never in a
module-level table: a new callable starts afresh, and ``reset()`` forgets.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Mapping, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor

from .._checks import check_callable, check_choice, check_flag, check_int
from .._errors import FparamsValueError
from .._torch_compat import is_compiling, tree_leaves
from .batching import task_numel

#: How the tasks run: one vmap, a Python loop, vmap over chunks, or chosen per call.
Strategy = Literal["auto", "vmap", "loop", "chunked"]
#: The strategy a call runs (``"auto"`` resolved).
Chosen = Literal["vmap", "loop", "chunked"]
#: vmap's ``randomness`` for random ops.
Randomness = Literal["error", "different", "same"]

STRATEGIES: Tuple[str, ...] = ("auto", "vmap", "loop", "chunked")
RANDOMNESS: Tuple[str, ...] = ("error", "different", "same")

#: ``"auto"`` loops over tasks whose largest tensor argument has at least this
#: many elements (see :func:`choose_strategy`).
LOOP_FROM_NUMEL = 1 << 14

#: ``"auto"`` also loops where the params hold at least this many elements (a
#: ResNet-12 of width 32 or a ConvNeXt): every op of such a model is
#: compute-bound, and vmap's batching rules for per-task weights (grouped
#: convolutions and their double backward) cost more than the loop's plain ops
#: (``benchmarks/bench_convnext.py``: ConvNeXt with 2M params, vmap 2.2x the
#: loop; 7.9M, 3.2x; ResNet-12 with 0.78M, 0.96x; 3.1M, 1.28x).
LOOP_FROM_PARAMS = 1 << 20

#: Parameter names of layers that vmap cannot run (torch 2.13): the recurrent
#: layers' fused kernels (``aten::gru.input``, ``lstm``, ``rnn_tanh``) and
#: ``torch.nn.utils.spectral_norm``, whose power iteration writes in place
#: (``aten::div.out``). ``"auto"`` loops over such functions from the start.
UNBATCHABLE_PARAM = re.compile(r"(^|\.)(weight_(ih|hh)_l\d+(_reverse)?|weight_orig)$")


class Options(NamedTuple):
    """The options of ``map_tasks`` / ``meta_value_and_grad``, checked once when the callable is built."""

    strategy: Strategy = "auto"
    chunk_size: Optional[int] = None
    randomness: Randomness = "error"
    batch_stats: bool = False
    has_aux: bool = False


def check_options(fn: object, options: Options) -> None:
    """Every option of ``options`` (and ``fn``) checked, with fparams' messages."""
    check_callable("fn", fn, "fn(params, *task)")
    check_choice("strategy", options.strategy, STRATEGIES)
    check_choice("randomness", options.randomness, RANDOMNESS)
    check_int("chunk_size", options.chunk_size, 1, none_ok=True)
    check_flag("batch_stats", options.batch_stats)
    check_flag("has_aux", options.has_aux)
    if options.strategy == "chunked" and options.chunk_size is None:
        raise FparamsValueError("strategy='chunked' needs `chunk_size` (tasks per vmap call).")
    if options.strategy in ("vmap", "loop") and options.chunk_size is not None:
        raise FparamsValueError(
            f"`chunk_size` only applies to strategy='chunked' or 'auto'; got "
            f"strategy={options.strategy!r} with chunk_size={options.chunk_size}."
        )


class AutoMemory:
    """What ``"auto"`` learned about one mapped function (held by the callable that maps it).

    ``demoted`` is why vmap cannot run the function (the op), once it failed
    on a known vmap limitation or would have run torch's slow per-example
    fallback: ``"auto"`` then takes the loop. ``ran`` says vmap ran the
    function once (later failures are checked for in-place changes instead of
    copying every input first). ``name`` is the public function that owns it,
    for its warnings, and ``fn_name`` the mapped function's.
    """

    def __init__(self, name: str, fn: object) -> None:
        self.name = name
        self.fn_name: str = getattr(fn, "__name__", type(fn).__name__)
        self.demoted: Optional[str] = None
        self.ran = False

    def reset(self) -> None:
        """Forget what was learned: the next call plans from the shapes again."""
        self.demoted = None
        self.ran = False


def choose_strategy(num_tasks: int, task_numel: int = 0, param_numel: int = 0) -> Chosen:
    """The ``"auto"`` strategy from the shapes: vmap for many small tasks, a loop otherwise.

    ``task_numel`` is the element count of one task's largest tensor
    argument and ``param_numel`` the params' (0 when unknown). The loop is
    chosen for a single task, when ``task_numel >= LOOP_FROM_NUMEL`` (16384,
    e.g. 20 images of 28x28), and when ``param_numel >= LOOP_FROM_PARAMS``
    (about a million): such tasks are compute-bound, so vmap has no per-op
    overhead left to save, while its batching rules for per-task weights
    (grouped convolutions and their double backward) cost more than the plain
    ops the loop runs. The thresholds come from ``benchmarks/bench_tasks.py``
    and ``benchmarks/bench_convnext.py`` (docs/guides/performance.md).

    Examples:
        >>> from fparams._tasks.plan import choose_strategy
        >>> choose_strategy(25, 10), choose_strategy(1), choose_strategy(4, 1 << 20)
        ('vmap', 'loop', 'loop')
        >>> choose_strategy(4, 3840, param_numel=2_000_000)  # a ConvNeXt on 16x16 images
        'loop'
    """
    if num_tasks == 1 or task_numel >= LOOP_FROM_NUMEL or param_numel >= LOOP_FROM_PARAMS:
        return "loop"
    return "vmap"


def param_numel(params: Any) -> int:
    """The element count of every tensor in ``params`` (shapes only, no tensor op)."""
    return sum(t.numel() for t in tree_leaves(params) if isinstance(t, Tensor))


def unbatchable_param(params: Any) -> Optional[str]:
    """The first parameter name of a layer vmap cannot run (see ``UNBATCHABLE_PARAM``), or None."""
    if isinstance(params, Mapping):
        for name in params:
            if isinstance(name, str) and UNBATCHABLE_PARAM.search(name):
                return name
    return None


def plan(options: Options, batches: Sequence[Any], n: int, params: Any, memory: AutoMemory) -> Chosen:
    """The strategy one call runs, the one place it is decided.

    An explicit strategy runs as given. ``"auto"``: ``"chunked"`` where a
    ``chunk_size`` was given, else :func:`choose_strategy` from the shapes of the tasks and params
    (with ``randomness`` other than ``"error"`` only a single task loops, so
    that random draws stay vmap's); then the loop where vmap cannot run the
    function: a recurrent layer or ``spectral_norm`` among the params, or an
    op this callable already met (``memory``). Under ``torch.compile`` only
    the shapes decide (the compiled step keeps the plain rules).
    """
    if options.strategy != "auto":
        return options.strategy
    if options.chunk_size is not None:
        chosen: Chosen = "chunked"
    else:
        sized = options.randomness == "error"  # else only a single task loops (vmap's draws)
        chosen = choose_strategy(n, task_numel(batches) if sized else 0, param_numel(params) if sized else 0)
    if chosen == "loop" or is_compiling():
        return chosen
    if memory.demoted is not None or unbatchable_param(params) is not None:
        return "loop"
    return chosen


def vmap_sizes(chosen: Chosen, n: int, chunk_size: Optional[int]) -> Tuple[int, ...]:
    """The batch sizes of the vmap calls that run ``n`` tasks (all at once, or in chunks)."""
    if chosen == "chunked" and chunk_size is not None:
        return (min(chunk_size, n), n % chunk_size) if n % chunk_size else (min(chunk_size, n),)
    return (n,)
