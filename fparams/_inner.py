"""The pure inner loop: a few differentiable optimizer steps on a params dict.

:func:`adapt` normalises its inputs once, then runs one loop: every form of
``lr`` is one :class:`~fparams.optim.GradientTransformation` (``_rates.py``),
every step is ``grads -> transformation.update -> params + updates``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _torch_compat as compat
from ._checkpoint import check_checkpoint, checkpointed_step
from ._checks import check_callable, check_dict, check_flag, check_int, describe, warn_in_user_code
from ._errors import FparamsTypeError, FparamsValueError, public
from ._grads import grad_route
from ._inner_step import Carry, Usage, checkpointed_body, grad_fn, label, one_step
from ._norms import innermost_exact_norms
from ._rates import PerStepState, as_transformation, is_optimizer
from ._torch_compat import is_compiling
from ._transforms import _partition
from ._types import Filter, Params, TensorDict
from .optim import GradientTransformation, OptState

__all__ = ["Adapted", "AdaptedAux", "AdaptedState", "adapt", "is_optimizer"]


class Adapted(NamedTuple):
    """What ``adapt(..., has_aux=True, return_state=True)`` returns: unpack it as ``fast, aux, state``.

    Examples:
        >>> import torch, fparams
        >>> p = {"w": torch.ones(2, requires_grad=True)}
        >>> loss = lambda p: ((p["w"] ** 2).sum(), p["w"].detach())
        >>> out = fparams.adapt(loss, p, lr=fparams.optim.sgd(0.25), has_aux=True, return_state=True)
        >>> out.params["w"], out.aux
        (tensor([0.5000, 0.5000], grad_fn=<AddBackward0>), tensor([1., 1.]))
        >>> fast, aux, state = out
        >>> type(state).__name__
        'SgdState'
    """

    params: Params
    aux: Any
    state: OptState


class AdaptedAux(NamedTuple):
    """What ``adapt(..., has_aux=True)`` returns: unpack it as ``fast, aux`` (or ``.params``, ``.aux``).

    Examples:
        >>> import torch, fparams
        >>> loss = lambda p: ((p["w"] ** 2).sum(), p["w"] * 2)
        >>> fparams.adapt(loss, {"w": torch.ones(1)}, lr=0.25, has_aux=True)
        AdaptedAux(params={'w': tensor([0.5000])}, aux=tensor([2.]))
    """

    params: Params
    aux: Any


class AdaptedState(NamedTuple):
    """What ``adapt(..., return_state=True)`` returns: unpack it as ``fast, state``.

    The fields are also named: ``.params`` and ``.state``.

    Examples:
        >>> import torch, fparams
        >>> loss = lambda p: (p["w"] ** 2).sum()
        >>> opt = fparams.optim.adam(0.1)
        >>> fast, state = fparams.adapt(loss, {"w": torch.ones(1)}, lr=opt, return_state=True)
        >>> state.adam.step  # per parameter, as torch.optim counts
        {'w': tensor(1)}
    """

    params: Params
    state: OptState


class _Options(NamedTuple):
    """adapt's keyword options, checked once (``_check_options``)."""

    steps: int
    first_order: bool
    filter: Optional[Filter]
    buffers: Optional[TensorDict]
    checkpoint: bool
    has_aux: bool
    return_state: bool
    state: Any
    batches: Optional[Sequence[Any]]


