"""``exact_norms``: a thin ``TorchFunctionMode`` that routes normalization to the pure functions.

Under vmap (or with ``always=True``) the normalization functionals run as
the plain tensor ops of :mod:`.functions`; elsewhere torch's own fused
kernels run, which are exact there. Updates of running statistics go
through a :class:`~.journal.StatsJournal`; BatchNorm's batch counter is
recognised by the frame that updates it (through ``_torch_compat``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._call import note_used
from .._checks import check_flag
from .._errors import FparamsRuntimeError, public
from .._grads import vmap_active
from .._torch_compat import (
    BATCH_NORMS,
    UNKNOWN_CALLER,
    caller_self,
    calling_module,
    current_function_mode,
    is_compiling,
    is_shared_stats_error,
    is_vmap_error,
    pop_function_mode,
    run_op,
)
from .functions import channel_norm, group_norm, layer_norm, rms_norm, values_per_channel
from .journal import StatsJournal, cumulative_average_error, one_value_error, shared_stats_error

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class exact_norms(TorchFunctionMode):
    """Run the normalization functionals as plain tensor ops under vmap while active.

    Why: under vmap, torch's native batch and layer normalization give wrong
    second-order gradients (closest upstream report:
    https://github.com/pytorch/functorch/issues/534); the same maths in plain
    tensor ops is exact. Where no vmap runs, torch's kernels run (exact and
    faster). ``map_tasks`` runs under this mode. Batch or instance statistics
    over a single value (one row per task) raise the same error in every
    strategy, where torch would raise in a loop and vmap would divide by a
    zero variance.

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

    @public("exact_norms")
    def __init__(self, batch_stats: bool = False, *, always: bool = False) -> None:
        check_flag("batch_stats", batch_stats)
        check_flag("always", always)
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
        super().__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, *exc: Any) -> Any:
        self._depth -= 1
        if self._depth == 0:  # the outermost ``with``: the loop over tasks is over
            self.journal.close()
        return super().__exit__(*exc)  # type: ignore[no-untyped-call]

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Leave this mode (the innermost one) for a block of ops that call no normalization.

        While a mode is active every torch call, down to ``Tensor.dim()``,
        passes through Python; ``fparams.adapt`` steps outside it for its own
        bookkeeping and re-enters it in every ``loss_fn`` call (:meth:`around`).
        """
        with pop_function_mode() as popped:
            if popped is not self:  # pragma: no cover - a caller's bug
                raise FparamsRuntimeError("suspended() left a mode that is not this one (a bug in fparams)")
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
        return self._with_stats(False, F.batch_norm, *args)

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
        return self._with_stats(True, F.instance_norm, *args)

    def _with_stats(
        self,
        per_instance: bool,
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
        own_stats = use_input_stats or self.batch_stats or mean is None or var is None
        if not own_stats:  # normalizes with them: a checkpointed step watches them
            note_used(mean, var)
        if own_stats and input.dim() >= 2 and values_per_channel(input, per_instance) == 1:
            raise one_value_error(_layer_name(per_instance), tuple(input.shape), per_instance)
        update = use_input_stats and not self.batch_stats and mean is not None and var is not None
        if self.always or vmap_active():
            out, seen = channel_norm(
                input, mean, var, weight, bias, own_stats, eps, per_instance=per_instance, observe=update
            )
            if seen is not None and mean is not None and var is not None:
                layer = "InstanceNorm" if per_instance else "BatchNorm"
                self.journal.update(mean, seen.mean, momentum, layer)
                self.journal.update(var, seen.var, momentum, layer)
            return out
        # No vmap: torch's own kernel is exact (and fused), with the same semantics.
        if self.batch_stats:
            return kernel(input, None, None, weight, bias, True, momentum, eps)
        if update and mean is not None and var is not None:
            layer = "InstanceNorm" if per_instance else "BatchNorm"
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
            raise shared_stats_error("BatchNorm", err) from None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        impl = self._impls.get(func)
        if impl is not None:
            self.used = True
            if func in self._stateful or self.always or vmap_active():
                return impl(*args, **kwargs)
            return run_op(func, args, kwargs)  # no vmap: torch's kernel is exact
        if (func is Tensor.add_ or func is Tensor.__float__) and _maybe_counter(args[0]):
            owner = caller_self(1)  # the method that called the tensor's
            if _is_batch_counter(args[0], owner):
                return self._on_batch_counter(func, args, kwargs, owner is not UNKNOWN_CALLER)
        return run_op(func, args, kwargs)

    def _on_batch_counter(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: Dict[str, Any], seen: bool
    ) -> Any:
        if func is Tensor.add_:
            return self._count_batches(*args, **kwargs)
        if not seen:
            return run_op(func, args, kwargs)
        if self.batch_stats:
            # momentum=None: BatchNorm divides by the count it could not move;
            # the factor is unused with batch statistics, so keep it finite.
            return max(1.0, func(*args, **kwargs))
        try:  # BatchNorm(momentum=None) reads its count as a Python float: not per task under vmap
            return func(*args, **kwargs)
        except RuntimeError as err:
            if not is_vmap_error(err):
                raise
            raise cumulative_average_error() from None  # torch's text (.item() under vmap) adds nothing


def _maybe_counter(t: Any) -> bool:
    # what num_batches_tracked looks like: a 0-dim long tensor that needs no grad
    return isinstance(t, Tensor) and t.dim() == 0 and t.dtype == torch.long and not t.requires_grad


def _is_batch_counter(t: Tensor, owner: object) -> bool:
    # ``num_batches_tracked``, used by BatchNorm's own forward: any other 0-dim
    # integer tensor (a user's step counter) is left alone. Where frames cannot
    # be read (torch.compile), the kind of tensor decides.
    if owner is UNKNOWN_CALLER:
        return True
    return isinstance(owner, BATCH_NORMS) and t is getattr(owner, "num_batches_tracked", None)


def _layer_name(per_instance: bool) -> str:
    module = calling_module(_INSTANCE_NORMS if per_instance else BATCH_NORMS)
    if module is not None:
        return type(module).__name__
    return "InstanceNorm" if per_instance else "BatchNorm"


def innermost_exact_norms() -> Optional[exact_norms]:
    """The active :class:`exact_norms`, when it is the innermost torch function mode (eager only)."""
    if is_compiling():
        return None
    mode = current_function_mode()
    return mode if isinstance(mode, exact_norms) else None
