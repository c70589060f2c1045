"""One step of :func:`fparams.adapt`'s loop: gradients, the optimizer's update, new params.

``_inner.py`` normalises adapt's inputs and runs the loop; each step here takes
the inner gradient by the route ``_grads.py`` chose, leaves out the params the
loss does not use (:class:`Usage`), asks the transformation for updates and
adds them, keeping each parameter's dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, FrozenSet, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from . import _torch_compat as compat
from ._errors import FparamsValueError
from ._grads import grad_route, inner_grad, inner_grad_with_aux
from ._torch_compat import is_captured_update_error, is_nonscalar_grad_error
from ._types import Params, TensorDict
from .optim import GradientTransformation

#: What an inner step carries to the next: the adapted params, the optimizer
#: state and, with ``has_aux``, the aux of the step (None before any).
Carry = Tuple[Params, Any, Any]
#: What else a step reads: the params that do not adapt, and loss_fn's arguments.
Ctx = Tuple[Params, Tuple[Any, ...]]


class Usage:
    """Which adapted params the loss reaches, found once, on the first step's graph.

    A param the loss never uses gets no gradient (``p.grad is None`` in torch),
    so it is left out of the grads given to the optimizer, which then neither
    moves it nor changes its state. Found on the routes that build an autograd
    graph (``"autograd"``, ``"vmap"``); under ``torch.func.grad`` unused params
    get zero gradients, as torch.func gives them.
    """

    def __init__(self) -> None:
        self.pending = True
        self.used: Optional[FrozenSet[str]] = None

    def record(self, out: Any, fast: Params, frozen: Params, has_aux: bool) -> None:
        self.pending = False
        loss = out[0] if has_aux and isinstance(out, tuple) and out else out
        if not isinstance(loss, Tensor):
            return  # the gradient function reports it
        names = list(fast)
        reached = compat.reached_by(
            compat.unwrapped(loss),
            [compat.unwrapped(fast[k]) for k in names],
            [compat.unwrapped(t) for t in frozen.values()],
        )
        if not all(reached):
            self.used = frozenset(k for k, r in zip(names, reached) if r)

    def keep(self, grads: Params) -> Params:
        used = self.used
        return grads if used is None else {k: g for k, g in grads.items() if k in used}


def grad_fn(
    loss_fn: Callable[..., Any],
    create_graph: bool,
    with_buffers: bool,
    has_aux: bool,
    usage: Usage,
    route: str,
) -> Callable[..., Any]:
    """``grads(fast, frozen, buffers, *args, owned=...)`` of ``loss_fn`` by ``route``.

    With ``has_aux`` it returns ``(grads, aux)``.
    """

    def inner(fast: Params, frozen: Params, b: Optional[TensorDict], *a: Any) -> Any:
        merged = {**fast, **frozen}
        out = loss_fn(merged, *a, buffers=b) if with_buffers else loss_fn(merged, *a)
        if usage.pending and route != "func":
            usage.record(out, fast, frozen, has_aux)
        return out

    make = inner_grad_with_aux if has_aux else inner_grad
    return functools.partial(_explained, make(inner, route, create_graph), usage)


def one_step(
    grads_fn: Callable[..., Any],
    opt: GradientTransformation,
    first_order: bool,
    owned: bool,
    carry: Carry,
    ctx: Ctx,
    buffers: Optional[TensorDict],
) -> Carry:
    """One inner step: ``carry = (params, optimizer state, aux)`` to the next carry."""
    fast, state, _ = carry
    frozen, args = ctx
    out = grads_fn(fast, frozen, buffers, *args, owned=owned)  # owned: the tensors are ours
    grads, aux = out if isinstance(out, tuple) else (out, None)  # (grads, aux) with has_aux
    if first_order:
        grads = {k: g.detach() for k, g in grads.items()}
    updates, state = opt.update(grads, state, fast)
    return _apply(fast, updates), state, aux


def _apply(params: Params, updates: Mapping[str, Tensor]) -> Params:
    # params keep their dtype: an update of another dtype (a float64 rate on
    # float32 params, float32 updates on a bf16 model) is cast, differentiably
    return {k: p if k not in updates else _add(p, updates[k]) for k, p in params.items()}


def _add(p: Tensor, u: Tensor) -> Tensor:
    return p + u if u.dtype == p.dtype else p + u.to(p.dtype)


def checkpointed_body(
    grads_for: Callable[[str], Callable[..., Any]],
    opt: GradientTransformation,
    first_order: bool,
    carry: Carry,
    ctx: Ctx,
    buffers: Optional[TensorDict],
) -> Carry:
    # Runs on the first run and when recomputed: the route is read here,
    # since the vmap route's level is the step's own.
    return one_step(grads_for(grad_route()), opt, first_order, False, carry, ctx, buffers)


def label(path: Sequence[Any]) -> str:
    """What a checkpointed step's input at ``path`` in ``(carry, ctx)`` is, for error messages."""
    part, field = path[0], path[1] if len(path) > 1 else None
    if part == 0 and field == 0 or part == 1 and field == 0:
        return f"params[{path[2]!r}]" if len(path) > 2 else "params"
    if part == 0 and field == 1:
        return "the optimizer state"
    if part == 1 and field == 1:
        return f"loss_fn's argument {path[2]} (args[{path[2]}])" if len(path) > 2 else "loss_fn's arguments"
    return "an input of the step"


def _explained(grad_fn: Callable[..., Any], usage: Usage, fast: Params, *a: Any, owned: bool = False) -> Any:
    # torch.func's own messages for the two mistakes users make most, in our words.
    try:
        out = grad_fn(fast, *a, owned=owned)
    except RuntimeError as err:
        text = str(err)
        if is_captured_update_error(err):
            raise FparamsValueError(
                "a layer updated a tensor in place that the inner loop does not "
                "own (usually BatchNorm's running statistics in train mode). Pass the buffers "
                "explicitly: fparams.adapt(loss_fn, params, ..., buffers=b) with "
                "loss_fn(params, ..., buffers) calling arch(params, x, buffers=buffers); or use "
                "batch statistics only (map_tasks(..., batch_stats=True) / "
                "fparams.exact_norms(batch_stats=True)), or module.eval(). "
                f"torch said: {text.splitlines()[0]}"
            ) from None
        if is_nonscalar_grad_error(err):
            raise FparamsValueError(
                "`loss_fn` must return a scalar tensor (reduce it, e.g. .mean()); "
                f"torch said: {text.splitlines()[0]}"
            ) from None
        raise
    if isinstance(out, tuple):
        return usage.keep(out[0]), out[1]
    return usage.keep(out)
