"""Normalization layers written with ordinary tensor ops, exact under vmap.

torch's batching rules for the native ``batch_norm`` / ``layer_norm`` kernels
give silently wrong *second-order* gradients when a parameterised layer comes
before the normalization (about 1% relative error in float64 on Linear ->
BatchNorm1d -> ReLU -> Linear with one inner step), while the same maths
written with ``mean`` / ``var`` / ``rsqrt`` is exact under vmap. The closest
upstream report is https://github.com/pytorch/functorch/issues/534 (the
batching rule of the layer_norm and batch_norm backward is incorrect for
``grad_input``), open at the time of writing. ``tests/test_norms.py`` keeps
strict xfail canaries on raw ``torch.func``: when torch fixes this, they fail
and say so.

Three parts:

* the normalization functions, plain tensor ops (``batch_norm`` ...);
* :class:`StatsJournal`, which tracks running statistics updated in a loop
  over tasks and rolls them back when two tasks share one;
* :class:`exact_norms`, a thin ``TorchFunctionMode`` that dispatches to them.

:class:`exact_norms` is a ``TorchFunctionMode`` that, while active and while
a ``vmap`` is running, routes ``F.batch_norm``, ``F.layer_norm``,
``F.group_norm``, ``F.instance_norm`` and ``F.rms_norm`` to the decompositions
below. Where no vmap runs (a loop over tasks) torch's own fused kernels are
exact and faster, so they run, with the same semantics. It changes no module
and no global function; leaving the ``with`` block restores everything.
``map_tasks`` runs under it. With ``batch_stats=True`` batch normalization always uses the
statistics of the batch at hand and leaves running statistics (and
``num_batches_tracked``) untouched.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._grads import grad_route, unbatched_under_vmap, vmap_active
from ._torch_compat import (
    BATCH_NORMS,
    caller_frame,
    current_function_mode,
    is_compiling,
    is_shared_stats_error,
    is_vmap_error,
    pop_function_mode,
)


def _affine(out: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape: List[int]) -> Tensor:
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _shared_stats_error(layer: str, err: object) -> ValueError:
    return ValueError(
        f"fparams.exact_norms: a {layer} layer in train mode updates running statistics that "
        f"are shared across tasks or captured from outside a torch.func transform ({err}). "
        f"Either give every task its own buffers (pass fparams.stack_tasks(buffers, num_tasks) "
        f"as a task argument, clone them in the task function, run arch(params, x, buffers=b) "
        f"and fparams.adapt(..., buffers=b)), or normalize with batch statistics only: "
        f"map_tasks(..., batch_stats=True) / exact_norms(batch_stats=True)."
    )


#: Called with (running tensor, layer name) before a running statistic changes.
Guard = Callable[[Tensor, str], None]


def _update_running(
    running: Tensor, value: Tensor, momentum: float, layer: str, guard: Optional[Guard] = None
) -> None:
    if guard is not None:
        guard(running, layer)
    try:
        with torch.no_grad():
            running.mul_(1.0 - momentum).add_(value.detach(), alpha=momentum)
    except RuntimeError as err:
        if not is_shared_stats_error(err):
            raise
        raise _shared_stats_error(layer, err) from None  # the message quotes torch's


def _channel_shape(x: Tensor) -> List[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    batch_stats: bool = False,
    guard: Optional[Guard] = None,
) -> Tensor:
    """``F.batch_norm`` with plain tensor ops (see the module docstring)."""
    shape = _channel_shape(input)
    if training or batch_stats or running_mean is None or running_var is None:
        dims = [0] + list(range(2, input.dim()))
        mean = input.mean(dims)
        var = input.var(dims, correction=0)
        if training and not batch_stats and running_mean is not None and running_var is not None:
            n = input.numel() // input.size(1)
            _update_running(running_mean, mean, momentum, "BatchNorm", guard)
            _update_running(running_var, var * (n / max(n - 1, 1)), momentum, "BatchNorm", guard)
    else:
        mean, var = running_mean, running_var
    out = (input - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    return _affine(out, weight, bias, shape)


def instance_norm(
    input: Tensor,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    batch_stats: bool = False,
    guard: Optional[Guard] = None,
) -> Tensor:
    """``F.instance_norm`` with plain tensor ops."""
    shape = _channel_shape(input)
    if use_input_stats or batch_stats or running_mean is None or running_var is None:
        dims = list(range(2, input.dim()))
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, correction=0, keepdim=True)
        if use_input_stats and not batch_stats and running_mean is not None and running_var is not None:
            n = input[0, 0].numel()
            flat = [input.size(0), input.size(1)]
            _update_running(running_mean, mean.reshape(flat).mean(0), momentum, "InstanceNorm", guard)
            unbiased = var.reshape(flat) * (n / max(n - 1, 1))
            _update_running(running_var, unbiased.mean(0), momentum, "InstanceNorm", guard)
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    out = (input - mean) * torch.rsqrt(var + eps)
    return _affine(out, weight, bias, shape)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` with plain tensor ops."""
    dims = list(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    var = input.var(dims, correction=0, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.group_norm`` with plain tensor ops."""
    grouped = input.reshape(input.size(0), num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    var = grouped.var(-1, correction=0, keepdim=True)
    out = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    return _affine(out, weight, bias, _channel_shape(input))


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """``F.rms_norm`` with plain tensor ops."""
    dims = list(range(-len(normalized_shape), 0))
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    out = input * torch.rsqrt(input.pow(2).mean(dims, keepdim=True) + eps)
    return out * weight if weight is not None else out


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
            raise _shared_stats_error(layer, "a tensor without a task dimension, updated under vmap")
        if self.task is None or grad_route() != "autograd":
            return  # under a transform, torch itself rejects updates of captured tensors
        key = running.data_ptr()
        seen = self._entries.get(key)
        if seen is None:
            self._entries[key] = (running, running.detach().clone(), self.task)
        elif seen[2] != self.task:
            self.roll_back()
            raise _shared_stats_error(layer, f"one tensor updated by task {seen[2]} and task {self.task}")

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


class exact_norms(TorchFunctionMode):
    """Run the normalization functionals as plain tensor ops under vmap while active.

    Why: under vmap, torch's native batch and layer normalization give wrong
    second-order gradients (closest upstream report:
    https://github.com/pytorch/functorch/issues/534); the same maths in plain
    tensor ops is exact. A thin dispatcher: normalization calls go to the plain-tensor functions
    above (under vmap) or to torch's kernels (otherwise); updates of running
    statistics pass through a :class:`StatsJournal` first.

    Args:
        batch_stats: batch and instance normalization use the statistics of
            the batch at hand and never update running statistics.
        always: decompose even where no vmap runs (torch's kernels are exact
            there; this is for checking the decompositions against them).

    Examples:
        >>> import torch, fparams
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> with fparams.exact_norms():
        ...     y = bn(torch.randn(8, 3))
        >>> torch.allclose(y.mean(0), torch.zeros(3), atol=1e-6)
        True
    """

    def __init__(self, batch_stats: bool = False, *, always: bool = False):
        super().__init__()
        self.batch_stats = batch_stats
        self.always = always
        self.journal = StatsJournal()
        self._impls: Dict[Callable[..., Any], Callable[..., Tensor]] = {
            F.batch_norm: self._batch_norm,
            F.instance_norm: self._instance_norm,
            F.layer_norm: layer_norm,
            F.group_norm: group_norm,
        }
        if hasattr(F, "rms_norm"):  # torch >= 2.4
            self._impls[F.rms_norm] = rms_norm
        # these two handle running statistics, with or without vmap
        self._stateful = (F.batch_norm, F.instance_norm)
        self._depth = 0  # nesting of ``with self`` (re-entered by :meth:`around`)
        #: Has a normalization run under this mode? A loop over tasks leaves the
        #: mode (and its per-op cost) once a task has run none.
        self.used = False

    def begin_task(self, index: int) -> None:
        """Mark the start of task ``index`` of a loop over tasks (see :class:`StatsJournal`)."""
        self.journal.begin_task(index)

    def __enter__(self) -> exact_norms:
        self._depth += 1
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        self._depth -= 1
        if self._depth == 0:  # the outermost ``with``: the loop over tasks is over
            self.journal.close()
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Leave this mode (the innermost one) for a block of ops that call no normalization.

        While a mode is active every torch call, down to ``Tensor.dim()``,
        passes through Python; ``fparams.adapt`` steps outside it for its own
        bookkeeping and re-enters it in every ``loss_fn`` call (:meth:`around`).
        """
        with pop_function_mode() as popped:
            if popped is not self:  # pragma: no cover - a caller's bug
                raise RuntimeError("fparams.exact_norms.suspended: this mode is not the innermost one")
            yield

    def around(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with this mode active during each call."""

        def call(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return call

    def _batch_norm(
        self,
        input: Tensor,
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        weight: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> Tensor:
        args = (input, (running_mean, running_var), weight, bias, training, momentum, eps)
        return self._with_stats("BatchNorm", batch_norm, F.batch_norm, *args)

    def _instance_norm(
        self,
        input: Tensor,
        running_mean: Optional[Tensor] = None,
        running_var: Optional[Tensor] = None,
        weight: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        use_input_stats: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> Tensor:
        args = (input, (running_mean, running_var), weight, bias, use_input_stats, momentum, eps)
        return self._with_stats("InstanceNorm", instance_norm, F.instance_norm, *args)

    def _with_stats(
        self,
        layer: str,
        decomposed: Callable[..., Tensor],
        kernel: Callable[..., Tensor],
        input: Tensor,
        stats: Tuple[Optional[Tensor], Optional[Tensor]],
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        use_input_stats: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        # Batch or instance normalization, which may update running statistics.
        mean, var = stats
        if self.always or vmap_active():
            return decomposed(
                input, mean, var, weight, bias, use_input_stats, momentum, eps,
                batch_stats=self.batch_stats, guard=self.journal.guard,
            )  # fmt: skip
        # No vmap: torch's own kernel is exact (and fused), with the same semantics.
        if self.batch_stats:
            return kernel(input, None, None, weight, bias, True, momentum, eps)
        if use_input_stats and mean is not None and var is not None:
            self.journal.guard(mean, layer)
            self.journal.guard(var, layer)
        return kernel(input, mean, var, weight, bias, use_input_stats, momentum, eps)

    def _count_batches(self, counter: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # BatchNorm's forward runs ``num_batches_tracked.add_(1)`` itself.
        if self.batch_stats:
            return counter
        self.journal.guard(counter, "BatchNorm")
        try:
            return counter.add_(*args, **kwargs)
        except RuntimeError as err:
            if not is_shared_stats_error(err):
                raise
            raise _shared_stats_error("BatchNorm", err) from None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        impl = self._impls.get(func)
        if impl is not None:
            self.used = True
            if func in self._stateful or self.always or vmap_active():
                return impl(*args, **(kwargs or {}))
            return run_op(func, args, kwargs or {})  # no vmap: torch's kernel is exact
        if func is Tensor.add_ or func is Tensor.__float__:
            caller = _caller()
            if _is_batch_counter(args[0], caller):
                if func is Tensor.add_:
                    return self._count_batches(*args, **(kwargs or {}))
                if self.batch_stats and caller is not None:
                    # momentum=None: BatchNorm divides by the count it could not move;
                    # the factor is unused with batch statistics, so keep it finite.
                    return max(1.0, func(*args, **(kwargs or {})))
                if caller is not None:
                    return _cumulative_factor_count(func, args, kwargs or {})
        return run_op(func, args, kwargs or {})


def _op_runner() -> Callable[[Callable[..., Any], Sequence[Any], Dict[str, Any]], Any]:
    # A warning that torch raises in C++ (vmap's "performance drop" fallback ...) is
    # reported at the innermost Python frame. For every op under the mode that is the
    # frame that runs it: so that torch's message is not reported at a line of
    # fparams, ops run from this one-line function, compiled under a name of its own.
    source = "def run_op(func, args, kwargs):\n    return func(*args, **kwargs)\n"
    namespace: Dict[str, Any] = {}
    exec(compile(source, "<torch op, run under fparams.exact_norms>", "exec"), namespace)
    return namespace["run_op"]


run_op = _op_runner()


def innermost_exact_norms() -> Optional[exact_norms]:
    """The active :class:`exact_norms`, when it is the innermost torch function mode (eager only)."""
    if is_compiling():
        return None
    mode = current_function_mode()
    return mode if isinstance(mode, exact_norms) else None


def _cumulative_factor_count(func: Callable[..., Any], args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
    # BatchNorm(momentum=None) reads its count as a Python float: not per task under vmap
    try:
        return func(*args, **kwargs)
    except RuntimeError as err:
        if not is_vmap_error(err):
            raise
        raise ValueError(
            "fparams.exact_norms: a BatchNorm layer with momentum=None (a cumulative average "
            "of the running statistics) reads num_batches_tracked as a Python number, which "
            "cannot differ per task under vmap. Give the layer a numeric momentum, use "
            "map_tasks(..., strategy='loop'), or normalize with batch statistics only: "
            "map_tasks(..., batch_stats=True)."
        ) from None  # torch's text (.item() under vmap) adds nothing


def _caller() -> Any:
    # the frame that called the tensor method (``__torch_function__`` is one up)
    return None if is_compiling() else caller_frame(2)


def _is_batch_counter(t: Any, caller: Any) -> bool:
    # ``num_batches_tracked``, used by BatchNorm's own forward: any other 0-dim
    # integer tensor (a user's step counter) is left alone.
    if not (isinstance(t, Tensor) and t.dim() == 0 and t.dtype == torch.long and not t.requires_grad):
        return False
    if caller is None:
        return True  # under dynamo, which cannot trace frame inspection: the test above
    owner = caller.f_locals.get("self")
    return isinstance(owner, BATCH_NORMS) and t is getattr(owner, "num_batches_tracked", None)
