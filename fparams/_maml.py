"""learn2learn-style MAML and Meta-SGD wrappers, built on the module shims.

These keep learn2learn 0.2's signatures for code that loops over tasks:
``learner = maml.clone(); learner.adapt(loss); learner(x)``. For a whole
meta-batch in one vectorised call use :func:`fparams.adapt` with
:func:`fparams.map_tasks` instead.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._checks import check_flag, check_instance, describe
from ._errors import FparamsRuntimeError, FparamsTypeError, FparamsValueError, public
from ._module_api import _update_module, check_rate, clone_module
from ._torch_compat import version as tensor_version


def _is_optimizer(obj: object) -> bool:
    """An ``fparams.optim`` transformation (``init`` + ``update``)."""
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))


def _check_lr(lr: object, model: nn.Module) -> None:
    """``MAML``'s ``lr``: what ``adapt`` takes (a finite number >= 0 or a tensor, fitting the
    parameters' dtype), or an ``fparams.optim`` optimizer."""
    if _is_optimizer(lr):
        return
    if not isinstance(lr, Tensor) and (isinstance(lr, bool) or not isinstance(lr, numbers.Real)):
        raise FparamsTypeError(
            f"`lr` must be a number, a tensor or an fparams.optim optimizer; got {describe(lr)}."
        )
    check_rate(lr, model)


def _check_flags(**flags: object) -> None:
    """Each flag is True or False (``None``, where given, means: the learner's own)."""
    for name, value in flags.items():
        if value is not None:
            check_flag(name, value)


def _check_loss(loss: object) -> None:
    if not isinstance(loss, Tensor):
        raise FparamsTypeError(f"`loss` must be a scalar tensor; got {describe(loss)}.")
    if loss.numel() != 1:
        raise FparamsValueError(
            f"`loss` must be a scalar tensor; got shape {tuple(loss.shape)}. Reduce it first "
            f"(loss.mean() or loss.sum())."
        )


def _grads(
    module: nn.Module,
    loss: Tensor,
    second_order: bool,
    allow_unused: bool,
    allow_nograd: bool,
) -> List[Optional[Tensor]]:
    params = list(module.parameters())
    wanted = [p for p in params if p.requires_grad] if allow_nograd else params
    try:
        found = torch.autograd.grad(
            loss,
            wanted,
            retain_graph=second_order,
            create_graph=second_order,
            allow_unused=allow_unused,
        )
    except RuntimeError as err:
        raise FparamsRuntimeError(
            f"could not differentiate the loss with respect to every parameter of the "
            f"module ({err}). If some parameters do not require grad, pass allow_nograd=True; "
            f"if some do not take part in the loss, pass allow_unused=True."
        ) from err
    if not allow_nograd:
        return list(found)
    it = iter(found)
    return [next(it) if p.requires_grad else None for p in params]


def _check_rates(lrs: object, model: nn.Module, params: Sequence[Tensor]) -> Sequence[Tensor]:
    """``MetaSGD``'s ``lrs``: one tensor per tensor of ``model.parameters()``, of its shape."""
    if isinstance(lrs, (Tensor, str, Mapping)) or not isinstance(lrs, Iterable):
        raise FparamsTypeError(
            f"`lrs` must be a list with one rate tensor per tensor of model.parameters(); "
            f"got {describe(lrs)}."
        )
    rates = list(lrs)
    if len(rates) != len(params):
        raise FparamsValueError(
            f"got {len(rates)} learning-rate tensors for {len(params)} parameters; "
            f"give one per tensor of model.parameters()."
        )
    names = [k for k, _ in model.named_parameters()]
    for i, (rate, p) in enumerate(zip(rates, params)):
        if not isinstance(rate, Tensor) or rate.shape != p.shape:
            kind = FparamsValueError if isinstance(rate, Tensor) else FparamsTypeError
            got = f"shape {tuple(rate.shape)}" if isinstance(rate, Tensor) else describe(rate)
            raise kind(
                f"`lrs[{i}]` (for parameter {names[i]!r}) must be a tensor of the parameter's shape "
                f"{tuple(p.shape)}; got {got}."
            )
    if isinstance(lrs, nn.ParameterList):  # kept: its Parameters stay registered on the learner
        return lrs  # type: ignore[return-value]  # a ParameterList is a sequence of tensors
    return rates


