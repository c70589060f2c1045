"""The inner gradient of :func:`fparams.adapt`, by the cheapest exact route.

``torch.func.grad`` works everywhere: under ``vmap``, under an outer
``torch.func.grad`` and under ``torch.compile``. It pays for that with a
wrapper level around every tensor, which costs time on every op, forward and
backward. Two common cases need no such level:

* no functorch transform is active (a plain loop over tasks, or one task):
  ``torch.autograd.grad(create_graph=True)`` computes the same gradient;
* the only active transform is one ``vmap`` (``map_tasks`` over tasks, eager):
  the per-task losses are independent, so the gradient of their *sum* with
  respect to per-task copies of the parameters is every task's own gradient.
  The loss runs at the vmap level on those copies, which autograd sees as the
  physical batched tensors beneath, and one ``torch.autograd.grad``, taken
  with the vmap level set aside, gives all tasks' gradients at once: the
  hand-batched computation, done for any network.

:func:`grad_route` picks the route once per ``adapt`` call. The second route
uses functorch internals; where they are missing (another torch version) or
anything else is active (an outer ``torch.func.grad``, ``jvp``,
``functionalize``, nested ``vmap``, ``torch.compile`` tracing, inference
mode) it answers ``"func"`` and ``torch.func.grad`` runs. All routes give the same
numbers up to float rounding; ``tests/test_grads.py`` checks them against
each other.

Where the gradient is taken with ``create_graph=True`` (a second-order step),
:func:`inner_grad` runs the forward and backward under
:func:`fparams._kernels.second_order_kernels` (attention on a kernel that has
a double backward), and walks the graph of the first gradient it returns once
for ops that have none (``_kernels.check_double_backward``). First-order steps
run as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, List

import torch
from torch import Tensor

from ._errors import FparamsValueError
from ._kernels import check_double_backward, second_order_kernels
from ._torch_compat import FUNCTORCH, is_compiling
from ._types import Params

# The functorch internals, probed once in _torch_compat (None where this torch lacks them).
_ft: Any = FUNCTORCH
_VMAP: Any = None if FUNCTORCH is None else FUNCTORCH.VMAP

#: The public function these routes serve (its errors name it even where it is called from
#: another public function, e.g. inside a map_tasks task or implicit.adapt's solver).
_ADAPT = "adapt"

#: ``fn(fast, *args, owned=False) -> grads of fn's scalar output with respect to
#: fast``; ``owned=True`` says that ``fast`` holds tensors the inner loop made
#: itself (every step after the first), used nowhere else.
GradFn = Callable[..., Params]


def grad_route() -> str:
    """``"autograd"``, ``"vmap"`` or ``"func"``: how ``adapt`` takes its inner gradients now.

    The caller also takes ``"func"`` where grad mode is on and none of its
    inputs requires grad: the fast routes differentiate by fresh leaves, whose
    graph would otherwise stay attached to the results.
    """
    if is_compiling() or torch.is_inference_mode_enabled():
        return "func"  # inference tensors cannot be recorded by autograd
    if _ft is None:  # pragma: no cover - depends on the torch build
        return "func"
    stack = _ft.interpreter_stack()
    if not stack:
        return "autograd"
    if len(stack) == 1 and stack[0].key() == _VMAP:
        return "vmap"
    return "func"


def vmap_active() -> bool:
    """Is a ``vmap`` on the functorch stack (or might one be: under ``torch.compile``)?"""
    if _ft is None or is_compiling():  # pragma: no cover - depends on the torch build
        return True
    stack = _ft.interpreter_stack()
    return bool(stack) and any(i.key() == _VMAP for i in stack)


def unbatched_under_vmap(t: Tensor) -> bool:
    """Is ``t`` shared by all tasks of the one active ``vmap`` (the ``"vmap"`` route)?"""
    if _ft is None or is_compiling():  # pragma: no cover - depends on the torch build
        return False
    stack = _ft.interpreter_stack()
    if not stack or len(stack) != 1 or stack[0].key() != _VMAP:
        return False
    return bool(_ft.maybe_get_level(t) != stack[0].level())


def _inputs(tensors: Dict[str, Tensor], fresh: Collection[str] = ()) -> Dict[str, Tensor]:
    """The tensors to differentiate by: a graph node of its own per key.

    A tensor that requires grad gets a view: the gradient then counts only the
    uses of this key, not other uses of the same tensor (a closure over the
    outer params, a frozen key holding it, a second key), exactly as
    ``torch.func.grad`` counts them, and the view stays connected to the outer
    graph. Keys in ``fresh`` hold tensors that nothing else uses (made by the
    inner loop's previous step, or a new per-task view) and need no view. A
    tensor that does not require grad becomes a new leaf that does.
    """
    return {
        k: (t if k in fresh else t.view_as(t)) if t.requires_grad else t.detach().requires_grad_()
        for k, t in tensors.items()
    }


def _check_scalar(loss: Any, per_task: bool) -> None:
    want = 1 if per_task else 0  # on the vmap route, dim 0 holds the tasks
    if not isinstance(loss, Tensor) or loss.dim() != want:
        got = f"shape {tuple(loss.shape[want:])}" if isinstance(loss, Tensor) else type(loss).__name__
        raise FparamsValueError(
            f"`loss_fn` must return a scalar tensor (reduce it, e.g. .mean()); got {got}.", function=_ADAPT
        )


def _gradients(loss: Tensor, inputs: Dict[str, Tensor], create_graph: bool) -> List[Tensor]:
    # For per-task losses, ones as grad_outputs: the gradient of their sum, without a sum node.
    ones = torch.ones_like(loss)
    grads = torch.autograd.grad(
        loss, list(inputs.values()), ones, create_graph=create_graph, allow_unused=True
    )
    # torch.func.grad's convention: an input the loss does not use gets zeros.
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs.values(), grads)]


def autograd_grad(fn: Callable[..., Tensor], create_graph: bool) -> GradFn:
    """The ``"autograd"`` route: ``torch.autograd.grad`` with no transform active."""
    check = _checker(create_graph)

    def grad_fn(fast: Params, *args: Any, owned: bool = False) -> Params:
        with torch.enable_grad():
            inputs = _inputs(fast, fast.keys() if owned else ())
            loss = fn(inputs, *args)
            _check_scalar(loss, per_task=False)
            if not loss.requires_grad:  # it does not depend on the inputs
                return {k: torch.zeros_like(t) for k, t in inputs.items()}
            return dict(zip(inputs, check(_gradients(loss, inputs, create_graph))))

    return grad_fn


def vmapped_grad(fn: Callable[..., Tensor], create_graph: bool) -> GradFn:
    """The ``"vmap"`` route: every task's gradient from one ``torch.autograd.grad``.

    ``fn`` runs at the active vmap level itself, on the per-task parameters
    wrapped as batched tensors, so autograd records the physical batched ops;
    the gradient of the physical per-task losses' sum is then taken with the
    vmap level set aside. Call it only where :func:`grad_route` says ``"vmap"``,
    under that vmap: its level and batch size are read once, here.
    """
    interp: Any = _ft.current_interpreter()
    level, n = interp.level(), interp.batch_size()
    check = _checker(create_graph)

    def grad_fn(fast: Params, *args: Any, owned: bool = False) -> Params:
        with torch.enable_grad():
            with _ft.pop_interpreter():  # requires_grad_ is refused under vmap
                per_task = {k: _per_task(t, level, n) for k, t in fast.items()}
                # a shared (unbatched) param's per-task expand is a new view already
                fresh = fast.keys() if owned else {k for k, t in fast.items() if not _batched(t, level)}
                inputs = _inputs(per_task, fresh)
            loss = fn({k: _ft.add_batch_dim(t, 0, level) for k, t in inputs.items()}, *args)
            if not isinstance(loss, Tensor):
                _check_scalar(loss, per_task=False)
            if _batched(loss, level):
                losses, dim = _ft.unwrap_batched(loss, level)
                _check_scalar(losses.movedim(int(dim), 0), per_task=True)
            else:  # the same for every task: it cannot depend on the per-task inputs
                _check_scalar(loss, per_task=False)
                losses = loss
            with _ft.pop_interpreter():
                if losses.requires_grad:
                    grads = check(_gradients(losses, inputs, create_graph))
                else:
                    grads = [torch.zeros_like(t) for t in inputs.values()]
        return {k: _ft.add_batch_dim(g, 0, level) for k, g in zip(inputs, grads)}

    return grad_fn


def _batched(t: Tensor, level: int) -> bool:
    return bool(_ft.maybe_get_level(t) == level)


def _per_task(t: Tensor, level: int, n: int) -> Tensor:
    # The physical tensor under the vmap level with the tasks on dim 0; an
    # unbatched (shared) tensor gets a per-task view, so each task has its own gradient.
    if not _batched(t, level):
        return t.expand(n, *t.shape)
    value: Tensor
    value, dim = _ft.unwrap_batched(t, level)
    return value if dim == 0 else value.movedim(int(dim), 0)


def func_grad(fn: Callable[..., Tensor]) -> GradFn:
    """The ``"func"`` route: ``torch.func.grad``, which composes with every transform."""
    grad = torch.func.grad(fn)

    def grad_fn(fast: Params, *args: Any, owned: bool = False) -> Params:
        grads: Params = grad(fast, *args)
        return grads

    return grad_fn


def _checker(create_graph: bool) -> Callable[[List[Tensor]], List[Tensor]]:
    """Returns its gradients; the first ones a second-order step makes are checked for ops
    without a double backward (one graph walk per gradient function, not per step)."""
    pending = [create_graph and not is_compiling()]

    def check(grads: List[Tensor]) -> List[Tensor]:
        if pending[0]:
            pending[0] = False
            check_double_backward(grads, "fparams")
        return grads

    return check


def _math_attention(grad_fn: GradFn) -> GradFn:
    """``grad_fn`` with attention on a kernel that has a double backward (see ``_kernels``)."""

    def run(fast: Params, *args: Any, owned: bool = False) -> Any:
        with second_order_kernels():
            return grad_fn(fast, *args, owned=owned)

    return run


def inner_grad(fn: Callable[..., Tensor], route: str, create_graph: bool) -> GradFn:
    """The gradient function of ``fn(fast, *args)`` with respect to ``fast``, by ``route``.

    With ``create_graph`` (the gradient will be differentiated again) the
    forward and backward run under :func:`fparams._kernels.second_order_kernels`.
    """
    if route == "autograd":
        grad_fn = autograd_grad(fn, create_graph)
    elif route == "vmap":
        grad_fn = vmapped_grad(fn, create_graph)
    else:
        grad_fn = func_grad(fn)
    return _math_attention(grad_fn) if create_graph else grad_fn


def split_aux(out: Any) -> Any:
    """``loss_fn``'s ``(loss, aux)`` pair, checked (``adapt(..., has_aux=True)``)."""
    if not (isinstance(out, tuple) and len(out) == 2):
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise FparamsValueError(
            f"has_aux=True needs `loss_fn` to return a pair (loss, aux); got {got}. "
            f"Return `loss, aux`, or drop has_aux.",
            function=_ADAPT,
        )
    return out


def inner_grad_with_aux(fn: Callable[..., Any], route: str, create_graph: bool) -> GradFn:
    """:func:`inner_grad` for ``fn(fast, *args) -> (loss, aux)``; its function returns ``(grads, aux)``.

    On the ``"func"`` route ``torch.func.grad(has_aux=True)`` returns the aux
    unwrapped from its level. The other routes open no level, so the aux
    computed by the loss is returned as it is.
    """
    if route == "func":
        grad = torch.func.grad(lambda fast, *a: split_aux(fn(fast, *a)), has_aux=True)

        def func_fn(fast: Params, *args: Any, owned: bool = False) -> Any:
            return grad(fast, *args)

        return _math_attention(func_fn) if create_graph else func_fn
    box: List[Any] = []

    def loss_only(fast: Params, *args: Any) -> Tensor:
        loss: Tensor
        loss, aux = split_aux(fn(fast, *args))
        box.append(aux)
        return loss

    plain = inner_grad(loss_only, route, create_graph)

    def grad_fn(fast: Params, *args: Any, owned: bool = False) -> Any:
        box.clear()
        grads = plain(fast, *args, owned=owned)
        return grads, box.pop()

    return grad_fn
