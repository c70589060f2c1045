"""Run a per-task function over a batch of tasks: vmap, a loop, or vmap in chunks.

One file per job: ``batching`` (task arguments and outputs, ``stack_tasks``,
``pad_tasks``), ``plan`` (the one place the strategy is chosen, and what
``"auto"`` learned, kept on the callable), ``fallback`` (vmap's known limits,
``"auto"``'s move to the loop), ``map`` (``map_tasks``), ``meta_grad``
(``meta_value_and_grad``) and ``compiled`` (its ``compile=True`` step).
"""

from .batching import pad_tasks, stack_tasks
from .fallback import VmapFallbackWarning
from .map import MappedTasks, map_tasks
from .meta_grad import MetaStep, meta_value_and_grad
from .plan import (
    LOOP_FROM_NUMEL,
    LOOP_FROM_PARAMS,
    UNBATCHABLE_PARAM,
    Randomness,
    Strategy,
    choose_strategy,
    plan,
)

__all__ = [
    "LOOP_FROM_NUMEL",
    "LOOP_FROM_PARAMS",
    "UNBATCHABLE_PARAM",
    "MappedTasks",
    "MetaStep",
    "Randomness",
    "Strategy",
    "VmapFallbackWarning",
    "choose_strategy",
    "map_tasks",
    "meta_value_and_grad",
    "pad_tasks",
    "plan",
    "stack_tasks",
]
