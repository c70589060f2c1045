"""The pure inner loop: a few differentiable gradient steps on a params dict."""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union, overload

import torch
from torch import Tensor

from . import _torch_compat as compat
from ._checkpoint import check_checkpoint, checkpointed_step
from ._checks import (
    check_dict,
    check_flag,
    check_int,
    check_lr,
    check_rate_keys,
    check_rate_shapes,
    reports_errors_here,
    warn_in_user_code,
)
from ._grads import grad_route, inner_grad, inner_grad_with_aux
from ._norms import innermost_exact_norms
from ._torch_compat import is_captured_update_error, is_compiling, is_nonscalar_grad_error
from ._transforms import partition
from ._types import LR, Filter, Params, TensorDict


def is_optimizer(obj: object) -> bool:
    """Does ``obj`` look like an ``fparams.optim`` rule (``init`` + ``update``)?"""
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))


def check_rates(
    where: str, lr: Any, names: Mapping[str, object], all_names: Mapping[str, object]
) -> Dict[str, Any]:
    """One learning rate per trainable name, validated once before the loop."""
    rates = check_lr(where, lr, optimizer_ok=True, per_step_ok=True)
    if rates is not None:
        check_rate_keys(where, rates, names, all_names)
        return {k: rates[k] for k in names}
    return dict.fromkeys(names, lr)


@overload
def adapt(
    loss_fn: Callable[..., Any],
    params: TensorDict,
    *args: Any,
    lr: Union[LR, Sequence[LR]],
    steps: int = ...,
    first_order: bool = ...,
    filter: Optional[Filter] = ...,
    buffers: Optional[TensorDict] = ...,
    checkpoint: bool = ...,
    has_aux: Literal[False] = ...,
    return_state: Literal[False] = ...,
) -> Params: ...


@overload
def adapt(
    loss_fn: Callable[..., Any],
    params: TensorDict,
    *args: Any,
    lr: Union[LR, Sequence[LR]],
    steps: int = ...,
    first_order: bool = ...,
    filter: Optional[Filter] = ...,
    buffers: Optional[TensorDict] = ...,
    checkpoint: bool = ...,
    has_aux: bool = ...,
    return_state: bool = ...,
) -> Any: ...


