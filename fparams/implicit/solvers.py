"""Linear solvers over dicts of tensors: conjugate gradients, its normal equations, Neumann series.

Each factory (:func:`cg`, :func:`normal_cg`, :func:`neumann`) checks its
settings once and returns a :class:`LinearSolver`, ``solver(matvec, b) -> x``.
Every solver runs on all tasks at once under ``vmap``; its convergence checks
read the residuals of every task across the transform (``_peek``).

Non-finite values (the rule, per task under ``vmap``): a right-hand side with
a NaN or an infinity gives a solution that is NaN everywhere, never zeros or
another finite guess. :func:`cg` and :func:`normal_cg` do the same when the
operator returns a non-finite value during the solve; :func:`neumann` cannot
tell that from a diverging series and raises :class:`NotConvergedError`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .._checks import check_callable, check_flag, check_int, check_positive, describe
from .._errors import FparamsRuntimeError, FparamsTypeError, FparamsValueError, public
from .._torch_compat import FUNCTORCH, is_compiling
from .._types import Params, TensorDict

__all__ = ["LinearSolver", "NotConvergedError", "cg", "neumann", "normal_cg"]

#: A solution or a right-hand side: a tensor or a dict of tensors.
Tree = Union[Tensor, TensorDict]
#: ``matvec(x) -> A x`` over dicts of tensors.
MatVec = Callable[[Params], Params]


class NotConvergedError(FparamsRuntimeError):
    """A linear solver of :mod:`fparams.implicit` did not converge, or cannot on this system.

    The message names the solver, the residual it reached and what to change.
    It is an :class:`fparams.FparamsRuntimeError` (so also a ``RuntimeError``).

    Examples:
        >>> import torch, fparams
        >>> solve = fparams.implicit.cg(maxiter=1, tol=1e-12)
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> try:
        ...     solve(lambda x: {"x": A @ x["x"]}, {"x": torch.tensor([1.0, 0.0])})
        ... except fparams.implicit.NotConvergedError as err:
        ...     print(str(err)[:40])
        fparams.implicit.cg: no convergence afte
    """


# -- small helpers over dicts of tensors ------------------------------------------------------


def _dot(a: TensorDict, b: TensorDict) -> Tensor:
    # One scalar per task under vmap: the sum over every entry.
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def _peek(t: Tensor) -> Optional[Tensor]:
    """The values of ``t`` for every task at once (all functorch wrappers removed).

    Reading them (for a convergence check) does not enter any computation.
    None under ``torch.compile`` or where torch lacks the internals: the checks
    are then skipped.
    """
    if FUNCTORCH is None or is_compiling():  # pragma: no cover - depends on the torch build
        return None
    while FUNCTORCH.is_wrapped(t):
        t = FUNCTORCH.get_unwrapped(t)
    return t.detach()


def _worst(ratio: Tensor) -> Optional[float]:
    """The largest value of a per-task scalar over all tasks, or None if unreadable."""
    seen = _peek(ratio)
    return None if seen is None else float(seen.max())


def _ratio(num: Tensor, den: Tensor, keep: Tensor) -> Tensor:
    """``num / den`` where ``keep``, else 0 (no division by a masked-out value)."""
    return torch.where(keep, num / torch.where(keep, den, 1), 0)


def _nan_where_not(finite: Tensor, x: Params) -> Params:
    """The non-finite rule: a task whose solve saw a non-finite value gets NaN everywhere."""
    return {k: torch.where(finite, t, math.nan) for k, t in x.items()}


def _as_dict(name: str, tree: object) -> Tuple[Params, bool]:
    if isinstance(tree, Tensor):
        tensors: Dict[str, Any] = {"": tree}
    elif isinstance(tree, Mapping):
        tensors = dict(tree)
    else:
        raise FparamsTypeError(f"`{name}` must be a tensor or a dict of tensors; got {describe(tree)}.")
    for k, t in tensors.items():
        at = name if k == "" else f"{name}[{k!r}]"
        if not isinstance(t, Tensor):
            raise FparamsTypeError(f"`{at}` must be a tensor; got {describe(t)}.")
        if not t.is_floating_point():
            raise FparamsTypeError(f"`{at}` must be a floating tensor; got dtype {t.dtype}.")
    return tensors, isinstance(tree, Tensor)


def _shapes(d: TensorDict) -> str:
    return "{" + ", ".join(f"{k!r}: {tuple(t.shape)}" for k, t in sorted(d.items())) + "}"


# -- the solver object -----------------------------------------------------------------------


class LinearSolver:
    """A linear solver: ``solver(matvec, b) -> x`` with ``matvec(x) ≈ b``.

    ``b`` and ``x`` are tensors or dicts of tensors; ``matvec`` takes and
    returns the same structure. Made by :func:`cg`, :func:`normal_cg` or
    :func:`neumann`; the repr shows its settings.

    Examples:
        >>> import fparams
        >>> fparams.implicit.cg(maxiter=20)
        cg(maxiter=20, tol=1e-06)
    """

    def __init__(self, name: str, run: Callable[..., Params], **options: Any) -> None:
        self.name = name
        self.options = options
        self._run = run
        self._solve = public(f"implicit.{name}")(self._checked_solve)

    def __call__(self, matvec: Callable[[Any], Any], b: Tree, *, symmetric: bool = False) -> Tree:
        """Solve ``matvec(x) = b``; ``symmetric=True`` says that the operator is its own transpose."""
        return self._solve(matvec, b, symmetric)

    def _checked_solve(self, matvec: Callable[[Any], Any], b: Tree, symmetric: bool) -> Tree:
        check_callable("matvec", matvec, "x -> A x")
        check_flag("symmetric", symmetric)
        rhs, single = _as_dict("b", b)
        if not rhs:
            raise FparamsValueError("`b` is an empty dict: give at least one tensor to solve for.")

        def dict_matvec(x: Params) -> Params:
            out = matvec(x[""] if single else x)
            got, _ = _as_dict("matvec(x)", {"": out} if single and isinstance(out, Tensor) else out)
            if got.keys() != x.keys() or any(got[k].shape != x[k].shape for k in x):
                raise FparamsValueError(
                    f"`matvec(x)` must return the keys and shapes of `b`; got "
                    f"{_shapes(got)} for {_shapes(x)}."
                )
            return got

        x = self._run(dict_matvec, rhs, symmetric=symmetric, **self.options)
        return x[""] if single else x

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not (k == "strict" and v))
        return f"{self.name}({shown})"


# -- conjugate gradients -----------------------------------------------------------------------

_CG_FIX = (
    "For a non-symmetric or indefinite system use solve=fparams.implicit.normal_cg(...); "
    "in iMAML, a larger `lam` makes the system positive definite."
)
_NORMAL_FIX = "The system may be singular: check the optimality condition."


def _cg_run(matvec: MatVec, b: Params, maxiter: int, tol: float, strict: bool, fix: str) -> Params:
    # Conjugate gradients on every task at once. A task that has converged
    # stops moving (its step size is masked to 0), and the loop ends when all
    # have converged: the residuals are read across the vmap (see _peek). A
    # task that meets a non-finite value stops too, and ends as NaN (the
    # module docstring's rule). strict=False: the iterate after maxiter steps.
    x = {k: torch.zeros_like(t) for k, t in b.items()}
    r, p = dict(b), dict(b)
    bb = _dot(b, b)
    finite = torch.isfinite(bb)
    goal = bb * tol**2
    rs = bb
    worst: Optional[float] = None
    for i in range(maxiter + 1):
        active = finite & (rs > goal)
        worst = _worst(_ratio(rs, bb, finite & (bb > 0)))
        if worst is not None and worst <= tol**2:
            return _nan_where_not(finite, x)
        if i == maxiter:
            break
        ap = matvec(p)
        pap = _dot(p, ap)
        finite = finite & torch.isfinite(pap)
        active = active & finite
        curvature = _worst(torch.where(active, -pap, -1)) if strict else None
        if curvature is not None and curvature >= 0:
            raise NotConvergedError(
                f"the system is not positive definite (p^T A p = {-curvature:.3g} <= 0 at "
                f"iteration {i + 1}), which conjugate gradients need. {fix}"
            )
        alpha = _ratio(rs, pap, active & (pap != 0))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        finite = finite & torch.isfinite(rs_new)
        beta = _ratio(rs_new, rs, active & finite)
        p = {k: r[k] + beta * p[k] for k in p}
        rs = rs_new
    if worst is None or not strict:  # unreadable residuals (torch.compile), or asked not to check
        return _nan_where_not(finite, x)
    raise NotConvergedError(
        f"no convergence after {maxiter} iterations: relative residual "
        f"{math.sqrt(worst):.3g} > tol {tol:g}. Raise `maxiter`, loosen `tol` (a larger value), "
        f"or pass strict=False to accept the last iterate. {fix}"
    )


def _cg(matvec: MatVec, b: Params, maxiter: int, tol: float, strict: bool, symmetric: bool) -> Params:
    return _cg_run(matvec, b, maxiter, tol, strict, _CG_FIX)


def _normal_cg(matvec: MatVec, b: Params, maxiter: int, tol: float, strict: bool, symmetric: bool) -> Params:
    # A x = b through A^T A x = A^T b. A^T is A itself where the caller says
    # so (a Hessian), else a vjp of the linear matvec (at zero: the point does
    # not matter for a linear map).
    if symmetric:
        rmatvec = matvec
    else:
        transpose = torch.func.vjp(matvec, {k: torch.zeros_like(t) for k, t in b.items()})[1]

        def rmatvec(y: Params) -> Params:
            out: Params = transpose(y)[0]
            return out

    # A^T b can hide an infinity of b (inf - inf = NaN, or a zero row): check b itself
    finite = torch.isfinite(_dot(b, b))
    x = _cg_run(lambda v: rmatvec(matvec(v)), rmatvec(b), maxiter, tol, strict, _NORMAL_FIX)
    return _nan_where_not(finite, x)


def _neumann(matvec: MatVec, b: Params, steps: int, alpha: float, symmetric: bool) -> Params:
    # A^{-1} b = alpha * sum_k (I - alpha A)^k b, for ||I - alpha A|| < 1.
    term, total = dict(b), dict(b)
    for _ in range(steps - 1):
        a_term = matvec(term)
        term = {k: term[k] - alpha * a_term[k] for k in term}
        total = {k: total[k] + term[k] for k in total}
    bb = _dot(b, b)
    finite = torch.isfinite(bb)  # a non-finite b gives NaN (the rule), it is not divergence
    growth = _worst(_ratio(_dot(term, term), bb, finite & (bb > 0)))
    if growth is not None and (growth > 1 or not math.isfinite(growth)):
        raise NotConvergedError(
            f"the series diverges: its last term is {math.sqrt(growth):.3g} times the "
            f"right-hand side after {steps} steps. Lower `alpha` (below 2 / the largest eigenvalue "
            f"of the system), or use fparams.implicit.cg(...)."
        )
    return _nan_where_not(finite, {k: alpha * t for k, t in total.items()})


# -- the factories -----------------------------------------------------------------------------


@public("implicit.cg")
def cg(maxiter: int = 100, tol: float = 1e-6, *, strict: bool = True) -> LinearSolver:
    """Conjugate gradients, for symmetric positive definite systems (the default).

    Stops when ``||b - A x|| <= tol * ||b||``, for every task under ``vmap``
    (all tasks iterate until the last has converged; a converged task no
    longer moves). Raises :class:`NotConvergedError` if some task has not
    converged after ``maxiter`` iterations, or if the system shows a
    direction of non-positive curvature. A non-finite ``b``, or a non-finite
    value of ``matvec``, gives a NaN solution (for that task).

    Args:
        maxiter: the most iterations (at least 1; the default does not depend
            on the size of the system).
        tol: relative tolerance on the residual, > 0.
        strict: raise where the solve fails. ``strict=False`` returns the
            iterate after at most ``maxiter`` iterations instead, without the
            curvature check: iMAML's practice of a few fixed CG steps
            (Rajeswaran et al. use 5), an approximation by choice.

    Returns:
        A :class:`LinearSolver`: ``solver(matvec, b) -> x``.

    Examples:
        >>> import torch, fparams
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> x = fparams.implicit.cg()(lambda x: A @ x, torch.tensor([1.0, 2.0]))
        >>> torch.allclose(A @ x, torch.tensor([1.0, 2.0]))
        True
        >>> fparams.implicit.cg()(lambda x: 2 * x, torch.tensor([float("nan"), 1.0]))
        tensor([nan, nan])
    """
    return LinearSolver("cg", _cg, **_cg_options(maxiter, tol, strict))


@public("implicit.normal_cg")
def normal_cg(maxiter: int = 100, tol: float = 1e-6, *, strict: bool = True) -> LinearSolver:
    """Conjugate gradients on the normal equations ``A^T A x = A^T b``, for any invertible ``A``.

    ``A^T`` is obtained as a vjp of ``matvec`` (which must be linear and made
    of torch operations). Each iteration costs two matrix-vector products and
    the conditioning is squared, so prefer :func:`cg` for symmetric systems.
    Raises :class:`NotConvergedError` as :func:`cg` does; the tolerance applies
    to the normal equations' residual. Non-finite values give NaN, as in :func:`cg`.

    Args:
        maxiter: the most iterations (at least 1).
        tol: relative tolerance on the normal equations' residual, > 0.
        strict: raise where the solve fails; ``strict=False`` returns the
            iterate after at most ``maxiter`` iterations instead.

    Returns:
        A :class:`LinearSolver`: ``solver(matvec, b) -> x``.

    Examples:
        >>> import torch, fparams
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
        >>> x = fparams.implicit.normal_cg()(lambda x: A @ x, torch.tensor([3.0, 1.0]))
        >>> torch.allclose(x, torch.tensor([1.0, 1.0]), atol=1e-5)
        True
    """
    return LinearSolver("normal_cg", _normal_cg, **_cg_options(maxiter, tol, strict))


def _cg_options(maxiter: object, tol: object, strict: object) -> Dict[str, Any]:
    check_int("maxiter", maxiter, 1)
    check_positive("tol", tol)
    check_flag("strict", strict)
    return {"maxiter": int(maxiter), "tol": float(tol), "strict": bool(strict)}  # type: ignore[call-overload, arg-type]


@public("implicit.neumann")
def neumann(steps: int = 20, alpha: float = 1.0) -> LinearSolver:
    """The truncated Neumann series ``alpha * sum_{k<steps} (I - alpha A)^k b``.

    It approximates ``A^{-1} b`` where the eigenvalues of ``A`` lie in
    ``(0, 2 / alpha)``; the error shrinks geometrically with ``steps``. It
    uses ``steps - 1`` matrix-vector products and no dot products, and it
    raises :class:`NotConvergedError` where the series visibly diverges (its
    last term larger than ``b``, or not finite). A non-finite ``b`` gives a
    NaN solution (for that task).

    Args:
        steps: number of terms, at least 1.
        alpha: the step size, > 0.

    Returns:
        A :class:`LinearSolver`: ``solver(matvec, b) -> x``.

    Examples:
        >>> import torch, fparams
        >>> A = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
        >>> x = fparams.implicit.neumann(steps=60, alpha=0.8)(lambda x: A @ x, torch.tensor([1.0, 1.0]))
        >>> torch.allclose(A @ x, torch.tensor([1.0, 1.0]), atol=1e-5)
        True
    """
    check_int("steps", steps, 1)
    check_positive("alpha", alpha)
    return LinearSolver("neumann", _neumann, steps=int(steps), alpha=float(alpha))


#: The factories themselves: passing one uncalled as `solve` is a common slip.
FACTORIES = (cg, normal_cg, neumann)
