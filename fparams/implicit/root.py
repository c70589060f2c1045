"""``custom_root``: differentiate a solver by the implicit function theorem, never through its steps.

Where ``sol`` solves ``optimality_fn(sol, *args) == 0``, a cotangent ``v`` of
``sol`` becomes the gradient ``-(dF/d args)^T u`` with ``(dF/d sol)^T u = v``
(``F = optimality_fn``), solved by a linear solver that only calls vjps of
``F``. One ``autograd.Function`` node holds it; ``torch.func`` runs its
forward and backward itself (``generate_vmap_rule``).
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from .._checks import check_callable, check_flag, describe
from .._errors import FparamsTypeError, FparamsValueError, public
from .._torch_compat import import_dynamo_if_lazy_import_breaks, tree_flatten, tree_leaves, tree_unflatten
from .._types import Params
from .solvers import FACTORIES, LinearSolver, cg

import_dynamo_if_lazy_import_breaks()  # before custom_root's autograd.Function runs under vmap

__all__ = ["custom_root"]


class _Call:
    """Everything about one call of a decorated solver that is not a tensor input."""

    def __init__(
        self,
        name: str,
        solver: Callable[..., Any],
        optimality_fn: Callable[..., Any],
        solve: Callable[..., Any],
        has_aux: bool,
        symmetric: bool,
    ) -> None:
        self.name = name  # the public function that errors found here are reported under
        self.solver = solver
        self.optimality_fn = optimality_fn
        self.solve = solve
        self.has_aux = has_aux
        self.symmetric = symmetric  # dF/d sol is symmetric (F is a gradient)
        self.leaves: List[Any] = []  # of (init, args), tensors replaced at tensor_at
        self.spec: Any = None
        self.tensor_at: List[int] = []
        self.sol_spec: Any = None
        self.num_sol = 0
        self.aux_spec: Any = None
        self.aux_leaves: List[Any] = []
        self.aux_tensor_at: List[int] = []

    def bind(self, init: Any, args: Tuple[Any, ...]) -> List[Tensor]:
        """Remember the non-tensor inputs; return the tensor ones (the node's inputs)."""
        leaves, self.spec = tree_flatten((init, args))
        self.tensor_at = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]
        self.leaves = [None if isinstance(t, Tensor) else t for t in leaves]
        return [leaves[i] for i in self.tensor_at]

    def inputs(self, tensors: Sequence[Tensor]) -> Tuple[Any, Tuple[Any, ...]]:
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_at, tensors):
            leaves[i] = t
        init, args = tree_unflatten(leaves, self.spec)
        return init, tuple(args)

    def type_error(self, message: str) -> FparamsTypeError:
        return FparamsTypeError(message, function=self.name)

    def value_error(self, message: str) -> FparamsValueError:
        return FparamsValueError(message, function=self.name)


def _flat_solution(call: _Call, sol: Any) -> Tuple[List[Tensor], Any]:
    if not (
        isinstance(sol, Tensor)
        or (isinstance(sol, Mapping) and sol and all(isinstance(t, Tensor) for t in sol.values()))
    ):
        raise call.type_error(
            "the solver must return a tensor or a non-empty dict of tensors (with "
            f"has_aux=True: a pair (solution, aux)); got {describe(sol)}."
        )
    leaves, spec = tree_flatten(sol if isinstance(sol, Tensor) else dict(sol))
    return leaves, spec


def _split_aux(call: _Call, out: Any) -> Tuple[Any, List[Tensor]]:
    if not call.has_aux:
        return out, []
    if not (isinstance(out, tuple) and len(out) == 2):
        raise call.type_error(
            f"with has_aux=True the solver must return (solution, aux); got {describe(out)}."
        )
    out, aux = out
    aux_leaves, call.aux_spec = tree_flatten(aux)
    call.aux_tensor_at = [i for i, t in enumerate(aux_leaves) if isinstance(t, Tensor)]
    call.aux_leaves = [None if isinstance(t, Tensor) else t for t in aux_leaves]
    return out, [aux_leaves[i].detach() for i in call.aux_tensor_at]