@reports_errors_here
def adapt(
    loss_fn: Callable[..., Any],
    params: TensorDict,
    *args: Any,
    lr: Union[LR, Sequence[LR]],
    steps: int = 1,
    first_order: bool = False,
    filter: Optional[Filter] = None,
    buffers: Optional[TensorDict] = None,
    checkpoint: bool = False,
    has_aux: bool = False,
    return_state: bool = False,
) -> Any:
    """Take ``steps`` differentiable gradient steps on ``loss_fn(params, *args)``.

    It runs under ``torch.func.vmap`` (one adaptation per task, see
    :func:`fparams.map_tasks`), under an outer ``torch.func.grad`` or
    ``.backward()`` (the meta-gradient flows through every step) and under
    ``torch.compile``. The inner gradients come from ``torch.autograd.grad``
    where no transform is active, from one ``autograd.grad`` over all tasks
    under a single ``vmap``, and from ``torch.func.grad`` otherwise (see
    ``fparams/_grads.py``); all give the same numbers. In eager code with no
    transform, a layer in train mode updates its running statistics at each
    step, as a hand-written inner loop does.

    Args:
        loss_fn: ``loss_fn(params, *args) -> scalar tensor`` (with
            ``has_aux=True``, ``-> (scalar tensor, aux)``).
        params: the starting parameters (a dict, e.g. from :func:`fparams.split`).
        *args: passed to ``loss_fn`` at every step (the support set).
        lr: a number, a tensor (a learned rate), a dict with one tensor per
            adapted parameter (Meta-SGD), or an ``fparams.optim`` optimizer
            such as ``fparams.optim.adam(1e-2)``. A list or tuple with one
            such rate (not an optimizer) per step gives per-step rates
            (MAML++): step ``i`` uses ``lr[i]``, and learned entries get
            meta-gradients; its length must be ``steps``.
        steps: number of inner steps.
        first_order: stop gradients through the inner gradients (FOMAML).
        filter: which parameters adapt (e.g. ``"head.*"`` for ANIL); the rest
            stay as they are and still receive outer gradients.
        buffers: state that layers update in place during the inner loop
            (BatchNorm running statistics). When given, it is passed to every
            call as ``loss_fn(params, *args, buffers=buffers)``; under
            ``torch.func.grad`` it is an input of each gradient call, which is
            what lets a layer update it there (a captured tensor cannot be).
        checkpoint: recompute each step's activations in the backward pass
            instead of keeping them (exact: the same meta-gradient). Memory
            then grows by one copy of the params (and optimizer state) per
            step instead of one step's whole graph, for about one more
            forward and backward pass per step. It runs
            with plain autograd (``.backward()``, eager
            :func:`fparams.meta_value_and_grad`) and under one ``vmap``
            (:func:`fparams.map_tasks`, every strategy); under an outer
            ``torch.func`` grad transform it raises, since the saved-tensor
            hooks it needs cannot run there. It changes nothing where there
            is no second-order graph to the params to keep
            (``first_order=True``, no grad mode, no param that requires
            grad) and inside ``torch.compile``, which traces the whole
            computation into a graph of its own.
            Layers that update module buffers in place other than through
            ``buffers`` (BatchNorm in train mode without ``buffers=``) update
            them once more when a step is recomputed; pass ``buffers=``.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux of the last
            inner step (computed at the parameters before that step's
            update, e.g. support-set predictions or accuracy) is returned
            too, or ``None`` where ``steps=0``.
        return_state: also return the inner optimizer's state after the last
            step (``lr`` must be an ``fparams.optim`` optimizer); it covers
            the adapted parameters (those ``filter`` selects).

    Returns:
        A new dict with every name of ``params``; with ``has_aux`` and/or
        ``return_state``, a tuple in that order: ``(params, aux)``,
        ``(params, state)`` or ``(params, aux, state)``.

    Examples:
        >>> import torch, fparams
        >>> arch, params, _ = fparams.split(torch.nn.Linear(1, 1))
        >>> x, y = torch.randn(8, 1), torch.randn(8, 1)
        >>> mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()
        >>> fast = fparams.adapt(mse, params, x, y, lr=0.1, steps=3)
        >>> bool(mse(fast, x, y) < mse(params, x, y))
        True
        >>> def mse_aux(p, x, y):
        ...     out = arch(p, x)
        ...     return (out - y).pow(2).mean(), out.detach()
        >>> fast, preds = fparams.adapt(mse_aux, params, x, y, lr=[0.1, 0.05], steps=2, has_aux=True)
        >>> preds.shape
        torch.Size([8, 1])
    """
    where = "fparams.adapt"
    check_dict(where, "params", params)
    check_int(where, "steps", steps, 0)
    trainable, frozen = partition(params, filter) if filter is not None else (dict(params), {})
    if not trainable:
        raise ValueError(f"{where}: `filter` selects no parameter, so nothing would adapt.")
    if return_state and not is_optimizer(lr):
        raise ValueError(
            f"{where}: return_state=True needs `lr` to be an fparams.optim optimizer (e.g. "
            f"fparams.optim.adam(1e-2)); got {type(lr).__name__}, whose plain gradient steps keep no state."
        )
    schedule = _per_step_rates(where, lr, steps, trainable, params) if _is_schedule(lr) else None  # type: ignore[arg-type]

    # The route depends only on the transforms active now: chosen once, not per step.
    route = grad_route()
    create_graph = torch.is_grad_enabled() and not first_order
    if create_graph and not any(t.requires_grad for t in params.values()):
        route = "func"  # see grad_route: no graph from fresh leaves onto the results
    # Checkpointing saves memory only where a second-order graph to the params is
    # recorded (with none requiring grad there is no meta-gradient to bound), and
    # torch.compile traces a graph of its own: there the step is left as it is.
    check_flag(where, "checkpoint", checkpoint)
    checkpoint = checkpoint and create_graph and not is_compiling()
    checkpoint = checkpoint and any(t.requires_grad for t in params.values())
    if checkpoint:
        check_checkpoint(route)
        if route == "vmap" and not compat.SAVED_HOOKS_UNDER_VMAP:
            warn_in_user_code(
                f"fparams.adapt: this torch ({torch.__version__}) refuses autograd's saved-tensor "
                f"hooks under vmap, so checkpoint=True cannot recompute the inner steps of a vmap "
                f"over tasks; they run unrecomputed (the same meta-gradient, without the memory "
                f"saving). Checkpointing works with map_tasks(..., strategy='loop'), or under "
                f"vmap on a newer torch.",
                UserWarning,
            )
            checkpoint = False
    norms = innermost_exact_norms()
    if norms is not None:
        # Only loss_fn can call a normalization: the bookkeeping runs outside the mode.
        loss_fn = norms.around(loss_fn)
    grads_for = functools.partial(_grad_fn, loss_fn, create_graph, buffers is not None, has_aux)
    with norms.suspended() if norms is not None else contextlib.nullcontext():
        if is_optimizer(lr):
            opt: Any = lr
            carry: Carry = (trainable, opt.init(trainable), None)
            update: Optional[Callable[..., Tuple[Params, Any]]] = functools.partial(_optimizer_update, opt)
            rates: Any = None
        elif schedule is not None:
            carry, update, rates = (trainable, None, None), None, None
        else:
            rates = check_rates(where, lr, trainable, params)
            check_rate_shapes(where, rates, trainable)
            carry, update = (trainable, None, None), None
        # one rate dict per step: the same one, or the schedule's entry (per-step rates)
        contexts = [(rates if schedule is None else schedule[i], frozen, args) for i in range(steps)]
        if checkpoint:  # the vmap route's gradient function is made inside the step's own vmap
            body = functools.partial(_checkpointed_body, grads_for, update, first_order)
            for ctx in contexts:
                carry = checkpointed_step(body, carry, ctx, buffers)
        else:
            grads_fn = grads_for(route)
            for i, ctx in enumerate(contexts):
                carry = _one_step(grads_fn, update, first_order, i > 0, carry, ctx, buffers)
        trainable, state, aux = carry
    # the caller's key order, so that zipping names with values stays safe
    fast = {k: trainable[k] if k in trainable else frozen[k] for k in params}
    if not (has_aux or return_state):
        return fast
    return (fast,) + ((aux,) if has_aux else ()) + ((state,) if return_state else ())


