"""``meta_value_and_grad(..., compile=True)``: the step through ``fparams.compile``.

vmap: the whole step is one graph. The loop: one task's step is compiled once
and called per task (the same shapes, so one graph); the mean of the per-task
gradients is the gradient of the mean loss. Compiling the unrolled loop
instead would make one graph per task, each compiled anew
(``benchmarks/bench_tasks.py`` measures the compile times).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .._compile import compile_fallback
from .._errors import public
from .._norms import exact_norms
from .._torch_compat import is_compiling, tree_utils as pytree
from .batching import check_task_list, num_tasks, one_task_batch, per_task_losses, stack_outputs, task
from .map import check_call
from .plan import AutoMemory, Options, Strategy, plan


class EagerStep(Protocol):
    """What the compiled step needs of the eager one (:class:`~fparams._tasks.meta_grad.MetaStep`)."""

    task_fn: Callable[..., Any]
    options: Options
    memory: AutoMemory

    def compute(self, params: Any, task_batches: Sequence[Any], tasks: Optional[Sequence[Any]]) -> Any: ...


class CompiledStep:
    """The step of ``meta_value_and_grad(..., compile=True)``; ``demoted`` and ``reset()`` as without."""

    def __init__(self, eager: EagerStep) -> None:
        self.eager = eager
        self.whole = compile_fallback(self._whole)
        self.per_task = compile_fallback(self._one_task)

    @property
    def strategy(self) -> Strategy:
        """The strategy asked for."""
        return self.eager.options.strategy

    @property
    def demoted(self) -> Optional[str]:
        """Why ``"auto"`` runs this function with the loop from now on (the op), or None."""
        return self.eager.memory.demoted

    def reset(self) -> None:
        """Forget what ``"auto"`` learned."""
        self.eager.memory.reset()

    def _whole(self, params: Any, *task_batches: Any) -> Any:
        return self.eager.compute(params, task_batches, None)

    def _one_task(self, params: Any, *one: Any) -> Any:
        has_aux = self.eager.options.has_aux
        if not is_compiling():  # compile_fallback's eager call: plain autograd, as without compile
            batches = [pytree.tree_map(one_task_batch, x) for x in one]
            value, grads = self.eager.compute(params, batches, None)
            return ((value[0], pytree.tree_map(lambda t: t[0], value[1])) if has_aux else value), grads
        grads, value = torch.func.grad_and_value(self._loss, has_aux=has_aux)(params, *one)
        return value, grads

    def _loss(self, p: Any, *one: Any) -> Any:
        options = self.eager.options
        with exact_norms(options.batch_stats):
            out = self.eager.task_fn(p, *one)
        value = out[0] if options.has_aux else out
        if not isinstance(value, Tensor) or value.dim() != 0:  # the message of the batched step
            per_task_losses(value.unsqueeze(0) if isinstance(value, Tensor) else value)
        return out

    @public("meta_value_and_grad")
    def __call__(self, *args: Any, tasks: Optional[Sequence[Any]] = None, **kwargs: Any) -> Any:
        check_call(args, kwargs, "meta_value_and_grad")
        params, task_batches = args[0], args[1:]
        options = self.eager.options
        if tasks is not None:  # one tuple of arguments per task: the loop, a graph per shape
            check_task_list(task_batches, tasks, options.strategy)
            values, grads = zip(*(self.per_task(params, *one) for one in tasks))
        else:
            n = num_tasks(task_batches)
            if plan(options, task_batches, n, params, self.eager.memory) != "loop":
                return self.whole(params, *task_batches)
            values, grads = zip(*(self.per_task(params, *task(task_batches, i)) for i in range(n)))
        mean_grads = pytree.tree_map(lambda *g: torch.stack(g).mean(0), *grads)
        if options.has_aux:
            losses, aux = zip(*values)
            return (torch.stack(losses).mean(), stack_outputs(list(aux))), mean_grads
        return torch.stack(values).mean(), mean_grads
