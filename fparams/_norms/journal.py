"""Running statistics: their updates, the journal that tracks them over a loop of tasks, and
the errors that explain what cannot be updated."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .._errors import FparamsValueError
from .._grads import grad_route, unbatched_under_vmap
from .._torch_compat import is_shared_stats_error

_BATCH_STATS_FIX = "map_tasks(..., batch_stats=True) / exact_norms(batch_stats=True)"


def shared_stats_error(layer: str, why: object) -> FparamsValueError:
    """A layer in train mode updates statistics shared across tasks (or captured)."""
    return FparamsValueError(
        f"a {layer} layer in train mode updates running statistics that "
        f"are shared across tasks or captured from outside a torch.func transform ({why}). "
        f"Either give every task its own buffers (pass fparams.stack_tasks(buffers, num_tasks) "
        f"as a task argument, clone them in the task function, run arch(params, x, buffers=b) "
        f"and fparams.adapt(..., buffers=b)), or normalize with batch statistics only: "
        f"{_BATCH_STATS_FIX}.",
        function="exact_norms",
    )


def one_value_error(layer: str, shape: Tuple[int, ...], per_instance: bool) -> FparamsValueError:
    """Statistics over a single value: the variance is 0 (torch raises outside vmap, vmap would not)."""
    over = "spatial position" if per_instance else "value per channel"
    more = "inputs with more than one spatial position" if per_instance else (
        "more than one example per task in each batch"
    )
    return FparamsValueError(
        f"a {layer} layer normalizes with batch statistics over 1 {over} (input of shape "
        f"{shape}): its variance is 0, so it would output its bias whatever the input, in every "
        f"strategy. Give it {more}, put the layer in eval mode (module.eval(), running "
        f"statistics), or normalize over features instead (LayerNorm, GroupNorm).",
        function="exact_norms",
    )


def cumulative_average_error() -> FparamsValueError:
    """BatchNorm(momentum=None) under vmap: its batch count is read as one Python number."""
    return FparamsValueError(
        "a BatchNorm layer with momentum=None (a cumulative average "
        "of the running statistics) reads num_batches_tracked as a Python number, which "
        "cannot differ per task under vmap. Give the layer a numeric momentum, use "
        "map_tasks(..., strategy='loop'), or normalize with batch statistics only: "
        "map_tasks(..., batch_stats=True).",
        function="exact_norms",
    )


class StatsJournal:
    """Running statistics updated in a loop over tasks: which task changed each, and its value before.

    A loop over tasks (``map_tasks``' loop) marks each task with
    :meth:`begin_task`. A running statistic that two different tasks update is
    shared across tasks, which vmap would reject: the journal then puts every
    statistic it saw back to its value before the loop and raises the error
    vmap raises. With one task nothing is shared, and a layer updates its
    statistics as a plain PyTorch call does.
    """

    def __init__(self) -> None:
        self.task: Optional[int] = None
        # data_ptr -> (tensor, value before its first update, task that updated it); the
        # journal holds the tensor, so that its memory is not reused while it is here
        self._entries: Dict[int, Tuple[Tensor, Tensor, int]] = {}

    def begin_task(self, index: int) -> None:
        """Mark the start of task ``index``."""
        self.task = index

    def guard(self, running: Tensor, layer: str) -> None:
        """Called before a running statistic (or BatchNorm's batch count) changes."""
        if unbatched_under_vmap(running):
            raise shared_stats_error(layer, "a tensor without a task dimension, updated under vmap")
        if self.task is None or grad_route() != "autograd":
            return  # under a transform, torch itself rejects updates of captured tensors
        key = running.data_ptr()
        seen = self._entries.get(key)
        if seen is None:
            self._entries[key] = (running, running.detach().clone(), self.task)
        elif seen[2] != self.task:
            self.roll_back()
            raise shared_stats_error(layer, f"one tensor updated by task {seen[2]} and task {self.task}")

    def update(self, running: Tensor, value: Tensor, momentum: float, layer: str) -> None:
        """``running <- (1 - momentum) running + momentum value``, guarded, in place."""
        self.guard(running, layer)
        try:
            with torch.no_grad():
                running.mul_(1.0 - momentum).add_(value.detach(), alpha=momentum)
        except RuntimeError as err:
            if not is_shared_stats_error(err):
                raise
            raise shared_stats_error(layer, err) from None  # the message quotes torch's

    def roll_back(self) -> None:
        """Put every statistic seen back to its value before the loop."""
        with torch.no_grad():
            for tensor, before, _ in self._entries.values():
                tensor.copy_(before)
        self._entries.clear()

    def close(self) -> None:
        """The loop is over: forget everything."""
        self._entries.clear()
        self.task = None