class _Learner(nn.Module):
    """What both learners share: ``forward`` runs ``self.module``, and other
    attributes fall back to the module's, as learn2learn's ``BaseLearner`` does."""

    module: nn.Module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _leaves_before_adapt(self) -> List[Tuple[Tensor, int, Optional[Tensor], int]]:
        """The module's own (leaf) parameters that this adapt replaces; checks earlier ones first.

        ``adapt`` on the learner that holds the meta-parameters (not on a
        ``clone()``) replaces them by adapted tensors whose graph starts at
        them. Once ``backward()`` has run through that graph (the leaves got
        a ``.grad``) or an optimizer changed them in place, every backward
        through the adapted tensors can only fail, later, with torch's
        in-place or freed-graph error. That is reported here, at the next
        ``adapt``, where the fix is clear.
        """
        for p, version, grad, grad_version in self.__dict__.get("_adapted_leaves", ()):
            stepped = tensor_version(p) != version
            backwarded = p.grad is not grad or (grad is not None and tensor_version(grad) != grad_version)
            if stepped or backwarded:
                what = "changed in place (an optimizer step)" if stepped else "used by backward()"
                raise FparamsRuntimeError(
                    f"this {type(self).__name__} was adapted itself, not a clone, and its "
                    f"original parameters have since been {what}; any backward through the adapted "
                    f"module would now fail (torch's freed-graph or in-place error). Call .clone() "
                    f"first and adapt the clone, one per task: learner = "
                    f"{type(self).__name__.lower()}.clone(); learner.adapt(loss). The object you "
                    f"cloned keeps the meta-parameters."
                )
        return [
            (p, tensor_version(p), p.grad, -1 if p.grad is None else tensor_version(p.grad))
            for p in self.module.parameters()
            if p.is_leaf and p.requires_grad
        ]

    def _remember_leaves(self, leaves: List[Tuple[Tensor, int, Optional[Tensor], int]]) -> None:
        if leaves:  # a clone's parameters are not leaves: nothing to watch
            self.__dict__["_adapted_leaves"] = leaves

    def __deepcopy__(self, memo: Dict[int, Any]) -> Any:
        """``copy.deepcopy`` of a learner whose tensors are leaves (the meta-learner); a clone or an
        adapted learner holds tensors inside the autograd graph, which torch cannot deep-copy."""
        attached = [k for k, t in self.module.named_parameters() if not t.is_leaf]
        if attached:
            raise FparamsRuntimeError(
                f"this {type(self).__name__} holds parameters inside the autograd graph (a clone() or "
                f"an adapted learner: {', '.join(repr(k) for k in attached[:3])}"
                f"{' ...' if len(attached) > 3 else ''}), and torch deep-copies only graph leaves. "
                f"Deep-copy the {type(self).__name__} that holds the meta-parameters and clone() the "
                f"copy, or call fparams.detach_module(learner.module) first (which cuts the graph).",
                function=f"{type(self).__name__}.__deepcopy__",
            )
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))  # type: ignore[no-untyped-call]
        return new

    def __getattr__(self, name: str) -> Any:
        # learn2learn's learners fall back to the wrapped module's attributes.
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None:
                raise
            return getattr(module, name)


