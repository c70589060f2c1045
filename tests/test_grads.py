"""adapt's three gradient routes give the same numbers.

``fparams.adapt`` takes its inner gradients with ``torch.autograd.grad`` when
no transform is active, with one ``torch.autograd.grad`` over the physical
batch when the only transform is one vmap, and with ``torch.func.grad``
otherwise (see ``fparams/_grads.py``). ``torch.func.grad`` is the reference:
each case runs once on the route adapt picks and once forced onto it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
import fparams._inner as inner_mod
import fparams._tasks.meta_grad as tasks_mod
from fparams._grads import grad_route
from tests.helpers import assert_dicts_close

TOL = dict(rtol=1e-9, atol=1e-11)
T = 4


def _net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    mid: List[nn.Module] = {
        "mlp": [nn.Tanh()],
        "layernorm": [nn.LayerNorm(6), nn.ReLU()],
        "batchnorm": [nn.BatchNorm1d(6), nn.ReLU()],
        "dropout": [nn.Tanh(), nn.Dropout(0.3)],
        "unused": [nn.Tanh()],
    }[kind]
    net = nn.Sequential(nn.Linear(3, 6), *mid, nn.Linear(6, 1)).double()
    return _WithSpare(net) if kind == "unused" else net


class _WithSpare(nn.Module):
    """A layer in the params that the forward never calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.spare = nn.Linear(2, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _data(seed: int = 1) -> List[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, 5, d, generator=g, dtype=torch.float64) for d in (3, 1, 3, 1)]


def _run(route_forced: bool, fn: Callable[[], Any]) -> Any:
    if not route_forced:
        return fn()
    with pytest.MonkeyPatch.context() as mp:  # torch.func.grad everywhere: the reference
        mp.setattr(inner_mod, "grad_route", lambda: "func")
        mp.setattr(tasks_mod, "grad_route", lambda: "func")
        return fn()


def _both(fn: Callable[[], Any]) -> Tuple[Any, Any]:
    """(result on the route adapt picks, result with torch.func everywhere)."""
    ref = _run(True, fn)
    return _run(False, fn), ref


def _maml(arch: fparams.Architecture, **adapt_kw: Any) -> Tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """``mse(p, x, y)`` and the MAML task: adapt on the support set, the loss on the query set."""

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, **{"lr": 0.1, "steps": 2, **adapt_kw}), xq, yq)

    return mse, task


