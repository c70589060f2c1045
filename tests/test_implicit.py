"""fparams.implicit against closed forms in float64: ridge regression, iMAML on
linear regression, the linear solvers; every strategy of map_tasks; every error."""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import torch
from torch import Tensor

import fparams
from fparams import implicit
from tests.helpers import assert_untouched, snapshot

D = torch.float64
TIGHT = implicit.cg(maxiter=200, tol=1e-12)
N, DIM = 12, 3


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# --------------------------------------------------------------------------
# Ridge regression: w(lam) = (X^T X + lam I)^{-1} X^T y
# --------------------------------------------------------------------------


def _ridge_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, DIM, generator=g, dtype=D), torch.randn(N, generator=g, dtype=D)


def _ridge_closed(X: Tensor, y: Tensor, lam: Tensor) -> Tensor:
    return torch.linalg.solve(X.T @ X + lam * torch.eye(DIM, dtype=D), X.T @ y)


def _ridge_solver(grad_f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def solver(w: Tensor, lam: Tensor, X: Tensor, y: Tensor) -> Tensor:
        step = 1.0 / float(torch.linalg.eigvalsh(X.T @ X).max() + lam)
        for _ in range(2000):
            w = w - step * grad_f(w, lam, X, y)
        return w

    return solver


def _ridge_grad(w: Tensor, lam: Tensor, X: Tensor, y: Tensor) -> Tensor:
    return X.T @ (X @ w - y) + lam * w


RIDGE = implicit.custom_root(_ridge_grad, solve=TIGHT)(_ridge_solver(_ridge_grad))


def test_ridge_solution_and_its_gradient_in_the_regulariser_match_the_closed_form() -> None:
    X, y = _ridge_data()
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    w = RIDGE(torch.zeros(DIM, dtype=D), lam, X, y)
    torch.testing.assert_close(w, _ridge_closed(X, y, lam.detach()), rtol=1e-10, atol=0)
    v = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    (w @ v).backward()
    lam_ref = lam.detach().clone().requires_grad_()
    (exact,) = torch.autograd.grad(_ridge_closed(X, y, lam_ref) @ v, lam_ref)
    assert _rel(lam.grad, exact) < 1e-5


def test_ridge_gradients_in_the_data_by_backward_and_by_torch_func_grad() -> None:
    X, y = _ridge_data(1)
    lam = torch.tensor(0.3, dtype=D)

    def through_root(X: Tensor, y: Tensor) -> Tensor:
        return RIDGE(torch.zeros(DIM, dtype=D), lam, X, y).pow(2).sum()

    def closed(X: Tensor, y: Tensor) -> Tensor:
        return _ridge_closed(X, y, lam).pow(2).sum()

    gx, gy = torch.func.grad(through_root, argnums=(0, 1))(X, y)
    rx, ry = torch.func.grad(closed, argnums=(0, 1))(X, y)
    assert _rel(gx, rx) < 1e-5 and _rel(gy, ry) < 1e-5
    Xl = X.clone().requires_grad_()
    through_root(Xl, y).backward()
    assert _rel(Xl.grad, rx) < 1e-5


def test_dict_solution_and_nested_dict_arguments() -> None:
    X, y = _ridge_data(2)

    def grad_f(w: Dict[str, Tensor], hyper: Dict[str, Tensor], data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        r = data["X"] @ w["a"] + w["b"] - data["y"]
        return {"a": data["X"].T @ r + hyper["lam"] * w["a"], "b": r.sum() + hyper["lam"] * w["b"]}

    def solver(w: Dict[str, Tensor], hyper: Dict[str, Tensor], data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        for _ in range(3000):
            g = grad_f(w, hyper, data)
            w = {k: w[k] - 0.02 * g[k] for k in w}
        return w

    def grad_f_reordered(w: Dict[str, Tensor], hyper: Dict[str, Tensor], data: Dict[str, Tensor]):
        g = grad_f(w, hyper, data)
        return {"b": g["b"], "a": g["a"]}  # keys in another order than the solution's

    root = implicit.custom_root(grad_f_reordered, solve=TIGHT)(solver)
    lam = torch.tensor(0.5, dtype=D, requires_grad=True)
    init = {"a": torch.zeros(DIM, dtype=D), "b": torch.zeros((), dtype=D)}
    w = root(init, {"lam": lam}, {"X": X, "y": y})
    assert sorted(w) == ["a", "b"]
    (w["a"].sum() + w["b"]).backward()

    def closed(lam: Tensor) -> Tensor:  # the bias joins the design matrix
        Z = torch.cat([X, torch.ones(N, 1, dtype=D)], 1)
        sol = torch.linalg.solve(Z.T @ Z + lam * torch.eye(DIM + 1, dtype=D), Z.T @ y)
        return sol.sum()

    exact = torch.func.grad(closed)(lam.detach())
    assert _rel(lam.grad, exact) < 1e-5


def test_gradcheck_of_a_scalar_root() -> None:
    # x^3 = a, so dx/da = 1 / (3 a^(2/3)); the 0-dim case is where torchopt's cg ran 0 iterations
    def newton(x: Tensor, a: Tensor) -> Tensor:
        for _ in range(60):
            x = x - (x**3 - a) / (3 * x**2)
        return x

    root = implicit.custom_root(lambda x, a: x**3 - a, solve=TIGHT)(newton)
    a = torch.tensor(5.0, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: root(torch.tensor(1.0, dtype=D), a), (a,))
    (g,) = torch.autograd.grad(root(torch.tensor(1.0, dtype=D), a), a)
    assert abs(float(g) - 1 / (3 * 5.0 ** (2 / 3))) < 1e-12


def test_has_aux_returns_the_aux_detached() -> None:
    def solver(x: Tensor, a: Tensor):
        count = 0
        for _ in range(60):
            x = x - (x**3 - a) / (3 * x**2)
            count += 1
        return x, {"iterations": count, "x2": x * x}

    root = implicit.custom_root(lambda x, a: x**3 - a, has_aux=True)(solver)
    a = torch.tensor([8.0, 27.0], dtype=D, requires_grad=True)
    x, aux = root(torch.ones(2, dtype=D), a)
    assert aux["iterations"] == 60 and not aux["x2"].requires_grad
    torch.testing.assert_close(aux["x2"], torch.tensor([4.0, 9.0], dtype=D))
    x.sum().backward()
    torch.testing.assert_close(a.grad, 1 / (3 * a.detach() ** (2 / 3)))


def test_second_derivatives_differentiate_the_linear_solve() -> None:
    X, y = _ridge_data()
    lam = torch.tensor(0.7, dtype=D)
    by_root = torch.func.grad(torch.func.grad(lambda lam: RIDGE(torch.zeros(DIM, dtype=D), lam, X, y).sum()))
    closed = torch.func.grad(torch.func.grad(lambda lam: _ridge_closed(X, y, lam).sum()))
    assert _rel(by_root(lam), closed(lam)) < 1e-8
    leaf = lam.clone().requires_grad_()
    (g,) = torch.autograd.grad(RIDGE(torch.zeros(DIM, dtype=D), leaf, X, y).sum(), leaf, create_graph=True)
    (gg,) = torch.autograd.grad(g, leaf)
    assert _rel(gg, closed(lam)) < 1e-8


def test_a_solver_that_takes_no_step_still_gets_a_node_of_its_own() -> None:
    a = torch.tensor([4.0], dtype=D, requires_grad=True)
    root = implicit.custom_root(lambda x, a: x - a)(lambda x, a: x)
    x0 = a.detach().clone()
    x = root(x0, a)
    x.sum().backward()
    assert x is not x0 and float(a.grad) == 1.0


# --------------------------------------------------------------------------
# iMAML on linear regression: phi = (C + lam I)^{-1} (X^T y / n + lam theta),
# C = X^T X / n, so d phi / d theta = lam (C + lam I)^{-1}
# --------------------------------------------------------------------------


def _mse(p: Dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (X @ p["w"] + p["b"] - y).pow(2).mean()


def _design(X: Tensor) -> Tensor:
    return torch.cat([X, torch.ones(*X.shape[:-1], 1, dtype=D)], -1)


def _imaml_closed(p: Dict[str, Tensor], X: Tensor, y: Tensor, lam: Any) -> Dict[str, Tensor]:
    Z = _design(X)
    theta = torch.cat([p["w"], p["b"].reshape(1)])
    A = Z.T @ Z / len(y) + lam * torch.eye(DIM + 1, dtype=D)
    phi = torch.linalg.solve(A, Z.T @ y / len(y) + lam * theta)
    return {"w": phi[:DIM], "b": phi[DIM]}


def _tasks(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, N, DIM, generator=g, dtype=D)
        if i % 2 == 0
        else torch.randn(n, N, generator=g, dtype=D)
        for i in range(4)
    ]


def _params(seed: int = 0) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(DIM, generator=g, dtype=D), "b": torch.randn((), generator=g, dtype=D)}


def _imaml(p: Dict[str, Tensor], X: Tensor, y: Tensor, lam: Any, **kw: Any) -> Dict[str, Tensor]:
    return implicit.adapt(_mse, p, X, y, lam=lam, lr=0.5, steps=200, solve=TIGHT, **kw)


def test_imaml_adapted_params_and_their_jacobian_match_the_closed_form() -> None:
    Xs, ys, _, _ = (t[0] for t in _tasks(1))
    params = _params()
    lam = 2.0
    before = snapshot(params)
    phi = _imaml(params, Xs, ys, lam)
    assert_untouched(params, before)
    ref = _imaml_closed(params, Xs, ys, lam)
    for k in ref:
        torch.testing.assert_close(phi[k], ref[k], rtol=1e-10, atol=1e-12)
    # The Jacobian, column by column (jacrev vmaps the implicit backward)
    jac = torch.func.jacrev(lambda p: _imaml(p, Xs, ys, lam)["w"])(params)
    Z = _design(Xs)
    exact = lam * torch.linalg.inv(Z.T @ Z / N + lam * torch.eye(DIM + 1, dtype=D))
    assert _rel(jac["w"], exact[:DIM, :DIM]) < 1e-5
    assert _rel(jac["b"], exact[:DIM, DIM]) < 1e-5


def _meta_loss(adapt_fn: Callable[..., Dict[str, Tensor]], lam: Any) -> Callable[..., Tensor]:
    def task(p: Dict[str, Tensor], Xs: Tensor, ys: Tensor, Xq: Tensor, yq: Tensor) -> Tensor:
        return _mse(adapt_fn(p, Xs, ys, lam), Xq, yq)

    return task


def test_imaml_meta_gradient_to_params_and_lam_matches_the_closed_form() -> None:
    batch = [t[0] for t in _tasks(1, seed=3)]
    params = {k: t.requires_grad_() for k, t in _params(3).items()}
    lam = torch.tensor(1.5, dtype=D, requires_grad=True)
    _meta_loss(_imaml, lam)(params, *batch).backward()
    ref_p = {k: t.detach().clone().requires_grad_() for k, t in params.items()}
    ref_lam = lam.detach().clone().requires_grad_()
    _meta_loss(_imaml_closed, ref_lam)(ref_p, *batch).backward()
    for k in params:
        assert _rel(params[k].grad, ref_p[k].grad) < 1e-5, k
    assert _rel(lam.grad, ref_lam.grad) < 1e-5


STRATEGIES = [("vmap", {}), ("loop", {}), ("chunked", {"chunk_size": 2})]


@pytest.mark.parametrize("strategy, options", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_imaml_over_tasks_every_strategy_matches_the_closed_form_loop(strategy: str, options: Any) -> None:
    batches = _tasks(5, seed=4)
    lam = torch.tensor(1.0, dtype=D, requires_grad=True)
    params = {k: t.requires_grad_() for k, t in _params(4).items()}
    mapped = fparams.map_tasks(_meta_loss(_imaml, lam), strategy=strategy, **options)
    losses = mapped(params, *batches)
    grads = torch.autograd.grad(losses.mean(), [*params.values(), lam])
    reference = fparams.map_tasks(_meta_loss(_imaml_closed, lam), strategy="loop")(params, *batches)
    ref_grads = torch.autograd.grad(reference.mean(), [*params.values(), lam])
    torch.testing.assert_close(losses, reference, rtol=1e-10, atol=0)
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 1e-5


@pytest.mark.parametrize("filter", [None, "w"])
def test_imaml_vmap_equals_loop(filter: Any) -> None:
    batches = _tasks(4, seed=5)
    params = _params(5)

    def imaml(p: Dict[str, Tensor], X: Tensor, y: Tensor, lam: Any) -> Dict[str, Tensor]:
        return _imaml(p, X, y, lam, filter=filter)

    out = {}
    for strategy in ("vmap", "loop"):
        step = fparams.meta_value_and_grad(_meta_loss(imaml, 0.8), strategy=strategy)
        out[strategy] = step(params, *batches)
    torch.testing.assert_close(out["vmap"][0], out["loop"][0], rtol=1e-12, atol=0)
    for k in params:
        torch.testing.assert_close(out["vmap"][1][k], out["loop"][1][k], rtol=1e-9, atol=1e-14)


def test_imaml_inside_torch_func_grad_and_meta_value_and_grad() -> None:
    batches = _tasks(3, seed=6)
    params = _params(6)
    reference = torch.func.grad(
        lambda p: fparams.map_tasks(_meta_loss(_imaml_closed, 0.5), strategy="loop")(p, *batches).mean()
    )(params)
    by_func = torch.func.grad(
        lambda p: fparams.map_tasks(_meta_loss(_imaml, 0.5), strategy="vmap")(p, *batches).mean()
    )(params)
    _, by_step = fparams.meta_value_and_grad(_meta_loss(_imaml, 0.5))(
        {k: t.clone().requires_grad_() for k, t in params.items()}, *batches
    )
    for k in params:
        assert _rel(by_func[k], reference[k]) < 1e-5
        assert _rel(by_step[k], reference[k]) < 1e-5


def test_imaml_filter_adapts_only_the_selected_params() -> None:
    Xs, ys, Xq, yq = (t[0] for t in _tasks(1, seed=7))
    lam = 1.0
    params = {k: t.requires_grad_() for k, t in _params(7).items()}
    phi = _imaml(params, Xs, ys, lam, filter="w")
    assert phi["b"] is params["b"]
    _mse(phi, Xq, yq).backward()

    def closed(p: Dict[str, Tensor]) -> Tensor:  # only w adapts; b enters its solution
        A = Xs.T @ Xs / N + lam * torch.eye(DIM, dtype=D)
        w = torch.linalg.solve(A, Xs.T @ (ys - p["b"]) / N + lam * p["w"])
        return _mse({"w": w, "b": p["b"]}, Xq, yq)

    ref = torch.func.grad(closed)({k: t.detach() for k, t in params.items()})
    for k in params:
        assert _rel(params[k].grad, ref[k]) < 1e-5, k


def test_imaml_with_an_optimizer_converges_to_the_same_solution() -> None:
    Xs, ys, _, _ = (t[0] for t in _tasks(1, seed=8))
    params = _params(8)
    phi = implicit.adapt(_mse, params, Xs, ys, lam=1.0, lr=fparams.optim.sgd(0.3, momentum=0.5), steps=200)
    ref = _imaml_closed(params, Xs, ys, 1.0)
    for k in ref:
        torch.testing.assert_close(phi[k], ref[k], rtol=1e-8, atol=1e-10)


def test_imaml_with_per_parameter_rates_and_a_neumann_solve() -> None:
    batch = [t[0] for t in _tasks(1, seed=11)]
    params = {k: t.requires_grad_() for k, t in _params(11).items()}
    rates = {"w": torch.tensor(0.4, dtype=D), "b": torch.tensor(0.2, dtype=D)}
    solve = implicit.neumann(steps=300, alpha=0.3)

    def imaml(p: Dict[str, Tensor], X: Tensor, y: Tensor, lam: Any) -> Dict[str, Tensor]:
        return implicit.adapt(_mse, p, X, y, lam=lam, lr=rates, steps=300, solve=solve)

    _meta_loss(imaml, 1.0)(params, *batch).backward()
    ref = {k: t.detach().clone().requires_grad_() for k, t in params.items()}
    _meta_loss(_imaml_closed, 1.0)(ref, *batch).backward()
    for k in params:
        assert _rel(params[k].grad, ref[k].grad) < 1e-5, k


def test_imaml_gradcheck() -> None:
    Xs, ys, Xq, yq = (t[0, :5] for t in _tasks(1, seed=9))
    w = torch.randn(DIM, dtype=D, requires_grad=True)
    lam = torch.tensor(1.0, dtype=D, requires_grad=True)

    def f(w: Tensor, lam: Tensor) -> Tensor:
        p = {"w": w, "b": torch.zeros((), dtype=D)}
        phi = implicit.adapt(_mse, p, Xs, ys, lam=lam, lr=0.5, steps=300, solve=TIGHT)
        return _mse(phi, Xq, yq)

    assert torch.autograd.gradcheck(f, (w, lam))


# --------------------------------------------------------------------------
# Linear solvers
# --------------------------------------------------------------------------


def _spd(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=D)
    return M @ M.T + n * torch.eye(n, dtype=D)


SOLVERS = {
    "cg": implicit.cg(maxiter=50, tol=1e-12),
    "normal_cg": implicit.normal_cg(maxiter=100, tol=1e-12),
    "neumann": implicit.neumann(steps=400, alpha=0.05),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_on_dicts_match_torch_linalg_solve(name: str) -> None:
    A, B = _spd(4, 0), _spd(2, 1)
    b = {"x": torch.randn(2, 2, dtype=D), "y": torch.randn(2, dtype=D)}
    x = SOLVERS[name](lambda v: {"x": (A @ v["x"].reshape(4)).reshape(2, 2), "y": B @ v["y"]}, b)
    torch.testing.assert_close(x["x"].reshape(4), torch.linalg.solve(A, b["x"].reshape(4)))
    torch.testing.assert_close(x["y"], torch.linalg.solve(B, b["y"]))


def test_normal_cg_solves_a_non_symmetric_system() -> None:
    A = _spd(4) + torch.triu(torch.ones(4, 4, dtype=D), 1) * 3
    b = torch.randn(4, dtype=D)
    x = implicit.normal_cg(tol=1e-12)(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


def test_cg_on_a_scalar_runs_and_solves() -> None:
    # torchopt's cg ran maxiter = b.numel() - 1 = 0 iterations here and returned zeros
    x = implicit.cg()(lambda v: 4.0 * v, torch.tensor(2.0, dtype=D))
    assert float(x) == 0.5


def test_cg_under_vmap_converges_per_task() -> None:
    As = torch.stack([_spd(3, s) * (s + 1) for s in range(4)])
    bs = torch.randn(4, 3, dtype=D)
    bs[2] = 0  # a task that has converged from the start
    solve = implicit.cg(tol=1e-12)
    xs = torch.func.vmap(lambda A, b: solve(lambda v: A @ v, b))(As, bs)
    torch.testing.assert_close(xs, torch.linalg.solve(As, bs))


def test_solver_reprs_show_their_settings() -> None:
    assert repr(implicit.cg(maxiter=5, tol=1e-3)) == "cg(maxiter=5, tol=0.001)"
    assert repr(implicit.normal_cg()) == "normal_cg(maxiter=100, tol=1e-06)"
    assert repr(implicit.neumann(steps=3, alpha=0.5)) == "neumann(steps=3, alpha=0.5)"
    assert repr(implicit.cg(strict=False)) == "cg(maxiter=100, tol=1e-06, strict=False)"


def test_strict_false_returns_the_last_iterate_without_raising() -> None:
    A = _spd(6)
    b = torch.ones(6, dtype=D)
    x = implicit.cg(maxiter=2, tol=1e-10, strict=False)(lambda v: A @ v, b)
    assert 0 < _rel(A @ x, b) < 1  # better than zero, not converged
    indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=D))
    x = implicit.cg(maxiter=2, strict=False)(lambda v: indefinite @ v, torch.tensor([1.0, 0.5], dtype=D))
    torch.testing.assert_close(x, torch.tensor([1.0, -0.5], dtype=D))  # 2 steps solve a 2x2 system


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_cg_raises_when_it_does_not_converge() -> None:
    A = _spd(6)
    with pytest.raises(
        implicit.NotConvergedError,
        match=r"fparams\.implicit\.cg: no convergence after 2 iterations: relative residual .* > tol 1e-10\. "
        r"Raise `maxiter`, loosen `tol`.*normal_cg",
    ):
        implicit.cg(maxiter=2, tol=1e-10)(lambda v: A @ v, torch.ones(6, dtype=D))


def test_cg_under_vmap_raises_when_one_task_does_not_converge() -> None:
    As = torch.stack([torch.eye(6, dtype=D), _spd(6) * torch.arange(1.0, 7.0, dtype=D)])
    with pytest.raises(implicit.NotConvergedError, match="no convergence after 2 iterations"):
        torch.func.vmap(lambda A, b: implicit.cg(maxiter=2)(lambda v: A @ v, b))(
            As, torch.ones(2, 6, dtype=D)
        )


def test_cg_rejects_an_indefinite_system() -> None:
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=D))
    with pytest.raises(
        implicit.NotConvergedError,
        match=r"fparams\.implicit\.cg: the system is not positive "
        r"definite .*normal_cg",
    ):
        implicit.cg()(lambda v: A @ v, torch.tensor([0.0, 1.0], dtype=D))


def test_neumann_raises_when_the_series_diverges() -> None:
    A = _spd(3)
    with pytest.raises(
        implicit.NotConvergedError,
        match=r"fparams\.implicit\.neumann: the series diverges.*"
        r"Lower `alpha`",
    ):
        implicit.neumann(steps=10, alpha=1.0)(lambda v: A @ v, torch.ones(3, dtype=D))


def test_a_non_converging_backward_raises_through_imaml() -> None:
    Xs, ys, Xq, yq = (t[0] for t in _tasks(1, seed=10))
    params = {k: t.requires_grad_() for k, t in _params(10).items()}
    phi = implicit.adapt(
        _mse, params, Xs, ys, lam=1.0, lr=0.5, steps=50, solve=implicit.cg(maxiter=1, tol=1e-14)
    )
    with pytest.raises(
        implicit.NotConvergedError, match="fparams.implicit.cg: no convergence after 1 iterations"
    ):
        _mse(phi, Xq, yq).backward()


BAD_SOLVER_ARGS = [
    (
        lambda: implicit.cg(maxiter=0),
        ValueError,
        r"fparams\.implicit\.cg: `maxiter` must be an int >= 1; got 0",
    ),
    (
        lambda: implicit.cg(maxiter=2.5),
        TypeError,
        r"fparams\.implicit\.cg: `maxiter` must be an int; got float 2\.5\.",
    ),
    (lambda: implicit.cg(maxiter=True), TypeError, r"`maxiter` must be an int; got bool True\."),
    (
        lambda: implicit.cg(tol=0.0),
        ValueError,
        r"fparams\.implicit\.cg: `tol` must be a finite number > 0; got 0\.0\.",
    ),
    (
        lambda: implicit.cg(tol="1e-3"),
        TypeError,
        r"fparams\.implicit\.cg: `tol` must be a number; got str '1e-3'\.",
    ),
    (lambda: implicit.normal_cg(maxiter=-1), ValueError, r"fparams\.implicit\.normal_cg: `maxiter`"),
    (
        lambda: implicit.cg(strict=None),
        TypeError,
        r"fparams\.implicit\.cg: `strict` must be True or False; got NoneType None\.",
    ),
    (
        lambda: implicit.neumann(steps=0),
        ValueError,
        r"fparams\.implicit\.neumann: `steps` must be an int >= 1",
    ),
    (
        lambda: implicit.neumann(alpha=float("inf")),
        ValueError,
        r"fparams\.implicit\.neumann: `alpha` must be",
    ),
    (
        lambda: implicit.cg()(3, torch.ones(2)),
        TypeError,
        r"fparams\.implicit\.cg: `matvec` must be a callable",
    ),
    (
        lambda: implicit.cg()(lambda v: v, [1.0]),
        TypeError,
        r"fparams\.implicit\.cg: `b` must be a tensor or a dict of tensors; got list",
    ),
    (
        lambda: implicit.cg()(lambda v: v[:1], torch.ones(2)),
        ValueError,
        r"fparams\.implicit\.cg: `matvec\(x\)` must return the keys and shapes of `b`",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD_SOLVER_ARGS)
def test_bad_solver_arguments(call: Callable[[], Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def _newton(x: Tensor, a: Tensor) -> Tensor:
    return x - (x**3 - a) / (3 * x**2)


BAD_ROOT_ARGS = [
    (lambda: implicit.custom_root(3), TypeError, r"fparams\.implicit\.custom_root: `optimality_fn` must be"),
    (
        lambda: implicit.custom_root(lambda x, a: x, solve="cg"),
        TypeError,
        r"fparams\.implicit\.custom_root: `solve` must be a callable linear solver",
    ),
    (
        lambda: implicit.custom_root(lambda x, a: x, has_aux=1),
        TypeError,
        r"`has_aux` must be True or False; got int 1\.",
    ),
    (lambda: implicit.custom_root(lambda x, a: x)(5), TypeError, r"decorate a solver"),
    (
        lambda: implicit.custom_root(lambda x, a: x)(lambda x, a: [x])(torch.ones(1), torch.ones(1)),
        TypeError,
        r"fparams\.implicit\.custom_root: the solver must return a tensor or a non-empty dict of tensors",
    ),
    (
        lambda: implicit.custom_root(lambda x, a: x, has_aux=True)(_newton)(torch.ones(1), torch.ones(1)),
        TypeError,
        r"with has_aux=True the solver must return \(solution, aux\)",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD_ROOT_ARGS)
def test_bad_custom_root_arguments(call: Callable[[], Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_an_optimality_fn_of_the_wrong_structure_is_named_at_backward() -> None:
    a = torch.ones(2, dtype=D, requires_grad=True)
    root = implicit.custom_root(lambda x, a: {"x": x - a})(lambda x, a: a.clone())
    with pytest.raises(
        ValueError,
        match=r"`optimality_fn\(sol, \*args\)` must return the structure of the "
        r"solution \(a tensor of shape \(2,\)\); got a dict with keys \['x'\]",
    ):
        root(torch.zeros(2, dtype=D), a).sum().backward()


BAD_ADAPT_ARGS = [
    (dict(loss_fn=3), TypeError, r"fparams\.implicit\.adapt: `loss_fn` must be a callable"),
    (
        dict(params=[torch.ones(1)]),
        TypeError,
        r"fparams\.implicit\.adapt: `params` must be a dict of tensors",
    ),
    (dict(steps=0), ValueError, r"fparams\.implicit\.adapt: `steps` must be an int >= 1; got 0"),
    (dict(steps=2.0), TypeError, r"`steps` must be an int; got float 2\.0\."),
    (
        dict(lam=-1.0),
        ValueError,
        r"fparams\.implicit\.adapt: `lam` must be a finite number > 0; got -1\.0\.",
    ),
    (dict(lam="big"), TypeError, r"fparams\.implicit\.adapt: `lam` must be a number; got str 'big'\."),
    (
        dict(lam=torch.tensor(1)),
        TypeError,
        r"`lam` must be a floating tensor or a number; got dtype torch.int64",
    ),
    (dict(lr="fast"), TypeError, r"fparams\.implicit\.adapt: `lr` must be a number, a tensor"),
    (dict(solve=5), TypeError, r"fparams\.implicit\.adapt: `solve` must be a callable linear solver"),
    (
        dict(filter=lambda name, t: False),
        ValueError,
        r"fparams\.implicit\.adapt: `filter` selects no parameter",
    ),
]


@pytest.mark.parametrize("override, error, message", BAD_ADAPT_ARGS, ids=lambda v: str(v)[:20])
def test_bad_adapt_arguments(override: Dict[str, Any], error: type, message: str) -> None:
    X, y = torch.randn(4, DIM, dtype=D), torch.randn(4, dtype=D)
    kw: Dict[str, Any] = dict(loss_fn=_mse, params=_params(), lam=1.0, lr=0.1, steps=2)
    kw.update(override)
    with pytest.raises(error, match=message):
        implicit.adapt(kw.pop("loss_fn"), kw.pop("params"), X, y, **kw)


def test_imaml_with_batchnorm_vmap_equals_loop() -> None:
    # vmap differentiates native batch_norm wrongly at second order (README); the
    # implicit backward must run its Hessian-vector products under exact_norms too
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 4),
        torch.nn.BatchNorm1d(4, track_running_stats=False),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 1),
    ).double()
    arch, params, _ = fparams.split(net)
    solve = implicit.normal_cg(maxiter=300, tol=1e-10)

    def loss(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return loss(implicit.adapt(loss, p, xs, ys, lam=3.0, lr=0.1, steps=100, solve=solve), xq, yq)

    g = torch.Generator().manual_seed(1)
    batch = [torch.randn(3, 6, 2 if i % 2 == 0 else 1, generator=g, dtype=D) for i in range(4)]
    grads = {}
    for strategy in ("vmap", "loop"):
        step = fparams.meta_value_and_grad(task, strategy=strategy, batch_stats=True)
        grads[strategy] = step(fparams.detach(params), *batch)[1]
    flat = {s: torch.cat([g.flatten() for g in grads[s].values()]) for s in grads}
    assert grads["loop"]["0.bias"].abs().max() < 1e-10  # BatchNorm cancels it
    assert _rel(flat["vmap"], flat["loop"]) < 1e-7


def test_docstring_examples_run() -> None:
    import doctest

    from fparams.implicit import imaml, root, solvers

    attempted = 0
    for module in (implicit, solvers, root, imaml):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted > 10


@pytest.mark.parametrize("factory", ["cg", "normal_cg", "neumann"])
def test_an_uncalled_solver_factory_is_refused_at_once(factory: str) -> None:
    made = getattr(implicit, factory)
    message = (
        rf"fparams\.implicit\.custom_root: `solve` is the solver factory fparams\.implicit\.{factory} "
        rf"itself; call it to make a solver, e\.g\. solve=fparams\.implicit\.{factory}\(\)\."
    )
    with pytest.raises(TypeError, match=message):
        implicit.custom_root(lambda x, a: x - a, solve=made)
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(TypeError, match=r"fparams\.implicit\.adapt: `solve` is the solver factory"):
        implicit.adapt(lambda p: p["w"].pow(2).sum(), params, lam=1.0, lr=0.1, steps=1, solve=made)
