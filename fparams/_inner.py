"""The pure inner loop: a few differentiable gradient steps on a params dict."""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_dict, check_int, check_lr, check_rate_keys, check_rate_shapes, reports_errors_here
from ._grads import grad_route, inner_grad
from ._norms import innermost_exact_norms
from ._torch_compat import is_captured_update_error, is_nonscalar_grad_error
from ._transforms import partition
from ._types import LR, Filter, Params, TensorDict


def is_optimizer(obj: object) -> bool:
    """Does ``obj`` look like an ``fparams.optim`` rule (``init`` + ``update``)?"""
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))


def check_rates(
    where: str, lr: Any, names: Mapping[str, object], all_names: Mapping[str, object]
) -> Dict[str, Any]:
    """One learning rate per trainable name, validated once before the loop."""
    rates = check_lr(where, lr, optimizer_ok=True)
    if rates is not None:
        check_rate_keys(where, rates, names, all_names)
        return {k: rates[k] for k in names}
    return dict.fromkeys(names, lr)


@reports_errors_here
def adapt(
    loss_fn: Callable[..., Tensor],
    params: TensorDict,
    *args: Any,
    lr: LR,
    steps: int = 1,
    first_order: bool = False,
    filter: Optional[Filter] = None,
    buffers: Optional[TensorDict] = None,
) -> Params:
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
        loss_fn: ``loss_fn(params, *args) -> scalar tensor``.
        params: the starting parameters (a dict, e.g. from :func:`fparams.split`).
        *args: passed to ``loss_fn`` at every step (the support set).
        lr: a number, a tensor (a learned rate), a dict with one tensor per
            adapted parameter (Meta-SGD), or an ``fparams.optim`` optimizer
            such as ``fparams.optim.adam(1e-2)``.
        steps: number of inner steps.
        first_order: stop gradients through the inner gradients (FOMAML).
        filter: which parameters adapt (e.g. ``"head.*"`` for ANIL); the rest
            stay as they are and still receive outer gradients.
        buffers: state that layers update in place during the inner loop
            (BatchNorm running statistics). When given, it is passed to every
            call as ``loss_fn(params, *args, buffers=buffers)``; under
            ``torch.func.grad`` it is an input of each gradient call, which is
            what lets a layer update it there (a captured tensor cannot be).

    Returns:
        A new dict with every name of ``params``.

    Examples:
        >>> import torch, fparams
        >>> arch, params, _ = fparams.split(torch.nn.Linear(1, 1))
        >>> x, y = torch.randn(8, 1), torch.randn(8, 1)
        >>> mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()
        >>> fast = fparams.adapt(mse, params, x, y, lr=0.1, steps=3)
        >>> bool(mse(fast, x, y) < mse(params, x, y))
        True
    """
    where = "fparams.adapt"
    check_dict(where, "params", params)
    check_int(where, "steps", steps, 0)
    trainable, frozen = partition(params, filter) if filter is not None else (dict(params), {})
    if not trainable:
        raise ValueError(f"{where}: `filter` selects no parameter, so nothing would adapt.")

    # The route depends only on the transforms active now: chosen once, not per step.
    route = grad_route()
    create_graph = torch.is_grad_enabled() and not first_order
    if create_graph and not any(t.requires_grad for t in params.values()):
        route = "func"  # see grad_route: no graph from fresh leaves onto the results
    norms = innermost_exact_norms()
    if norms is not None:
        # Only loss_fn can call a normalization: the bookkeeping runs outside the mode.
        loss_fn = norms.around(loss_fn)
    if buffers is None:

        def inner(fast: Params, *a: Any) -> Tensor:
            return loss_fn({**fast, **frozen}, *a)

        grad_fn = inner_grad(inner, route, create_graph)
    else:

        def inner_b(fast: Params, b: TensorDict, *a: Any) -> Tensor:
            return loss_fn({**fast, **frozen}, *a, buffers=b)

        grad_fn = functools.partial(_with_buffers, inner_grad(inner_b, route, create_graph), buffers)
    grad_fn = functools.partial(_explained, grad_fn)
    with norms.suspended() if norms is not None else contextlib.nullcontext():
        if is_optimizer(lr):
            trainable = _optimizer_steps(grad_fn, lr, trainable, args, steps, first_order)
        else:
            rates = check_rates(where, lr, trainable, params)
            check_rate_shapes(where, rates, trainable)
            trainable = _sgd_steps(grad_fn, rates, trainable, args, steps, first_order)
    # the caller's key order, so that zipping names with values stays safe
    return {k: trainable[k] if k in trainable else frozen[k] for k in params}


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


def _with_buffers(
    grad_fn: Callable[..., Params], buffers: TensorDict, fast: Params, *a: Any, owned: bool = False
) -> Params:
    return grad_fn(fast, buffers, *a, owned=owned)


def _sgd_steps(
    grad_fn: Callable[..., Params],
    rates: Dict[str, Any],
    trainable: Params,
    args: Tuple[Any, ...],
    steps: int,
    first_order: bool,
) -> Params:
    for i in range(steps):
        grads = grad_fn(trainable, *args, owned=i > 0)  # after step 0, the tensors are ours
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        trainable = {k: _step(p, rates[k], grads[k]) for k, p in trainable.items()}
    return trainable


def _step(p: Tensor, rate: Any, grad: Tensor) -> Tensor:
    # one op for a number, where ``p - rate * grad`` takes two
    return p.sub(grad, alpha=float(rate)) if isinstance(rate, numbers.Real) else p - rate * grad


def _optimizer_steps(
    grad_fn: Callable[..., Params],
    opt: Any,
    trainable: Params,
    args: Tuple[Any, ...],
    steps: int,
    first_order: bool,
) -> Params:
    state = opt.init(trainable)
    for i in range(steps):
        grads = grad_fn(trainable, *args, owned=i > 0)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        updates, state = opt.update(grads, state, trainable)
        trainable = {k: p + updates[k] for k, p in trainable.items()}
    return trainable
