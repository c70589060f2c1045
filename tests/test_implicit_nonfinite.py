"""fparams.implicit: non-finite inputs give NaN, never zeros (issue 16 item 2), and every
bad input to the solvers, custom_root and iMAML gets an fparams error with its message."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict

import pytest
import torch
from torch import Tensor

import fparams
from fparams import FparamsTypeError, FparamsValueError, implicit

D = torch.float64
NAN, INF = math.nan, math.inf


def _spd(n: int) -> Tensor:
    g = torch.Generator().manual_seed(n)
    m = torch.randn(n, n, generator=g, dtype=D)
    return m @ m.T + n * torch.eye(n, dtype=D)


SOLVERS: Dict[str, Callable[[], implicit.LinearSolver]] = {
    "cg": lambda: implicit.cg(),
    "cg_loose": lambda: implicit.cg(maxiter=2, strict=False),
    "normal_cg": lambda: implicit.normal_cg(),
    "neumann": lambda: implicit.neumann(steps=30, alpha=0.2),
}


# -- the non-finite rule ---------------------------------------------------------------------


def test_the_issues_case_cg_of_a_nan_right_hand_side_is_nan_not_zero() -> None:
    x = implicit.cg()(lambda v: 2 * v, torch.tensor([NAN, 1.0]))
    assert torch.isnan(x).all(), x


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_every_solver_gives_nan_for_a_non_finite_right_hand_side(name: str, bad: float) -> None:
    A = _spd(3)
    b = {"x": torch.tensor([1.0, bad, 2.0], dtype=D), "y": torch.ones(2, dtype=D)}
    x = SOLVERS[name]()(lambda v: {"x": A @ v["x"], "y": 2 * v["y"]}, b)
    for k in b:  # the whole solution: its other entries depend on the bad one through the solve
        assert torch.isnan(x[k]).all(), (name, k, x[k])


@pytest.mark.parametrize("name", ["cg", "cg_loose", "normal_cg"])
def test_conjugate_gradients_give_nan_where_the_operator_turns_non_finite(name: str) -> None:
    A = _spd(3)

    def matvec(v: Tensor) -> Tensor:
        out = A @ v
        return torch.where(v.abs().sum() > 0.3, out * NAN, out)  # NaN once the iterate grows

    x = SOLVERS[name]()(matvec, torch.ones(3, dtype=D))
    assert torch.isnan(x).all(), x


def test_neumann_raises_where_its_series_turns_non_finite() -> None:
    A = _spd(3)
    with pytest.raises(implicit.NotConvergedError, match=r"fparams\.implicit\.neumann: the series diverges"):
        implicit.neumann(steps=5, alpha=0.1)(lambda v: A @ v * NAN, torch.ones(3, dtype=D))


@pytest.mark.parametrize("name", ["cg", "normal_cg", "neumann"])
def test_under_vmap_only_the_task_with_a_nan_is_nan(name: str) -> None:
    A = _spd(3) / 10
    bs = torch.randn(3, 3, dtype=D)
    bs[1, 0] = NAN
    solver = {"cg": implicit.cg(tol=1e-12), "normal_cg": implicit.normal_cg(tol=1e-12),
              "neumann": implicit.neumann(steps=400, alpha=1.0)}[name]  # fmt: skip
    xs = torch.func.vmap(lambda b: solver(lambda v: A @ v, b))(bs)
    assert torch.isnan(xs[1]).all()
    keep = [0, 2]
    torch.testing.assert_close(xs[keep], torch.linalg.solve(A, bs[keep].T).T)


def _imaml_meta_grads(query_scale: float) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(8, 3, generator=g, dtype=D), torch.randn(8, generator=g, dtype=D)
    params = {"w": torch.zeros(3, dtype=D, requires_grad=True)}

    def mse(p: Dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        return (X @ p["w"] - y).pow(2).mean()

    fast = implicit.adapt(mse, params, X, y, lam=1.0, lr=0.1, steps=20)
    (mse(fast, X, y) * query_scale).backward()
    return {k: t.grad for k, t in params.items() if t.grad is not None}


@pytest.mark.parametrize("scale", [NAN, INF])
def test_a_non_finite_query_loss_gives_nan_meta_gradients_not_zeros(scale: float) -> None:
    assert torch.isfinite(_imaml_meta_grads(1.0)["w"]).all()
    assert torch.isnan(_imaml_meta_grads(scale)["w"]).all()


# -- bad inputs --------------------------------------------------------------------------------


def _b() -> Tensor:
    return torch.ones(2, dtype=D)


BAD_SOLVE_CALLS = [
    (
        lambda: implicit.cg()(lambda v: v, {}),
        FparamsValueError,
        "fparams.implicit.cg: `b` is an empty dict: give at least one tensor to solve for.",
    ),
    (
        lambda: implicit.normal_cg()(lambda v: v, {"x": torch.ones(2, dtype=torch.long)}),
        FparamsTypeError,
        "fparams.implicit.normal_cg: `b['x']` must be a floating tensor; got dtype torch.int64.",
    ),
    (
        lambda: implicit.neumann()(lambda v: v, {"x": [1.0]}),
        FparamsTypeError,
        "fparams.implicit.neumann: `b['x']` must be a tensor; got list [1.0].",
    ),
    (
        lambda: implicit.cg()(lambda v: v, torch.ones(2, dtype=torch.long)),
        FparamsTypeError,
        "fparams.implicit.cg: `b` must be a floating tensor; got dtype torch.int64.",
    ),
    (
        lambda: implicit.cg()(None, _b()),
        FparamsTypeError,
        "fparams.implicit.cg: `matvec` must be a callable x -> A x; got NoneType.",
    ),
    (
        lambda: implicit.cg()(lambda v: v, _b(), symmetric="yes"),
        FparamsTypeError,
        "fparams.implicit.cg: `symmetric` must be True or False; got str 'yes'.",
    ),
    (
        lambda: implicit.cg()(lambda v: 2.0, _b()),
        FparamsTypeError,
        "fparams.implicit.cg: `matvec(x)` must be a tensor or a dict of tensors; got float 2.0.",
    ),
    (
        lambda: implicit.cg()(lambda v: {"x": v["x"], "z": v["x"]}, {"x": _b()}),
        FparamsValueError,
        "fparams.implicit.cg: `matvec(x)` must return the keys and shapes of `b`; got "
        "{'x': (2,), 'z': (2,)} for {'x': (2,)}.",
    ),
    (
        lambda: implicit.neumann(alpha="0.1"),
        FparamsTypeError,
        "fparams.implicit.neumann: `alpha` must be a number; got str '0.1'.",
    ),
    (
        lambda: implicit.normal_cg(strict=1),
        FparamsTypeError,
        "fparams.implicit.normal_cg: `strict` must be True or False; got int 1.",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD_SOLVE_CALLS, ids=[m[2][:50] for m in BAD_SOLVE_CALLS])
def test_bad_solver_inputs_get_fparams_errors(call: Callable[[], Any], error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call()


def _root(solve: Any) -> Tensor:
    a = torch.ones(2, dtype=D, requires_grad=True)
    root = implicit.custom_root(lambda x, a: x - a, solve=solve)(lambda x, a: a.clone())
    root(torch.zeros(2, dtype=D), a).sum().backward()
    return a


def test_a_custom_solve_returning_the_wrong_structure_is_named_at_backward() -> None:
    with pytest.raises(FparamsTypeError, match=re.escape(
        "fparams.implicit.custom_root: `solve(matvec, b)` must return a dict of tensors with the keys "
        "of `b` (['0']); got list [1.0]."
    )):  # fmt: skip
        _root(lambda matvec, b: [1.0])
    with pytest.raises(FparamsValueError, match=re.escape(
        "fparams.implicit.custom_root: `solve(matvec, b)` returned shape (3,) for key '0' of `b`, "
        "which has shape (2,)."
    )):  # fmt: skip
        _root(lambda matvec, b: {"0": torch.ones(3, dtype=D)})
    assert torch.equal(_root(lambda matvec, b: b).grad, torch.ones(2, dtype=D))  # the identity works


def _adapt(**override: Any) -> Any:
    kw: Dict[str, Any] = dict(lam=1.0, lr=0.1, steps=2)
    kw.update(override)
    params = kw.pop("params", {"w": torch.zeros(2, dtype=D), "b": torch.zeros(1, dtype=D)})
    return implicit.adapt(lambda p: (p["w"].sum() + p["b"].sum()) ** 2, params, **kw)


BAD_ADAPT = [
    (
        dict(params={}),
        FparamsValueError,
        "fparams.implicit.adapt: `params` is an empty dict: there is nothing to adapt.",
    ),
    (
        dict(params={"w": torch.zeros(2, dtype=torch.long)}),
        FparamsTypeError,
        "fparams.implicit.adapt: `params['w']` must be a floating tensor; got dtype torch.int64.",
    ),
    (
        dict(params={"w": 1.0}),
        FparamsTypeError,
        "fparams.implicit.adapt: `params['w']` must be a floating tensor; got float 1.0.",
    ),
    (
        dict(params=[torch.zeros(2)]),
        FparamsTypeError,
        "fparams.implicit.adapt: `params` must be a dict of tensors keyed by name; got list",
    ),
    (
        dict(lam=torch.ones(2, dtype=D)),
        FparamsValueError,
        "fparams.implicit.adapt: `lam` must be a number or a 0-dim tensor (one strength per task); "
        "got a tensor of shape (2,).",
    ),
    (
        dict(lam=float("nan")),
        FparamsValueError,
        "fparams.implicit.adapt: `lam` must be a finite number > 0; got nan.",
    ),
    (
        dict(lr=-0.1),
        FparamsValueError,
        "fparams.implicit.adapt: `lr` must be a finite number >= 0; got -0.1.",
    ),
    (dict(lr=None), FparamsTypeError, "fparams.implicit.adapt: `lr` must be a number, a tensor"),
    (
        dict(lr={"w": 0.1}),
        FparamsValueError,
        "fparams.implicit.adapt: `lr` is a dict of per-parameter rates but does not fit the params. "
        "Missing key(s): 'b'.",
    ),
    (dict(lr={"w": 0.1, "b": 0.1, "c": 0.1}), FparamsValueError, "Unexpected key(s): 'c'."),
    (
        dict(steps=None),
        FparamsTypeError,
        "fparams.implicit.adapt: `steps` must be an int; got NoneType None.",
    ),
    (
        dict(solve=implicit.cg),
        FparamsTypeError,
        "fparams.implicit.adapt: `solve` is the solver factory fparams.implicit.cg itself",
    ),
]


@pytest.mark.parametrize("override, error, message", BAD_ADAPT, ids=[m[2][23:70] for m in BAD_ADAPT])
def test_bad_imaml_inputs_get_fparams_errors(override: Dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        _adapt(**override)


def test_a_per_parameter_rate_dict_runs() -> None:
    fast = _adapt(lr={"w": 0.1, "b": torch.tensor(0.05, dtype=D)})
    assert sorted(fast) == ["b", "w"]


def test_the_errors_are_fparams_errors_and_the_builtins() -> None:
    with pytest.raises(fparams.FparamsError) as info:
        implicit.cg()(lambda v: v, {})
    assert isinstance(info.value, ValueError) and info.value.function == "implicit.cg"


@pytest.mark.parametrize(
    "loss, error, message",
    [
        (lambda p: p["w"] * 2, FparamsValueError,
         "fparams.implicit.adapt: `loss_fn` must return a scalar tensor (reduce it, e.g. .mean()); "
         "got shape (2,)."),
        (lambda p: 1.0, FparamsTypeError,
         "fparams.implicit.adapt: `loss_fn` must return a scalar floating tensor; got float 1.0."),
        (lambda p: p["w"].sum().long(), FparamsTypeError,
         "fparams.implicit.adapt: `loss_fn` must return a scalar floating tensor; got dtype torch.int64."),
    ],
)  # fmt: skip
def test_a_loss_fn_that_returns_no_scalar_is_named(loss: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        implicit.adapt(loss, {"w": torch.zeros(2, dtype=D)}, lam=1.0, lr=0.1, steps=2)


def test_a_solver_class_is_refused_as_solve() -> None:
    with pytest.raises(FparamsTypeError, match=re.escape(
        "fparams.implicit.custom_root: `solve` is the class LinearSolver; pass a solver such as "
        "fparams.implicit.cg(maxiter=50)."
    )):  # fmt: skip
        implicit.custom_root(lambda x, a: x - a, solve=implicit.LinearSolver)


def test_the_guide_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import pathlib

    guide = pathlib.Path(__file__).parent.parent / "docs" / "guides" / "implicit.md"
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, str(guide), "exec"), {})
    assert "tensor([nan, nan])" in capsys.readouterr().out