class _ImplicitFunction(torch.autograd.Function):
    # A functorch-compatible autograd.Function: torch.func.grad and vmap run
    # forward and backward themselves (generate_vmap_rule), plain autograd
    # records it as one node. The solver runs with grad off; backward is the
    # implicit function theorem through vjps of the optimality condition.
    generate_vmap_rule = True

    @staticmethod
    def forward(call: _Call, *tensors: Tensor) -> Tuple[Tensor, ...]:
        init, args = call.inputs(tensors)
        with torch.no_grad():
            out, aux_tensors = _split_aux(call, call.solver(init, *args))
        sol, call.sol_spec = _flat_solution(call, out)
        call.num_sol = len(sol)
        # an input returned as it is (a solver that took no step) is copied: an
        # output of the node must be a tensor of its own
        ids = {id(t) for t in tensors}
        sol = [t.clone() if id(t) in ids else t.detach() for t in sol]
        return (*sol, *aux_tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
        call = inputs[0]
        ctx.call = call
        ctx.save_for_backward(*inputs[1:], *output[: call.num_sol])
        if len(output) > call.num_sol:
            ctx.mark_non_differentiable(*output[call.num_sol :])

    @staticmethod
    def backward(ctx: Any, *cotangents: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        n_in = len(saved) - call.num_sol
        tensors, sol_leaves = saved[:n_in], saved[n_in:]
        needs = getattr(ctx, "needs_input_grad", None)  # per input of apply, `call` first
        wanted = None if needs is None else {at for at, need in zip(call.tensor_at, needs[1:]) if need}
        grads = _implicit_vjp(call, list(tensors), list(sol_leaves), cotangents[: call.num_sol], wanted)
        return (None, *grads)


def _implicit_vjp(
    call: _Call,
    tensors: List[Tensor],
    sol_leaves: List[Tensor],
    cotangents: Sequence[Optional[Tensor]],
    wanted: Optional[Set[int]],
) -> List[Optional[Tensor]]:
    init, args = call.inputs(tensors)
    sol = tree_unflatten(sol_leaves, call.sol_spec)
    v = [torch.zeros_like(s) if c is None else c for s, c in zip(sol_leaves, cotangents)]
    # The arguments that get a gradient: floating tensors of args (not init)
    # that autograd asks for (`wanted`: indices of (init, args) leaves; None: all).
    num_init = len(tree_leaves(init))
    arg_leaves, arg_spec = tree_flatten(args)
    diff = [
        i
        for i, t in enumerate(arg_leaves)
        if isinstance(t, Tensor)
        and (t.is_floating_point() or t.is_complex())
        and (wanted is None or num_init + i in wanted)
    ]
    if not diff:  # nothing to differentiate by
        return [None for _ in call.tensor_at]

    def optimality(s: Any, *diff_values: Tensor) -> List[Tensor]:
        leaves = list(arg_leaves)
        for i, t in zip(diff, diff_values):
            leaves[i] = t
        out = call.optimality_fn(s, *tree_unflatten(leaves, arg_spec))
        return _check_residual(call, out, sol)

    diff_values = [arg_leaves[i] for i in diff]
    # (dF/d sol)^T u = v; the graph behind the Hessian-vector products is freed on return
    u = _adjoint(call, lambda s: optimality(s, *diff_values), sol, v)
    vjp_args = torch.func.vjp(lambda *d: optimality(sol, *d), *diff_values)[1]
    found = vjp_args([-t for t in u])
    arg_grads: List[Optional[Tensor]] = [None] * len(arg_leaves)
    for i, g in zip(diff, found):
        arg_grads[i] = g
    # back to the order of the Function's tensor inputs: init's tensors get none
    by_leaf: List[Optional[Tensor]] = [None for _ in range(num_init)]
    by_leaf.extend(arg_grads)
    return [by_leaf[i] for i in call.tensor_at]


def _adjoint(call: _Call, fn: Callable[[Any], List[Tensor]], sol: Any, v: List[Tensor]) -> List[Tensor]:
    vjp_sol = torch.func.vjp(fn, sol)[1]

    def matvec(u: Params) -> Params:  # (dF/d sol)^T u
        (back,) = vjp_sol([u[str(i)] for i in range(len(v))])
        return {str(i): t for i, t in enumerate(tree_leaves(back))}

    b = {str(i): t for i, t in enumerate(v)}
    if isinstance(call.solve, LinearSolver):
        u = call.solve(matvec, b, symmetric=call.symmetric)
    else:
        u = call.solve(matvec, b)
    if not (isinstance(u, Mapping) and set(u) == set(b) and all(isinstance(t, Tensor) for t in u.values())):
        raise call.type_error(
            f"`solve(matvec, b)` must return a dict of tensors with the keys of `b` "
            f"({sorted(b)}); got {describe(u)}."
        )
    for k, t in b.items():
        if u[k].shape != t.shape:
            raise call.value_error(
                f"`solve(matvec, b)` returned shape {tuple(u[k].shape)} for key {k!r} of `b`, "
                f"which has shape {tuple(t.shape)}."
            )
    return [u[str(i)] for i in range(len(v))]


def _check_residual(call: _Call, out: Any, sol: Any) -> List[Tensor]:
    if isinstance(out, Mapping) and isinstance(sol, Mapping) and set(out) == set(sol):
        out = {k: out[k] for k in sol}  # the solution's key order
    leaves, spec = tree_flatten(out if not isinstance(out, Mapping) else dict(out))
    if spec != call.sol_spec or not all(isinstance(t, Tensor) for t in leaves):
        raise call.value_error(
            f"`optimality_fn(sol, *args)` must return the structure of the solution "
            f"({_describe(sol)}); got {_describe(out)}."
        )
    for a, b in zip(leaves, tree_leaves(sol)):
        if a.shape != b.shape:
            raise call.value_error(
                f"`optimality_fn(sol, *args)` must return one value per entry of the "
                f"solution; got shape {tuple(a.shape)} for a solution entry of shape {tuple(b.shape)}."
            )
    return leaves


def _describe(tree: Any) -> str:
    if isinstance(tree, Tensor):
        return f"a tensor of shape {tuple(tree.shape)}"
    if isinstance(tree, Mapping):
        return f"a dict with keys {sorted(tree)}"
    return type(tree).__name__


@public("implicit.custom_root")
def custom_root(
    optimality_fn: Callable[..., Any],
    *,
    solve: Optional[Callable[..., Any]] = None,
    has_aux: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Differentiate a solver by the implicit function theorem, never through its steps.

    Decorates ``solver(init, *args) -> sol``, where ``sol`` (a tensor or a
    dict of tensors) satisfies ``optimality_fn(sol, *args) == 0`` (same
    structure as ``sol``). The decorated solver runs ``solver`` with grad
    off; gradients of ``sol`` with respect to every floating tensor in
    ``args`` (tensors, or dicts and other pytrees of tensors) come from
    ``-(dF/d sol)^{-T}`` applied by the linear solver ``solve`` through vjps
    of ``F = optimality_fn``, which is never materialised as a matrix.
    ``init`` receives no gradient. Tensors that ``optimality_fn`` or
    ``solver`` capture from outside also receive none: pass them in ``args``.

    It works under ``.backward()``, ``torch.func.grad`` and ``torch.func.vmap``
    (one solve per task: :func:`fparams.map_tasks`); second derivatives
    differentiate the linear solve (accurate to its tolerance). Forward mode
    (``torch.func.jvp``) is not implemented. A non-finite cotangent or
    optimality condition gives NaN gradients (the solvers' rule), never zeros.

    Args:
        optimality_fn: ``optimality_fn(sol, *args)``, zero at the solution.
            For a minimiser of ``f(sol, *args)``, its gradient in ``sol``.
        solve: a linear solver ``solve(matvec, b) -> x`` over dicts of
            tensors (:func:`cg`, the default, needs ``dF/d sol`` symmetric
            positive definite; otherwise use :func:`normal_cg`).
        has_aux: the solver returns ``(sol, aux)``; ``aux`` is returned as
            is, detached.

    Returns:
        A decorator; the decorated function has the solver's signature.

    Examples:
        >>> import torch, fparams
        >>> # ridge regression, solved by gradient descent; its gradient in lam is implicit
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> grad_f = lambda w, lam: X.T @ (X @ w - y) + lam * w
        >>> @fparams.implicit.custom_root(grad_f)
        ... def ridge(w, lam):
        ...     for _ in range(500):
        ...         w = w - 0.02 * grad_f(w, lam)
        ...     return w
        >>> lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> w = ridge(torch.zeros(3, dtype=torch.float64), lam)
        >>> w.sum().backward()
        >>> A = X.T @ X + lam.detach() * torch.eye(3, dtype=torch.float64)
        >>> exact = -torch.linalg.solve(A, torch.linalg.solve(A, X.T @ y)).sum()
        >>> bool(torch.allclose(lam.grad, exact))
        True
    """
    check_callable("optimality_fn", optimality_fn, "optimality_fn(sol, *args)")
    check_solve(solve)
    check_flag("has_aux", has_aux)
    decorate = root_decorator(
        "implicit.custom_root", optimality_fn, cg() if solve is None else solve, has_aux, symmetric=False
    )
    return public("implicit.custom_root")(decorate)


def check_solve(solve: object) -> None:
    """``solve`` is None or a solver ``solve(matvec, b)``, not a solver factory left uncalled."""
    if solve is None:
        return
    for factory in FACTORIES:
        if solve is factory:
            name = factory.__name__
            raise FparamsTypeError(
                f"`solve` is the solver factory fparams.implicit.{name} itself; "
                f"call it to make a solver, e.g. solve=fparams.implicit.{name}()."
            )
    if isinstance(solve, type):
        raise FparamsTypeError(
            f"`solve` is the class {solve.__name__}; pass a solver such as fparams.implicit.cg(maxiter=50)."
        )
    check_callable("solve", solve, "linear solver such as fparams.implicit.cg(maxiter=50)")


def root_decorator(
    name: str,
    optimality_fn: Callable[..., Any],
    linear_solve: Callable[..., Any],
    has_aux: bool,
    symmetric: bool,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`custom_root` without its checks; errors found later are reported under ``name``."""

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        check_callable("solver", solver, "solver(init, *args) -> sol (decorate a solver)")

        def solved(init: Any, *args: Any) -> Any:
            call = _Call(name, solver, optimality_fn, linear_solve, has_aux, symmetric)
            outs = _ImplicitFunction.apply(call, *call.bind(init, args))  # type: ignore[no-untyped-call]
            sol = tree_unflatten(list(outs[: call.num_sol]), call.sol_spec)
            if not has_aux:
                return sol
            aux_leaves = list(call.aux_leaves)
            for i, t in zip(call.aux_tensor_at, outs[call.num_sol :]):
                aux_leaves[i] = t
            return sol, tree_unflatten(aux_leaves, call.aux_spec)

        solved.__name__ = getattr(solver, "__name__", "solver")
        solved.__doc__ = getattr(solver, "__doc__", None)
        return solved

    return decorator