@public("adapt")
def adapt(
    loss_fn: Callable[..., Any],
    params: TensorDict,
    *args: Any,
    lr: Any,
    steps: int = 1,
    first_order: bool = False,
    filter: Optional[Filter] = None,
    buffers: Optional[TensorDict] = None,
    checkpoint: bool = False,
    has_aux: bool = False,
    return_state: bool = False,
    state: Any = None,
    batches: Optional[Sequence[Any]] = None,
) -> Any:
    """Take ``steps`` differentiable optimizer steps on ``loss_fn(params, *args)``.

    It runs under ``torch.func.vmap`` (one adaptation per task, see
    :func:`fparams.map_tasks`), under an outer ``torch.func.grad`` or
    ``.backward()`` (the meta-gradient flows through every step) and under
    ``torch.compile``. See ``docs/guides/adapt.md`` for every form of ``lr``,
    frozen and unused parameters, and the in-place rule of ``checkpoint``.

    Args:
        loss_fn: ``loss_fn(params, *args) -> scalar tensor`` (with
            ``has_aux=True``, ``-> (scalar tensor, aux)``).
        params: the starting parameters (a dict, e.g. from :func:`fparams.split`).
            Where some require grad and others do not, only those that do adapt
            (torch.optim's frozen layers); ``filter`` chooses explicitly.
        *args: passed to ``loss_fn`` at every step (the support set).
        lr: an ``fparams.optim`` optimizer (``fparams.optim.adam(1e-2)``); a
            number, a tensor (a learned rate) or a dict of per-parameter rates
            (Meta-SGD), which are ``fparams.optim.sgd(lr)`` steps; or a list with
            one such rate per step (MAML++; learned entries get meta-gradients).
        steps: number of inner steps.
        first_order: stop gradients through the inner gradients (FOMAML).
        filter: which parameters adapt (e.g. ``"head.*"`` for ANIL), whatever
            their ``requires_grad``; the rest stay and still get outer gradients.
        buffers: state that layers update in place (BatchNorm running
            statistics), passed as ``loss_fn(params, *args, buffers=buffers)``.
        checkpoint: recompute each step's activations in the backward pass
            instead of keeping them (the same meta-gradient, less memory); the
            step's inputs must not change in place before the backward pass
            (an ``FparamsRuntimeError`` there says which changed).
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux of the last step
            (``None`` where ``steps=0``) is returned too.
        return_state: also return the optimizer's state after the last step.
        state: an optimizer state to continue from (what ``return_state=True``
            returned), so that one inner loop can be split over several calls.
        batches: one tuple of ``loss_fn`` arguments per step instead of
            ``*args`` (higher's ``diffopt.step`` on a new batch each step).

    Returns:
        The adapted params, a new dict with every name of ``params``; with
        ``has_aux`` and/or ``return_state``, a NamedTuple: :class:`AdaptedAux`
        ``(params, aux)``, :class:`AdaptedState` ``(params, state)`` or
        :class:`Adapted` ``(params, aux, state)``.

    Examples:
        >>> import torch, fparams
        >>> arch, params, _ = fparams.split(torch.nn.Linear(1, 1))
        >>> x, y = torch.randn(8, 1), torch.randn(8, 1)
        >>> mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()
        >>> fast = fparams.adapt(mse, params, x, y, lr=0.1, steps=3)
        >>> bool(mse(fast, x, y) < mse(params, x, y))
        True
        >>> out = fparams.adapt(mse, params, x, y, lr=fparams.optim.adam(0.1), steps=2, return_state=True)
        >>> out.state.adam.step
        {'weight': tensor(2), 'bias': tensor(2)}
        >>> fast, state = fparams.adapt(mse, out.params, x, y, lr=fparams.optim.adam(0.1), state=out.state,
        ...                             return_state=True)
        >>> state.adam.step["weight"]
        tensor(3)
    """
    options = _Options(steps, first_order, filter, buffers, checkpoint, has_aux, return_state, state, batches)
    return _adapt(loss_fn, params, args, lr, options)


def _adapt(
    loss_fn: Callable[..., Any], params: TensorDict, args: Tuple[Any, ...], lr: Any, o: _Options
) -> Any:
    """:func:`adapt` without the public name: fparams' own callers call this."""
    _check_call(loss_fn, params, args, o)
    trainable, frozen = _select(params, o.filter)
    start = o.state.step if isinstance(o.state, PerStepState) else 0
    opt = as_transformation(lr, o.steps, start, trainable, params, partial=o.return_state)
    state = _initial_state(opt, trainable, o.state)
    route, create_graph, checkpoint = _plan(params, o.first_order, o.checkpoint)
    contexts = [(frozen, args if o.batches is None else tuple(o.batches[i])) for i in range(o.steps)]
    norms = innermost_exact_norms()
    if norms is not None:
        # Only loss_fn can call a normalization: the bookkeeping runs outside the mode.
        loss_fn = norms.around(loss_fn)
    grads_for = functools.partial(grad_fn, loss_fn, create_graph, o.buffers is not None, o.has_aux, Usage())
    carry: Carry = (trainable, state, None)
    with norms.suspended() if norms is not None else contextlib.nullcontext():
        if checkpoint:  # the vmap route's gradient function is made inside the step's own vmap
            body = functools.partial(checkpointed_body, grads_for, opt, o.first_order)
            watch = _rate_tensors(lr)
            for ctx in contexts:
                carry = checkpointed_step(body, carry, ctx, o.buffers, label, watch)
        else:
            grads_fn = grads_for(route)
            for i, ctx in enumerate(contexts):
                carry = one_step(grads_fn, opt, o.first_order, i > 0, carry, ctx, o.buffers)
    fast, state, aux = carry
    # the caller's key order, so that zipping names with values stays safe
    out = {k: fast[k] if k in fast else frozen[k] for k in params}
    if o.has_aux and o.return_state:
        return Adapted(out, aux, state)
    if o.has_aux:
        return AdaptedAux(out, aux)
    return AdaptedState(out, state) if o.return_state else out


