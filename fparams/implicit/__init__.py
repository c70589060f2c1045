"""Implicit differentiation: gradients of a solution from its optimality condition.

Where ``sol`` solves ``optimality_fn(sol, *args) == 0``, the implicit function
theorem gives its Jacobian with respect to ``args`` without differentiating
the solver that found it:

    d sol / d args = -(dF/d sol)^{-1} dF/d args,    F = optimality_fn.

A backward pass needs only vector products with that Jacobian: for a
cotangent ``v`` of ``sol``, solve ``(dF/d sol)^T u = v`` with a linear solver
that calls ``u -> (dF/d sol)^T u`` (a vjp of ``F``), then ``-(dF/d args)^T u``
(one more vjp) is the gradient of the arguments. Memory is that of a few
evaluations of ``F``, however many steps the solver took.

* :func:`custom_root` (``root.py``) decorates a solver ``solver(init, *args) -> sol``.
* :func:`cg` (the default), :func:`normal_cg` and :func:`neumann` (``solvers.py``)
  are linear solvers over dicts of tensors; they raise :class:`NotConvergedError`
  where they can tell that they failed, and turn a non-finite input into a NaN
  solution, never into zeros (see ``docs/guides/implicit.md``).
* :func:`adapt` (``imaml.py``) is iMAML (Rajeswaran et al., 2019): the inner loop
  of :func:`fparams.adapt` made implicit, its meta-gradient from the optimality
  condition of a proximally regularised task loss.

All of it composes with ``torch.func.vmap`` (:func:`fparams.map_tasks`),
``torch.func.grad`` and ``.backward()`` (reverse mode; forward mode,
``torch.func.jvp`` / ``jacfwd``, is not implemented). The backward pass is
itself made of differentiable torch operations, so second derivatives
(``create_graph=True``, ``grad`` of ``grad``) differentiate the linear
solve: they are exact up to the solver's tolerance.

Examples:
    >>> import torch, fparams
    >>> def solver(init, a):  # the root of x^3 - a, by Newton's method
    ...     x = init
    ...     for _ in range(30):
    ...         x = x - (x**3 - a) / (3 * x**2)
    ...     return x
    >>> cube_root = fparams.implicit.custom_root(lambda x, a: x**3 - a)(solver)
    >>> a = torch.tensor([8.0], dtype=torch.float64, requires_grad=True)
    >>> cube_root(torch.ones(1, dtype=torch.float64), a).backward()
    >>> a.grad  # 1 / (3 a^(2/3))
    tensor([0.0833], dtype=torch.float64)
"""

from .imaml import adapt
from .root import custom_root
from .solvers import LinearSolver, NotConvergedError, cg, neumann, normal_cg

__all__ = [
    "LinearSolver",
    "NotConvergedError",
    "adapt",
    "cg",
    "custom_root",
    "neumann",
    "normal_cg",
]