def _meta(net: nn.Module, strategy: str, forced: bool, **adapt_kw: Any) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-task query losses and the meta-gradient (through .backward())."""
    arch, params, _ = fparams.split(net)
    _, task = _maml(arch, **adapt_kw)

    def go() -> Tuple[Tensor, Dict[str, Tensor]]:
        net.zero_grad(set_to_none=True)
        chunk = 3 if strategy == "chunked" else None
        mapped = fparams.map_tasks(task, strategy=strategy, batch_stats=True, chunk_size=chunk)
        out = mapped(params, *_data())
        out.sum().backward()
        grads = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
        return out.detach(), grads

    return _run(forced, go)


ADAPT_OPTIONS: Dict[str, Callable[[Dict[str, Tensor]], Dict[str, Any]]] = {
    "number lr": lambda p: dict(lr=0.1),
    "learned lr": lambda p: dict(lr=torch.tensor(0.1, dtype=torch.float64, requires_grad=True)),
    "meta-sgd rates": lambda p: dict(lr={k: torch.full_like(v, 0.1).requires_grad_() for k, v in p.items()}),
    "first order": lambda p: dict(lr=0.1, first_order=True),
    "anil filter": lambda p: dict(lr=0.1, filter="2.*"),
    "adam": lambda p: dict(lr=fparams.optim.adam(0.05)),
}


# Every option on the MLP; the other networks with a plain and a per-parameter rate.
CASES = [("mlp", o) for o in sorted(ADAPT_OPTIONS)] + [
    (k, o) for k in ("layernorm", "batchnorm", "unused") for o in ("number lr", "meta-sgd rates")
]


@pytest.mark.parametrize("strategy", ["vmap", "loop", "chunked"])
@pytest.mark.parametrize(("kind", "option"), CASES)
def test_routes_agree(kind: str, option: str, strategy: str) -> None:
    net = _net(kind)
    params = dict(net.named_parameters())
    kw = ADAPT_OPTIONS[option](params)
    losses, grads = _meta(net, strategy, forced=False, **kw)
    ref_losses, ref_grads = _meta(net, strategy, forced=True, **kw)
    torch.testing.assert_close(losses, ref_losses, **TOL)
    assert_dicts_close(grads, ref_grads, **TOL)
    if kind == "unused":  # torch.func.grad's convention: zeros for an unused input
        assert float(grads["spare.weight"].abs().sum()) == 0.0


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_dropout_draws_are_the_same_on_every_route(randomness: str) -> None:
    net = _net("dropout")
    arch, params, _ = fparams.split(net)
    _, task = _maml(arch)

    def go() -> Tensor:
        torch.manual_seed(7)
        return fparams.map_tasks(task, strategy="vmap", randomness=randomness)(params, *_data()).detach()

    torch.testing.assert_close(_run(False, go), _run(True, go), **TOL)


def test_per_task_running_statistics_agree() -> None:
    net = _net("batchnorm")
    arch, params, buffers = fparams.split(net)

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor, buffers: Dict[str, Tensor]) -> Tensor:
        return (arch(p, x, buffers=buffers) - y).pow(2).mean()

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, b: Any) -> Any:
        fast = fparams.adapt(mse, p, xs, ys, lr=0.1, steps=2, buffers=b)
        return mse(fast, xq, yq, buffers=b), b

    def go(strategy: str) -> Tuple[Tensor, Dict[str, Tensor]]:
        stats = fparams.stack_tasks(buffers, T)
        losses, new = fparams.map_tasks(task, strategy=strategy)(params, *_data(), stats)
        return losses.detach(), new

    for strategy in ("vmap", "loop"):
        got, ref = (_run(forced, lambda s=strategy: go(s)) for forced in (False, True))
        torch.testing.assert_close(got[0], ref[0], **TOL)
        assert_dicts_close(got[1], ref[1], **TOL)


def test_second_order_meta_gradient_of_the_vmap_route_matches_finite_differences() -> None:
    net = _net("layernorm")
    arch, params, _ = fparams.split(net)
    names = list(params)
    data = _data()
    mapped = fparams.map_tasks(_maml(arch, steps=1)[1], strategy="vmap")

    def objective(*values: Tensor) -> Tensor:
        return mapped(dict(zip(names, values)), *data).mean()

    values = tuple(v.detach().clone().requires_grad_() for v in params.values())
    assert torch.autograd.gradcheck(objective, values)
    assert torch.autograd.gradgradcheck(objective, values)


def test_adapt_outside_grad_mode_returns_plain_tensors() -> None:
    net = _net("mlp")
    arch, params, _ = fparams.split(net)
    xs, ys = _data()[0][0], _data()[1][0]
    mse, _ = _maml(arch)
    with torch.no_grad():
        fast = fparams.adapt(mse, params, xs, ys, lr=0.1, steps=2)
    ref = _run(True, lambda: fparams.adapt(mse, params, xs, ys, lr=0.1, steps=2))
    assert not any(t.requires_grad for t in fast.values())
    assert_dicts_close(fast, {k: v.detach() for k, v in ref.items()}, **TOL)
    # over tasks too, where the later steps adapt tensors the loop made itself
    xs, ys = _data()[:2]
    per_task = lambda p, x, y: fparams.adapt(mse, p, x, y, lr=0.1, steps=3)  # noqa: E731
    mapped = fparams.map_tasks(per_task, strategy="vmap")
    with torch.no_grad():
        got, want = _both(lambda: mapped(fparams.detach(params), xs, ys))
    assert_dicts_close(got, want, **TOL)
    assert not torch.allclose(got["0.weight"][0], params["0.weight"]), "nothing adapted"


def test_one_tensor_under_two_keys_gets_a_gradient_per_key() -> None:
    w = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    loss = lambda p: (p["a"] * p["b"]).sum()  # noqa: E731
    got = fparams.adapt(loss, {"a": w, "b": w}, lr=1.0)
    ref = _run(True, lambda: fparams.adapt(loss, {"a": w, "b": w}, lr=1.0))
    assert_dicts_close(got, ref, **TOL)
    assert float(got["a"].detach()) == 0.0  # 2 - 1 * d(ab)/da = 2 - b


@pytest.mark.parametrize("where", ["eager", "vmap"])
def test_a_non_scalar_loss_is_explained_on_every_route(where: str) -> None:
    w = {"w": torch.ones(3, dtype=torch.float64)}

    def run() -> Any:
        if where == "eager":
            return fparams.adapt(lambda p: p["w"] * 2, w, lr=0.1)
        per_task = lambda x: fparams.adapt(lambda p: p["w"] * x, w, lr=0.1)["w"]  # noqa: E731
        return torch.func.vmap(per_task)(torch.ones(2, 3))

    for forced in (False, True):
        with pytest.raises(ValueError, match=r"fparams\.adapt: `loss_fn` must return a scalar tensor"):
            _run(forced, run)


def test_the_route_follows_the_active_transforms() -> None:
    seen: List[str] = []

    def probe(x: Tensor) -> Tensor:
        seen.append(grad_route())
        return x.sum()

    x = torch.ones(2, 3)
    probe(x)
    torch.func.vmap(probe)(x)
    torch.func.grad(probe)(x)
    torch.func.vmap(torch.func.vmap(probe))(x.unsqueeze(0))
    torch.func.grad(lambda y: torch.func.vmap(probe)(y).sum())(x)
    assert seen == ["autograd", "vmap", "func", "func", "func"]


def _value_and_grad_case(has_aux: bool) -> Tuple[Callable[..., Any], Dict[str, Tensor], List[Tensor]]:
    net = _net("layernorm")
    arch, params, _ = fparams.split(net)
    _, maml_task = _maml(arch)

    def task(*args: Tensor) -> Any:
        loss = maml_task(*args)
        return (loss, loss.detach() * 2) if has_aux else loss

    return fparams.meta_value_and_grad(task, has_aux=has_aux), params, _data()


@pytest.mark.parametrize("has_aux", [False, True])
def test_meta_value_and_grad_routes_agree(has_aux: bool) -> None:
    step, params, data = _value_and_grad_case(has_aux)
    (value, grads), (want_value, want_grads) = _both(lambda: step(params, *data))
    torch.testing.assert_close(value, want_value, **TOL)
    assert_dicts_close(grads, want_grads, **TOL)
    assert all(p.grad is None for p in params.values()), "a pure step wrote to .grad"


def test_meta_value_and_grad_stays_differentiable_like_torch_func() -> None:
    # params that require grad: the meta-gradient is itself differentiable (a third order)
    step, params, data = _value_and_grad_case(False)
    _, grads = step(params, *data)
    third = torch.autograd.grad(sum(g.pow(2).sum() for g in grads.values()), list(params.values()))
    _, ref = _run(True, lambda: step(params, *data))
    want = torch.autograd.grad(sum(g.pow(2).sum() for g in ref.values()), list(params.values()))
    for a, b in zip(third, want):
        torch.testing.assert_close(a, b, **TOL)
    # params that do not: plain results, no graph kept
    value, plain = step({k: v.detach() for k, v in params.items()}, *data)
    assert not value.requires_grad and not any(g.requires_grad for g in plain.values())


# -- cases a review found, each against the torch.func reference ------------------------


def _w() -> Tensor:
    return torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)


def test_other_uses_of_the_same_tensor_do_not_enter_the_inner_gradient() -> None:
    w, x = _w(), torch.tensor([0.5, -1.0], dtype=torch.float64)
    outer = {"w": w}
    # a closure over the outer params (a proximal term), and a frozen key holding the tensor
    closure = lambda: fparams.adapt(lambda p: (p["w"] * x).sum() + (p["w"] * outer["w"]).sum(), outer, lr=0.1)  # noqa: E731
    tied = lambda: fparams.adapt(lambda p: (p["a"] * p["b"]).sum(), {"a": w, "b": w}, lr=0.1, filter="a")  # noqa: E731
    for case in (closure, tied):
        got, ref = _both(case)
        assert_dicts_close(got, ref, **TOL)
    # the user's own vmap over per-task params, used inside and outside the loss
    batched = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    per = lambda p: fparams.adapt(lambda q: (q["w"] * p["w"]).sum(), p, lr=0.1)["w"]  # noqa: E731
    got, ref = _both(lambda: torch.func.vmap(per)({"w": batched}))
    torch.testing.assert_close(got, ref, **TOL)


def test_first_order_with_a_tensor_used_inside_and_outside() -> None:
    def run() -> Tensor:
        w = _w()
        anchor = w * 2.0
        fast = fparams.adapt(lambda p, a: (p["w"] * a).sum(), {"w": w}, anchor, lr=0.1, first_order=True)
        ((fast["w"] + anchor) ** 2).sum().backward()
        return w.grad  # type: ignore[return-value]

    got, ref = _both(run)
    torch.testing.assert_close(got, ref, **TOL)


def test_a_loss_that_does_not_depend_on_the_adapted_params_gives_zero_steps() -> None:
    params = {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    x = torch.ones(3, 2, dtype=torch.float64)
    loss = lambda p, x: (p["b"] * x).sum()  # noqa: E731
    plain = lambda: fparams.adapt(loss, params, x[0], lr=0.1, filter="a")  # noqa: E731
    vmapped = lambda: fparams.map_tasks(  # noqa: E731
        lambda p, x: fparams.adapt(loss, p, x, lr=0.1, filter="a")["a"], strategy="vmap"
    )(params, x)
    detached = lambda: fparams.adapt(lambda p: (p["a"] * 2).sum().detach(), params, lr=0.1)  # noqa: E731
    const = lambda: fparams.meta_value_and_grad(lambda p, x: x.sum() + 0 * p["a"].sum().detach())(  # noqa: E731
        {"a": _w()}, x
    )
    def as_dict(r: Any) -> Dict[str, Tensor]:  # adapt: a dict; map_tasks: a tensor; a step: (loss, grads)
        return r[1] if isinstance(r, tuple) else r if isinstance(r, dict) else {"out": r}

    for case in (plain, vmapped, detached, const):
        got, ref = _both(case)
        assert_dicts_close(as_dict(got), as_dict(ref), **TOL)


def test_inference_mode_adapts_as_torch_func_does() -> None:
    params = {"w": torch.tensor([1.0, 2.0])}
    x = torch.tensor([[-2.5, -5.0], [4.0, -4.0]])
    loss = lambda p, x: (p["w"] * x).sum()  # noqa: E731

    def run() -> Any:
        with torch.inference_mode():
            plain = fparams.adapt(loss, params, x[0], lr=0.1)["w"]
            per_task = lambda p, x: fparams.adapt(loss, p, x, lr=0.1)["w"]  # noqa: E731
            over = fparams.map_tasks(per_task, strategy="vmap")(params, x)
        return plain.clone(), over.clone()

    (plain, over), (ref_plain, ref_over) = _both(run)
    torch.testing.assert_close(plain, ref_plain)
    torch.testing.assert_close(over, ref_over)
    if torch.equal(ref_over[0], params["w"]):  # capability, not version: older torch.func returns zeros
        pytest.skip("this torch's torch.func.grad does not differentiate under inference_mode")
    assert not torch.equal(over[0], params["w"]), "the vmap route did not adapt"


def test_params_that_do_not_require_grad_come_back_plain() -> None:
    # test-time adaptation of a frozen model: no graph may stay attached to the result
    params = {"w": torch.tensor([1.0, 2.0])}
    x = torch.tensor([[-1.5, -3.0], [0.5, 1.0]])
    loss = lambda p, x: (p["w"] * x).pow(2).sum()  # noqa: E731  (its gradient depends on w)
    plain = lambda: fparams.adapt(loss, params, x[0], lr=0.1, steps=2)["w"]  # noqa: E731
    over = lambda: fparams.map_tasks(  # noqa: E731
        lambda p, x: fparams.adapt(loss, p, x, lr=0.1, steps=2)["w"], strategy="vmap"
    )(params, x)
    for case in (plain, over):
        got, ref = _both(case)
        assert not got.requires_grad
        torch.testing.assert_close(got, ref)


def test_meta_value_and_grad_keeps_the_graph_to_captured_tensors() -> None:
    log_lr = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.5, -1.0], [2.0, 1.0]], dtype=torch.float64)
    inner = lambda p, x: (p["w"] * x).pow(2).sum()  # noqa: E731

    def task(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        return inner(fparams.adapt(inner, p, x, lr=log_lr.exp()), x)

    def run() -> Tensor:
        loss, _ = fparams.meta_value_and_grad(task)({"w": _w().detach()}, x)
        return torch.autograd.grad(loss, log_lr)[0]

    got, ref = _both(run)
    torch.testing.assert_close(got, ref, **TOL)