def _rate_tensors(lr: Any) -> List[Tuple[Tensor, str]]:
    """The tensors of a rate given as a tensor, a dict or a per-step list, with their names: a
    checkpointed step reads them again when it is recomputed, so an in-place change of one (an
    optimizer step on a learned rate) before the backward pass must be detected."""
    if is_optimizer(lr):
        return []
    paths, _ = compat.trees.tree_flatten_with_path(lr)
    return [
        (t, "lr" + "".join(f"[{getattr(k, 'key', getattr(k, 'idx', k))!r}]" for k in path))
        for path, t in paths
        if isinstance(t, Tensor)
    ]


def _check_call(loss_fn: Any, params: Any, args: Tuple[Any, ...], o: _Options) -> None:
    check_callable("loss_fn", loss_fn, "loss_fn(params, *args) -> scalar tensor")
    check_dict("params", params)
    for k, t in params.items():
        if not isinstance(t, Tensor):
            raise FparamsTypeError(f"`params[{k!r}]` is {describe(t)}; every value must be a tensor.")
    check_int("steps", o.steps, 0)
    for name in ("first_order", "checkpoint", "has_aux", "return_state"):
        check_flag(name, getattr(o, name))
    if o.buffers is not None:
        check_dict("buffers", o.buffers)
    if o.batches is None:
        return
    if isinstance(o.batches, (str, bytes, Tensor)) or not isinstance(o.batches, Sequence):
        raise FparamsTypeError(
            "`batches` must be a list with one tuple of loss_fn arguments per step; "
            f"got {describe(o.batches)}."
        )
    if args:
        raise FparamsValueError(
            f"give the support data either as *args (the same every step) or as `batches` (one per "
            f"step), not both; got {len(args)} positional argument(s) and `batches`."
        )
    if len(o.batches) != o.steps:
        raise FparamsValueError(
            f"`batches` has {len(o.batches)} entries but steps={o.steps}; give one batch per inner step."
        )
    for i, batch in enumerate(o.batches):
        if not isinstance(batch, (tuple, list)):
            raise FparamsTypeError(
                f"`batches[{i}]` must be a tuple of loss_fn arguments, e.g. (x, y); got {describe(batch)}."
            )


def _select(params: TensorDict, filter: Optional[Filter]) -> Tuple[Params, Params]:
    """``(trainable, frozen)``: ``filter``'s choice, else the params that require grad."""
    if filter is not None:
        trainable, frozen = _partition(params, filter)
        if not trainable:
            raise FparamsValueError("`filter` selects no parameter, so nothing would adapt.")
        return _floating(trainable), frozen
    if not params:
        raise FparamsValueError(
            "`params` is empty, so nothing would adapt; give the dict of tensors to adapt "
            "(e.g. from fparams.split(module))."
        )
    needs = {k for k, t in params.items() if compat.requires_grad_somewhere(t)}
    if not needs or len(needs) == len(params):  # no frozen layer (or all detached): all adapt
        return _floating(dict(params)), {}
    trainable = {k: t for k, t in params.items() if k in needs}
    return trainable, {k: t for k, t in params.items() if k not in needs}


def _floating(trainable: Params) -> Params:
    for k, t in trainable.items():
        if not (t.is_floating_point() or t.is_complex()):
            raise FparamsTypeError(
                f"`params[{k!r}]` has dtype {t.dtype}, which has no gradient, so it cannot adapt. "
                "Leave it out with `filter=` (or mark it frozen: requires_grad=False while others "
                "require grad)."
            )
    return trainable


def _initial_state(opt: GradientTransformation, trainable: Params, given: Any) -> Any:
    fresh = opt.init(trainable)
    if given is None:
        return fresh
    got, want = compat.trees.tree_structure(given), compat.trees.tree_structure(fresh)
    if got != want:
        raise FparamsTypeError(
            f"`state` does not fit `lr` and the adapted params: expected the structure of "
            f"lr.init(params) ({type(fresh).__name__}), got {type(given).__name__}. Pass the state "
            f"that adapt(..., return_state=True) returned with the same `lr` and `filter`."
        )
    return given


def _plan(params: TensorDict, first_order: bool, checkpoint: bool) -> Tuple[str, bool, bool]:
    """The gradient route, whether to build a second-order graph, and whether to checkpoint."""
    # The route depends only on the transforms active now: chosen once, not per step.
    route = grad_route()
    create_graph = torch.is_grad_enabled() and not first_order
    any_grad = any(t.requires_grad for t in params.values())
    if create_graph and not any_grad:
        route = "func"  # see grad_route: no graph from fresh leaves onto the results
    # Checkpointing saves memory only where a second-order graph to the params is
    # recorded, and torch.compile traces a graph of its own: there the step stays as it is.
    checkpoint = checkpoint and create_graph and not is_compiling() and any_grad
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
    return route, create_graph, checkpoint
