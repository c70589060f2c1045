"""iMAML (Rajeswaran et al., 2019): :func:`fparams.adapt` made implicit.

The adapted parameters minimise a proximally regularised task loss; their
meta-gradient comes from that problem's optimality condition through
:func:`~fparams.implicit.root.root_decorator`, so memory does not grow with
the number of inner steps.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from .._checks import check_callable, check_int, check_lr, check_positive, check_rate_keys, describe
from .._errors import FparamsTypeError, FparamsValueError, public
from .._inner import adapt as _unrolled_adapt
from .._kernels import second_order_kernels
from .._norms import exact_norms, innermost_exact_norms
from .._transforms import _partition
from .._types import LR, Filter, Params, TensorDict
from .root import check_solve, root_decorator
from .solvers import cg

__all__ = ["adapt"]


def _proximal(loss_fn: Callable[..., Tensor], frozen: TensorDict) -> Callable[..., Tensor]:
    def prox(phi: Params, anchor: TensorDict, lam: Any, *args: Any) -> Tensor:
        distance = sum(((phi[k] - anchor[k]) ** 2).sum() for k in phi)
        total: Tensor = _checked_loss(loss_fn({**phi, **frozen}, *args)) + 0.5 * lam * distance
        return total

    return prox


def _checked_loss(loss: object) -> Tensor:
    # the inner loop, the solver's Hessian-vector products and the outer loss all need a
    # scalar; this runs inside them, so the error names implicit.adapt itself
    if not isinstance(loss, Tensor) or not loss.is_floating_point():
        shown = f"dtype {loss.dtype}" if isinstance(loss, Tensor) else describe(loss)
        raise FparamsTypeError(
            f"`loss_fn` must return a scalar floating tensor; got {shown}.", function="implicit.adapt"
        )
    if loss.dim() != 0:
        raise FparamsValueError(
            f"`loss_fn` must return a scalar tensor (reduce it, e.g. .mean()); got shape "
            f"{tuple(loss.shape)}.",
            function="implicit.adapt",
        )
    return loss


def _every_name(name: str, tensor: Tensor) -> bool:
    # adapt's filter for the solver's inner loop: its starting point is a detached
    # copy, which must adapt although it does not require grad
    return True


def _is_optimizer(lr: object) -> bool:
    # an fparams.optim GradientTransformation (init + update), told apart from a rate
    return callable(getattr(lr, "init", None)) and callable(getattr(lr, "update", None))


def _checked_lr(lr: Any, trainable: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Any:
    """The inner rate, checked once; tensors detached (the solution does not depend on them)."""
    if _is_optimizer(lr):
        return lr
    rates = check_lr(lr, optimizer_ok=True)
    if rates is None:
        return lr.detach() if isinstance(lr, Tensor) else lr
    check_rate_keys(rates, trainable, params)
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in rates.items() if k in trainable}


def _check_inputs(loss_fn: object, params: object, lam: object, steps: object, solve: object) -> None:
    check_callable("loss_fn", loss_fn, "loss_fn(params, *args) -> scalar tensor")
    if not isinstance(params, Mapping):
        raise FparamsTypeError(
            f"`params` must be a dict of tensors keyed by name; got {describe(params)}. "
            f"Use fparams.split(module) to get one."
        )
    for k, t in params.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise FparamsTypeError(
                f"`params[{k!r}]` must be a floating tensor; got "
                f"{describe(t) if not isinstance(t, Tensor) else f'dtype {t.dtype}'}."
            )
    check_int("steps", steps, 1)
    if isinstance(lam, Tensor):
        if not lam.is_floating_point():
            raise FparamsTypeError(f"`lam` must be a floating tensor or a number; got dtype {lam.dtype}.")
        if lam.dim() != 0:
            raise FparamsValueError(
                f"`lam` must be a number or a 0-dim tensor (one strength per task); got a tensor of "
                f"shape {tuple(lam.shape)}."
            )
    else:
        check_positive("lam", lam)
    check_solve(solve)


def _under_norms(fn: Callable[..., Tensor], norms: Optional[exact_norms]) -> Callable[..., Tensor]:
    # The solver runs inside an autograd.Function, and its backward after the call
    # has returned; torch leaves every function mode while it runs such a node, so
    # the map_tasks mode (batch statistics, exact norms under vmap) is re-entered here.
    return fn if norms is None else norms.around(fn)


@public("implicit.adapt")
def adapt(
    loss_fn: Callable[..., Tensor],
    params: TensorDict,
    *args: Any,
    lam: Union[float, Tensor],
    lr: LR,
    steps: int,
    solve: Optional[Callable[..., Any]] = None,
    filter: Optional[Filter] = None,
) -> Params:
    """iMAML: adapted parameters whose meta-gradient is implicit.

    The adapted parameters ``phi`` approximately minimise

        loss_fn(phi, *args) + lam / 2 * ||phi - params||^2,

    reached from ``params`` by ``steps`` gradient steps (or steps of an
    ``fparams.optim`` optimizer) that record no graph. Their gradient with
    respect to ``params`` (and to ``lam`` where it is a tensor that requires
    grad, and to any tensor in ``args``) comes from the optimality condition
    ``grad loss_fn(phi) + lam (phi - params) = 0`` (Rajeswaran et al., 2019):
    ``d phi / d params = lam (H + lam I)^{-1}``, applied by ``solve``
    (conjugate gradients by default) with Hessian-vector products. Memory does
    not grow with ``steps``. The gradient is exact at the minimiser: take
    enough steps for the inner problem to converge. A NaN or infinite outer
    loss gives NaN meta-gradients, never zeros.

    It runs under :func:`fparams.map_tasks` (vmap, loop or chunked: the same
    numbers, normalization layers and ``batch_stats=True`` included),
    :func:`fparams.meta_value_and_grad`, ``torch.func.grad`` and ``.backward()``.

    Args:
        loss_fn: ``loss_fn(params, *args) -> scalar tensor`` (the support loss).
        params: the meta-parameters, a dict of tensors.
        *args: passed to ``loss_fn`` (the support set).
        lam: the strength of the proximal term, a positive number or a 0-dim
            tensor (one that requires grad receives a meta-gradient).
        lr: the inner step size (a number, a tensor, which receives no
            gradient, or a dict of those per adapted name) or an
            ``fparams.optim`` optimizer.
        steps: number of inner steps, at least 1.
        solve: the linear solver for the meta-gradient (default
            ``fparams.implicit.cg()``: ``H + lam I`` must be positive
            definite, e.g. ``lam`` larger than minus the smallest Hessian
            eigenvalue).
        filter: which parameters adapt, as in :func:`fparams.adapt`; the rest
            stay as they are and still receive gradients (directly, and
            through their effect on the adapted ones).

    Returns:
        A new dict with every name of ``params``.

    Examples:
        >>> import torch, fparams
        >>> arch, params, _ = fparams.split(torch.nn.Linear(1, 1))
        >>> x, y = torch.randn(8, 1), torch.randn(8, 1)
        >>> mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()
        >>> fast = fparams.implicit.adapt(mse, params, x, y, lam=1.0, lr=0.1, steps=50)
        >>> mse(fast, x, y).backward()
        >>> sorted(k for k, p in params.items() if p.grad is not None)
        ['bias', 'weight']
    """
    _check_inputs(loss_fn, params, lam, steps, solve)
    if not params:
        raise FparamsValueError("`params` is an empty dict: there is nothing to adapt.")
    trainable, frozen = _partition(params, filter) if filter is not None else (dict(params), {})
    if not trainable:
        raise FparamsValueError("`filter` selects no parameter, so nothing would adapt.")
    lr = _checked_lr(lr, trainable, params)
    norms = innermost_exact_norms()
    task_loss = _under_norms(loss_fn, norms)

    def optimality(phi: Params, anchor: Params, lam_: Any, frozen_: Params, *a: Any) -> Params:
        with second_order_kernels():  # its vjps differentiate the gradient again
            grads: Params = torch.func.grad(_proximal(task_loss, frozen_))(phi, anchor, lam_, *a)
        return grads

    def solver(init: Params, anchor: Params, lam_: Any, frozen_: Params, *a: Any) -> Params:
        prox = _proximal(task_loss, frozen_)
        fast: Dict[str, Tensor] = _unrolled_adapt(
            lambda phi, *b: prox(phi, anchor, lam_, *b),
            init, *a, lr=lr, steps=steps, first_order=True, filter=_every_name,
        )  # fmt: skip
        return fast

    # the optimality condition is a gradient: its Jacobian (a Hessian) is symmetric
    linear_solve = cg() if solve is None else solve
    root = root_decorator("implicit.adapt", optimality, linear_solve, False, symmetric=True)(solver)
    adapted = root({k: t.detach() for k, t in trainable.items()}, trainable, lam, frozen, *args)
    return {k: adapted[k] if k in adapted else frozen[k] for k in params}