#: What an inner step carries to the next: the adapted params, the optimizer
#: state (None for plain steps) and, with ``has_aux``, the aux of the step (None before any).
Carry = Tuple[Params, Any, Any]


def _is_schedule(lr: Any) -> bool:
    # a GradientTransformation is a NamedTuple: a tuple, but one optimizer
    return isinstance(lr, (list, tuple)) and not is_optimizer(lr)


def _per_step_rates(
    where: str, lr: Sequence[Any], steps: int, names: Mapping[str, object], all_names: Mapping[str, object]
) -> List[Dict[str, Any]]:
    """Per-step learning rates (MAML++): one checked rate dict per step."""
    if len(lr) != steps:
        raise ValueError(
            f"{where}: `lr` is a sequence of {len(lr)} per-step rates but steps={steps}; give one "
            f"rate per inner step, or a single rate for all of them."
        )
    schedule = []
    for i, entry in enumerate(lr):
        if is_optimizer(entry):
            raise TypeError(
                f"{where}: `lr[{i}]` is an optimizer; per-step rates are numbers, tensors or dicts "
                f"of tensors. Pass a single fparams.optim optimizer as `lr` instead."
            )
        rates = check_rates(f"{where}: `lr[{i}]`", entry, names, all_names)
        check_rate_shapes(f"{where}: `lr[{i}]`", rates, names)  # type: ignore[arg-type]
        schedule.append(rates)
    return schedule