class MAML(_Learner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017), learn2learn's API.

    Args:
        model: the module to meta-learn.
        lr: the inner-loop learning rate (a number or tensor), or an
            ``fparams.optim`` optimizer for a differentiable inner optimizer.
        first_order: use first-order MAML (no gradients through the inner
            gradients).
        allow_unused: allow parameters the loss does not use (they get no
            update); defaults to ``allow_nograd``.
        allow_nograd: skip parameters with ``requires_grad=False``.

    Examples:
        >>> import torch, fparams
        >>> maml = fparams.MAML(torch.nn.Linear(2, 1), lr=0.1)
        >>> learner = maml.clone()
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> learner.adapt((learner(x) - y).pow(2).mean())
        >>> (learner(x) - y).pow(2).mean().backward()  # meta-gradient into maml
        >>> maml.module.weight.grad is not None
        True
    """

    @public("MAML")
    def __init__(
        self,
        model: nn.Module,
        lr: Any,
        first_order: bool = False,
        allow_unused: Optional[bool] = None,
        allow_nograd: bool = False,
    ):
        super().__init__()
        check_instance("model", model, nn.Module, "a torch.nn.Module")
        _check_lr(lr, model)
        _check_flags(first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd)
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused
        self._opt_state: Any = None
        self._is_clone = False

    @public("MAML.adapt")
    def adapt(
        self,
        loss: Tensor,
        first_order: Optional[bool] = None,
        allow_unused: Optional[bool] = None,
        allow_nograd: Optional[bool] = None,
    ) -> None:
        """One differentiable gradient step of ``self.module`` on ``loss``, in place.

        Adapt a ``clone()`` per task. Adapting the ``MAML`` object itself works
        as in learn2learn (its module then holds the adapted tensors), but
        once a backward or an optimizer step has used its original
        parameters, a further ``adapt`` raises a RuntimeError that says so,
        rather than letting the next backward fail with torch's in-place or
        freed-graph error.
        """
        _check_flags(first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd)
        _check_loss(loss)
        first_order = self.first_order if first_order is None else first_order
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        if allow_unused is None:
            allow_unused = self.allow_unused or allow_nograd
        leaves = self._leaves_before_adapt()
        grads = _grads(self.module, loss, not first_order, allow_unused, allow_nograd)
        if _is_optimizer(self.lr):
            updates = self._optimizer_updates(grads)
        else:
            updates = [None if g is None else -self.lr * g for g in grads]
        self.module = _update_module(self.module, updates)
        self._remember_leaves(leaves)

    def extra_repr(self) -> str:
        return f"lr={self.lr!r}, first_order={self.first_order}, clone={self._is_clone}"

    def _optimizer_updates(self, grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
        named = [(str(i), p) for i, p in enumerate(self.module.parameters())]
        params = {k: p for (k, p), g in zip(named, grads) if g is not None}
        given = {k: g for (k, _), g in zip(named, grads) if g is not None}
        if self._opt_state is None:
            self._opt_state = self.lr.init(params)
        updates, self._opt_state = self.lr.update(given, self._opt_state, params)
        return [updates.get(k) for k, _ in named]

    @public("MAML.clone")
    def clone(
        self,
        first_order: Optional[bool] = None,
        allow_unused: Optional[bool] = None,
        allow_nograd: Optional[bool] = None,
    ) -> MAML:
        """A learner whose module is :func:`fparams.clone_module` of this one."""
        _check_flags(first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd)
        learner = MAML(
            clone_module(self.module),
            lr=self.lr,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
        )
        learner._is_clone = True
        return learner


class MetaSGD(_Learner):
    """Meta-SGD (Li et al. 2017): MAML with one learned rate per parameter entry.

    ``lrs`` holds one rate tensor per tensor of ``model.parameters()``
    (initialised to ``lr``); the rates receive meta-gradients. Tied
    parameters are one tensor of ``parameters()``, so they share one rate and
    stay tied.

    Examples:
        >>> import torch, fparams
        >>> meta = fparams.MetaSGD(torch.nn.Linear(2, 1), lr=0.1)
        >>> learner = meta.clone()
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> learner.adapt((learner(x) - y).pow(2).mean())
        >>> (learner(x) - y).pow(2).mean().backward()
        >>> meta.lrs[0].grad is not None
        True
    """

    @public("MetaSGD")
    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        lrs: Optional[Sequence[Tensor]] = None,
    ):
        super().__init__()
        check_instance("model", model, nn.Module, "a torch.nn.Module")
        check_flag("first_order", first_order)
        self.module = model
        params = list(model.parameters())
        if lrs is None:
            check_rate(lr, model)
            rates: Sequence[Tensor] = nn.ParameterList(  # type: ignore[assignment]
                [nn.Parameter(torch.ones_like(p) * lr) for p in params]
            )
        else:
            rates = _check_rates(lrs, model, params)
        self.lrs = rates
        self.first_order = first_order
        self._is_clone = False

    def extra_repr(self) -> str:
        ends = [float(f(r.detach())) for r in self.lrs for f in (torch.min, torch.max) if r.numel()]
        if not ends:
            rates = f"lrs={len(self.lrs)} tensors"
        elif min(ends) == max(ends):
            rates = f"lrs={len(self.lrs)} tensors of rate {min(ends):.3g}"
        else:
            rates = f"lrs={len(self.lrs)} tensors of rates from {min(ends):.3g} to {max(ends):.3g}"
        return f"{rates}, first_order={self.first_order}, clone={self._is_clone}"

    @public("MetaSGD.clone")
    def clone(self) -> MetaSGD:
        """A learner with a cloned module and cloned rates, still in the graph."""
        learner = MetaSGD(
            clone_module(self.module),
            lrs=[lr.clone() for lr in self.lrs],
            first_order=self.first_order,
        )
        learner._is_clone = True
        return learner

    @public("MetaSGD.adapt")
    def adapt(self, loss: Tensor, first_order: Optional[bool] = None) -> None:
        """One step ``p - lr * g`` with the learned rates, in place."""
        _check_flags(first_order=first_order)
        _check_loss(loss)
        first_order = self.first_order if first_order is None else first_order
        leaves = self._leaves_before_adapt()
        grads = _grads(self.module, loss, not first_order, False, False)
        updates = [None if g is None else -lr * g for lr, g in zip(self.lrs, grads)]
        self.module = _update_module(self.module, updates)
        self._remember_leaves(leaves)