def _grad_fn(
    loss_fn: Callable[..., Any], create_graph: bool, with_buffers: bool, has_aux: bool, route: str
) -> Callable[..., Any]:
    """``grads(fast, frozen, buffers, *args, owned=...)`` of ``loss_fn`` by ``route``.

    With ``has_aux`` it returns ``(grads, aux)``.
    """
    def inner(fast: Params, frozen: Params, b: Optional[TensorDict], *a: Any) -> Any:
        if with_buffers:
            return loss_fn({**fast, **frozen}, *a, buffers=b)
        return loss_fn({**fast, **frozen}, *a)

    make = inner_grad_with_aux if has_aux else inner_grad
    return functools.partial(_explained, make(inner, route, create_graph))


def _one_step(
    grads_fn: Callable[..., Params],
    update: Optional[Callable[..., Tuple[Params, Any]]],
    first_order: bool,
    owned: bool,
    carry: Carry,
    ctx: Tuple[Any, Params, Tuple[Any, ...]],
    buffers: Optional[TensorDict],
) -> Carry:
    """One inner step: ``carry = (trainable, optimizer state, aux)`` to the next carry."""
    trainable, state, _ = carry
    rates, frozen, args = ctx
    out = grads_fn(trainable, frozen, buffers, *args, owned=owned)  # owned: the tensors are ours
    grads, aux = out if isinstance(out, tuple) else (out, None)  # (grads, aux) with has_aux
    if first_order:
        grads = {k: g.detach() for k, g in grads.items()}
    if update is None:
        return {k: _step(p, rates[k], grads[k]) for k, p in trainable.items()}, None, aux
    return (*update(grads, state, trainable), aux)


def _checkpointed_body(
    grads_for: Callable[[str], Callable[..., Params]],
    update: Optional[Callable[..., Tuple[Params, Any]]],
    first_order: bool,
    carry: Carry,
    ctx: Tuple[Any, Params, Tuple[Any, ...]],
    buffers: Optional[TensorDict],
) -> Carry:
    # Runs on the first run and when recomputed: the route is read here,
    # since the vmap route's level is the step's own.
    return _one_step(grads_for(grad_route()), update, first_order, False, carry, ctx, buffers)


def _explained(grad_fn: Callable[..., Params], fast: Params, *a: Any, owned: bool = False) -> Params:
    # torch.func's own messages for the two mistakes users make most, in our words.
    try:
        return grad_fn(fast, *a, owned=owned)
    except RuntimeError as err:
        text = str(err)
        if is_captured_update_error(err):
            raise ValueError(
                "fparams.adapt: a layer updated a tensor in place that the inner loop does not "
                "own (usually BatchNorm's running statistics in train mode). Pass the buffers "
                "explicitly: fparams.adapt(loss_fn, params, ..., buffers=b) with "
                "loss_fn(params, ..., buffers) calling arch(params, x, buffers=buffers); or use "
                "batch statistics only (map_tasks(..., batch_stats=True) / "
                "fparams.exact_norms(batch_stats=True)), or module.eval(). "
                f"torch said: {text.splitlines()[0]}"
            ) from None
        if is_nonscalar_grad_error(err):
            raise ValueError(
                "fparams.adapt: `loss_fn` must return a scalar tensor (reduce it, e.g. .mean()); "
                f"torch said: {text.splitlines()[0]}"
            ) from None
        raise


def _step(p: Tensor, rate: Any, grad: Tensor) -> Tensor:
    # one op for a number, where ``p - rate * grad`` takes two
    return p.sub(grad, alpha=float(rate)) if isinstance(rate, numbers.Real) else p - rate * grad


def _optimizer_update(opt: Any, grads: Params, state: Any, trainable: Params) -> Tuple[Params, Any]:
    updates, state = opt.update(grads, state, trainable)
    return {k: p + updates[k] for k, p in trainable.items()}, state
