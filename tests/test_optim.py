"""fparams.optim: torch.optim trajectories, meta-gradients, vmap, compile, errors, purity."""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from hypothesis import given, strategies as st
from torch import Tensor, nn

import fparams
import fparams.optim as optim
from tests.helpers import assert_dicts_close, assert_untouched, snapshot

F64 = torch.float64


def _mse(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).mean()


# -- (1) no meta-differentiation: 100 steps equal torch.optim --------------------------

# (name, fparams factory, torch.optim class, hyperparameters shared by both)
CASES: List[Tuple[str, Callable[..., optim.GradientTransformation], type, Dict[str, Any]]] = [
    ("sgd", optim.sgd, torch.optim.SGD, dict(lr=0.1)),
    ("sgd-momentum", optim.sgd, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd-nesterov", optim.sgd, torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True)),
    ("sgd-weight-decay", optim.sgd, torch.optim.SGD, dict(lr=0.1, weight_decay=0.05)),
    (
        "sgd-dampening",
        optim.sgd,
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    ),
    ("adam", optim.adam, torch.optim.Adam, dict(lr=0.02)),
    ("adam-weight-decay", optim.adam, torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.99), weight_decay=0.1)),
    ("adam-amsgrad", optim.adam, torch.optim.Adam, dict(lr=0.02, eps=1e-6, amsgrad=True)),
    ("adamw", optim.adamw, torch.optim.AdamW, dict(lr=0.02)),
    ("adamw-amsgrad", optim.adamw, torch.optim.AdamW, dict(lr=0.02, weight_decay=0.2, amsgrad=True)),
    ("rmsprop", optim.rmsprop, torch.optim.RMSprop, dict(lr=0.01)),
    ("rmsprop-alpha-eps", optim.rmsprop, torch.optim.RMSprop, dict(lr=0.002, alpha=0.8, eps=1e-4)),
    ("rmsprop-centered", optim.rmsprop, torch.optim.RMSprop, dict(lr=0.01, centered=True)),
    (
        "rmsprop-momentum",
        optim.rmsprop,
        torch.optim.RMSprop,
        dict(lr=0.005, alpha=0.9, momentum=0.9, weight_decay=0.01, centered=True),
    ),
]
# The step sizes stay out of the chaotic regime that sign-like optimizers reach
# near a minimum (RMSprop with a small alpha), where torch.optim itself moves
# 1e-2 away from its own trajectory after a 1e-16 nudge of one parameter.
CASE_IDS = [c[0] for c in CASES]


def _problem() -> Tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g, dtype=F64)
    y = torch.randn(16, 2, generator=g, dtype=F64)
    return net, x, y


def _torch_trajectory(
    net: nn.Module, x: Tensor, y: Tensor, cls: type, hyper: Dict[str, Any], steps: int
) -> List[Dict[str, Tensor]]:
    net = copy.deepcopy(net)
    opt = cls(net.parameters(), **hyper)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        _mse(net(x), y).backward()
        opt.step()
        out.append({k: p.detach().clone() for k, p in net.named_parameters()})
    return out


def _fparams_trajectory(
    net: nn.Module, x: Tensor, y: Tensor, opt: optim.GradientTransformation, steps: int
) -> List[Dict[str, Tensor]]:
    arch, params, _ = fparams.split(net)
    params = fparams.detach(params)
    grad_fn = torch.func.grad(lambda p: _mse(arch(p, x), y))
    state = opt.init(params)
    out = []
    for _ in range(steps):
        updates, state = opt.update(grad_fn(params), state, params)
        params = fparams.apply_updates(params, updates)
        out.append(params)
    return out


def _as_tensors(hyper: Dict[str, Any]) -> Dict[str, Any]:
    """Every number as a float64 scalar tensor (bools stay: they are flags)."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(conv(b) for b in v)
        return v if isinstance(v, bool) else torch.tensor(v, dtype=F64)

    return {k: conv(v) for k, v in hyper.items()}


@pytest.mark.parametrize("name,factory,cls,hyper", CASES, ids=CASE_IDS)
def test_100_steps_follow_torch_optim(
    name: str, factory: Callable[..., Any], cls: type, hyper: Dict[str, Any]
) -> None:
    net, x, y = _problem()
    expected = _torch_trajectory(net, x, y, cls, hyper, steps=100)
    start = dict(net.named_parameters())
    moved = max((expected[-1][k] - start[k]).abs().max().item() for k in start)
    assert moved > 0.05, f"the parameters hardly moved ({moved}); the comparison would be vacuous"
    # Hyperparameters as numbers, then as tensors (the path learned ones take).
    for opt in (factory(**hyper), factory(**_as_tensors(hyper))):
        got = _fparams_trajectory(net, x, y, opt, steps=100)
        for step, (a, b) in enumerate(zip(got, expected)):
            try:
                assert_dicts_close(a, b, rtol=1e-10, atol=1e-12)
            except AssertionError as err:
                raise AssertionError(f"{name}: step {step} differs from torch.optim: {err}") from None


@given(
    lr=st.floats(1e-4, 0.1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    weight_decay=st.floats(0.0, 0.3),
    momentum=st.floats(0.0, 0.95),
    kind=st.sampled_from(["sgd", "adam", "adamw", "rmsprop"]),
    flag=st.booleans(),
)
def test_random_hyperparameters_follow_torch_optim(
    lr: float, beta1: float, beta2: float, weight_decay: float, momentum: float, kind: str, flag: bool
) -> None:
    if kind == "sgd":
        hyper: Dict[str, Any] = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        hyper.update(nesterov=True) if flag and momentum > 0 else hyper.update(dampening=beta1)
        factory, cls = optim.sgd, torch.optim.SGD
    elif kind == "rmsprop":
        hyper = dict(lr=lr, alpha=beta2, momentum=momentum, weight_decay=weight_decay, centered=flag)
        factory, cls = optim.rmsprop, torch.optim.RMSprop
    else:
        hyper = dict(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, amsgrad=flag)
        factory, cls = (optim.adam, torch.optim.Adam) if kind == "adam" else (optim.adamw, torch.optim.AdamW)
    net, x, y = _problem()
    expected = _torch_trajectory(net, x, y, cls, hyper, steps=10)
    got = _fparams_trajectory(net, x, y, factory(**hyper), steps=10)
    assert_dicts_close(got[-1], expected[-1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("factory,cls", [(optim.adam, torch.optim.Adam), (optim.adamw, torch.optim.AdamW)])
def test_float32_adam_stays_within_float32_rounding_of_torch_optim(factory: Any, cls: type) -> None:
    # The bias corrections are float64 scalars, as torch.optim's Python floats
    # are: in float32, 1 - 0.999 alone is off by 1e-5.
    net, x, y = _problem()
    net, x, y = net.float(), x.float(), y.float()
    expected = _torch_trajectory(net, x, y, cls, dict(lr=0.01), steps=5)
    got = _fparams_trajectory(net, x, y, factory(lr=0.01), steps=5)
    for a, b in zip(got, expected):
        assert_dicts_close(a, b, rtol=1e-6, atol=1e-7)
    beta = torch.tensor(0.9, requires_grad=True)  # a float32 learned beta keeps float32 updates
    params = {"w": torch.ones(3)}
    opt = factory(lr=torch.tensor(0.1, dtype=F64), betas=(beta, 0.999))
    updates, _ = opt.update({"w": torch.ones(3)}, opt.init(params), params)
    assert updates["w"].dtype == torch.float32


def test_the_step_count_is_a_tensor_that_counts_steps() -> None:
    opt = optim.adam(lr=0.1)
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    for _ in range(3):
        _, state = opt.update({"w": torch.ones(2)}, state, params)
    adam_state = state.adam
    assert isinstance(adam_state, optim.ScaleByAdamState)
    assert adam_state.step["w"].dtype == torch.int64 and adam_state.step["w"].dim() == 0
    assert int(adam_state.step["w"]) == 3  # one count per parameter, as torch.optim's state["step"]


def test_a_dict_of_rates_scales_each_parameter() -> None:
    params = {"a": torch.ones(2), "b": torch.ones(3)}
    grads = {"a": torch.full((2,), 2.0), "b": torch.full((3,), -1.0)}
    rates = {"a": torch.tensor(0.1), "b": torch.full((3,), 0.5)}
    opt = optim.sgd(lr=rates, momentum=0.5)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert_dicts_close(updates, {"a": torch.full((2,), -0.2), "b": torch.full((3,), 0.5)})


# -- (2) second-order meta-gradients through 5 Adam steps -------------------------------

NAMES = ("w1", "b1", "w2", "b2")


def _tiny_net(p: Dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]


def _tiny_task(seed: int = 0) -> Tuple[Dict[str, Tensor], Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    meta = {
        "w1": torch.randn(3, 2, generator=g, dtype=F64),
        "b1": torch.randn(3, generator=g, dtype=F64),
        "w2": torch.randn(1, 3, generator=g, dtype=F64),
        "b2": torch.randn(1, generator=g, dtype=F64),
    }
    xs, xq = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    ys, yq = torch.sin(xs.sum(1, keepdim=True)), torch.sin(xq.sum(1, keepdim=True))
    return meta, xs, ys, xq, yq


def _adapt(
    opt: optim.GradientTransformation, params: Dict[str, Tensor], x: Tensor, y: Tensor, steps: int
) -> Dict[str, Tensor]:
    """The inner loop, written with torch.func.grad."""
    grad_fn = torch.func.grad(lambda p: _mse(_tiny_net(p, x), y))
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update(grad_fn(params), state, params)
        params = fparams.apply_updates(params, updates)
    return params


def _adapt_autograd(
    opt: optim.GradientTransformation, params: Dict[str, Tensor], x: Tensor, y: Tensor, steps: int
) -> Dict[str, Tensor]:
    """The same inner loop with torch.autograd.grad(create_graph=True)."""
    state = opt.init(params)
    for _ in range(steps):
        loss = _mse(_tiny_net(params, x), y)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
        updates, state = opt.update(grads, state, params)
        params = fparams.apply_updates(params, updates)
    return params


META_OPTS = {
    "adam": lambda: optim.adam(lr=0.1),
    "adam-amsgrad-wd": lambda: optim.adam(lr=0.1, weight_decay=0.1, amsgrad=True),
    "adamw": lambda: optim.adamw(lr=0.1, weight_decay=0.1),
}


@pytest.mark.parametrize("make_opt", META_OPTS.values(), ids=list(META_OPTS))
def test_meta_gradients_through_5_adam_steps_match_finite_differences(make_opt: Callable[[], Any]) -> None:
    meta, xs, ys, xq, yq = _tiny_task()

    def query_loss(*tensors: Tensor) -> Tensor:
        fast = _adapt(make_opt(), dict(zip(NAMES, tensors)), xs, ys, steps=5)
        return _mse(_tiny_net(fast, xq), yq)

    inputs = tuple(meta[k].clone().requires_grad_() for k in NAMES)
    grads = torch.autograd.grad(query_loss(*inputs), inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max().item() for g in grads) > 1e-3
    assert torch.autograd.gradcheck(query_loss, inputs)
    if make_opt is META_OPTS["adam"]:  # third order: once is enough, and it is the slow part
        assert torch.autograd.gradgradcheck(query_loss, inputs)


def test_autograd_and_torch_func_inner_loops_give_the_same_meta_gradient() -> None:
    meta, xs, ys, xq, yq = _tiny_task(seed=2)
    results = []
    for adapt in (_adapt, _adapt_autograd):
        params = {k: t.clone().requires_grad_() for k, t in meta.items()}
        fast = adapt(optim.adam(lr=0.05, betas=(0.5, 0.9)), params, xs, ys, steps=5)
        loss = _mse(_tiny_net(fast, xq), yq)
        results.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    assert_dicts_close(results[0], results[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make_opt",
    [lambda: optim.adam(lr=0.1), lambda: optim.rmsprop(lr=0.1, centered=True)],
    ids=["adam", "rmsprop-centered"],
)
def test_a_parameter_without_gradient_leaves_meta_gradients_finite(make_opt: Callable[[], Any]) -> None:
    # A ReLU unit that is dead on every input: its weights get exactly zero
    # gradient, so Adam's second moment stays 0, where sqrt's derivative is infinite.
    meta, xs, ys, xq, yq = _tiny_task(seed=3)
    meta["b1"] = torch.tensor([-100.0, 0.1, 0.2], dtype=F64)
    params = {k: t.clone().requires_grad_() for k, t in meta.items()}

    def relu_net(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.relu(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    grad_fn = torch.func.grad(lambda p: _mse(relu_net(p, xs), ys))
    assert (grad_fn(params)["w1"][0] == 0).all()
    opt, fast = make_opt(), params
    state = opt.init(fast)
    for _ in range(5):
        updates, state = opt.update(grad_fn(fast), state, fast)
        fast = fparams.apply_updates(fast, updates)
    grads = torch.autograd.grad(_mse(relu_net(fast, xq), yq), list(params.values()))
    for k, g in zip(params, grads):
        assert torch.isfinite(g).all(), k
    assert grads[0].abs().max() > 0


# -- (3) learned hyperparameters receive the right meta-gradient ----------------------

LEARNED = {
    "adam-lr": lambda h: optim.adam(lr=h),
    "adam-beta1": lambda h: optim.adam(lr=0.1, betas=(h, 0.999)),
    "sgd-momentum": lambda h: optim.sgd(lr=0.1, momentum=h),
    "sgd-dampening": lambda h: optim.sgd(lr=0.1, momentum=0.9, dampening=h),
    "rmsprop-lr": lambda h: optim.rmsprop(lr=h, momentum=0.5, centered=True),
    "adamw-weight-decay": lambda h: optim.adamw(lr=0.1, weight_decay=h),
}
START = {
    "adam-lr": 0.05,
    "adam-beta1": 0.8,
    "sgd-momentum": 0.7,
    "sgd-dampening": 0.4,
    "rmsprop-lr": 0.01,
    "adamw-weight-decay": 0.5,
}


@pytest.mark.parametrize("name", list(LEARNED))
def test_a_learned_hyperparameter_gets_the_finite_difference_meta_gradient(name: str) -> None:
    meta, xs, ys, xq, yq = _tiny_task(seed=4)

    def query_loss(h: Tensor) -> Tensor:
        fast = _adapt(LEARNED[name](h), meta, xs, ys, steps=5)
        return _mse(_tiny_net(fast, xq), yq)

    h = torch.tensor(START[name], dtype=F64, requires_grad=True)
    (meta_grad,) = torch.autograd.grad(query_loss(h), h)
    eps = 1e-6
    with torch.no_grad():
        fd = (query_loss(h + eps) - query_loss(h - eps)) / (2 * eps)
    assert abs(fd.item()) > 1e-4, "the loss barely depends on the hyperparameter"
    torch.testing.assert_close(meta_grad, fd, rtol=1e-6, atol=1e-9)


def test_per_name_learned_rates_get_meta_gradients_through_torch_func_grad() -> None:
    meta, xs, ys, xq, yq = _tiny_task(seed=5)
    rates = {k: torch.full_like(t, 0.05) for k, t in meta.items()}

    def query_loss(r: Dict[str, Tensor]) -> Tensor:
        fast = _adapt(optim.adam(lr=r), meta, xs, ys, steps=3)
        return _mse(_tiny_net(fast, xq), yq)

    meta_grads = torch.func.grad(query_loss)(rates)
    eps, k, i = 1e-6, "w1", (1, 0)
    plus, minus = dict(rates), dict(rates)
    plus[k] = rates[k].index_put(
        (torch.tensor(i[0]), torch.tensor(i[1])), torch.tensor(0.05 + eps, dtype=F64)
    )
    minus[k] = rates[k].index_put(
        (torch.tensor(i[0]), torch.tensor(i[1])), torch.tensor(0.05 - eps, dtype=F64)
    )
    fd = (query_loss(plus) - query_loss(minus)) / (2 * eps)
    assert abs(fd.item()) > 1e-5
    torch.testing.assert_close(meta_grads[k][i], fd, rtol=1e-6, atol=1e-9)


# -- (4) over tasks: vmap equals the per-task loop ------------------------------------

VMAP_OPTS = {
    "adam": lambda: optim.adam(lr=0.05),
    "adamw-amsgrad": lambda: optim.adamw(lr=0.05, amsgrad=True),
    "sgd-dampening": lambda: optim.sgd(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    "sgd-nesterov": lambda: optim.sgd(lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop-centered-momentum": lambda: optim.rmsprop(lr=0.01, momentum=0.5, centered=True),
}


def _tasks(n: int = 4) -> Tuple[Dict[str, Tensor], Tensor, Tensor, Tensor, Tensor]:
    meta, *_ = _tiny_task(seed=6)
    g = torch.Generator().manual_seed(7)
    xs, xq = torch.randn(n, 6, 2, generator=g, dtype=F64), torch.randn(n, 6, 2, generator=g, dtype=F64)
    phase = torch.randn(n, 1, 1, generator=g, dtype=F64)
    return (
        meta,
        xs,
        torch.sin(xs.sum(-1, keepdim=True) + phase),
        xq,
        torch.sin(xq.sum(-1, keepdim=True) + phase),
    )


@pytest.mark.parametrize("make_opt", VMAP_OPTS.values(), ids=list(VMAP_OPTS))
def test_vmap_over_tasks_equals_the_per_task_loop(make_opt: Callable[[], Any]) -> None:
    meta, xs, ys, xq, yq = _tasks()
    params = {k: t.clone().requires_grad_() for k, t in meta.items()}

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tuple[Any, Tensor]:
        fast = _adapt(make_opt(), p, xs, ys, steps=4)
        return fast, _mse(_tiny_net(fast, xq), yq)

    fast_v, loss_v = torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq)
    looped = [task(params, xs[i], ys[i], xq[i], yq[i]) for i in range(len(xs))]
    fast_l = {k: torch.stack([f[k] for f, _ in looped]) for k in params}
    loss_l = torch.stack([loss for _, loss in looped])
    assert_dicts_close(fast_v, fast_l, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_v, loss_l, rtol=1e-10, atol=1e-12)
    grad_v = torch.autograd.grad(loss_v.sum(), list(params.values()))
    grad_l = torch.autograd.grad(loss_l.sum(), list(params.values()))
    assert_dicts_close(dict(zip(params, grad_v)), dict(zip(params, grad_l)), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(loss_v[0], loss_v[1]), "the tasks should differ"


def test_vmap_over_a_batch_of_learning_rates_equals_the_loop() -> None:
    meta, xs, ys, xq, yq = _tiny_task(seed=8)
    lrs = torch.tensor([0.01, 0.05, 0.2], dtype=F64, requires_grad=True)

    def query_loss(lr: Tensor) -> Tensor:
        fast = _adapt(optim.adam(lr=lr, betas=(lr * 0 + 0.9, 0.99)), meta, xs, ys, steps=3)
        return _mse(_tiny_net(fast, xq), yq)

    batched = torch.func.vmap(query_loss)(lrs)
    looped = torch.stack([query_loss(lr) for lr in lrs])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    (g_v,) = torch.autograd.grad(batched.sum(), lrs)
    (g_l,) = torch.autograd.grad(looped.sum(), lrs)
    torch.testing.assert_close(g_v, g_l, rtol=1e-10, atol=1e-12)
    assert (g_v != 0).all()


# -- (5) torch.compile of a step equals eager -------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_step_of_every_transform_equals_eager() -> None:
    opt = optim.chain(
        optim.add_decayed_weights(0.01),
        optim.scale_by_rms(alpha=0.9, centered=True),
        optim.scale_by_adam(amsgrad=True),
        optim.trace(0.9, dampening=0.1),
        optim.scale_by_learning_rate(0.01),
    )

    def step(params: Dict[str, Tensor], state: Any) -> Tuple[Dict[str, Tensor], Any]:
        grads = {k: torch.sin(3 * p) for k, p in params.items()}
        updates, state = opt.update(grads, state, params)
        return fparams.apply_updates(params, updates), state

    torch._dynamo.reset()
    # torch 2.3's dynamo cannot call fparams' transform objects inside one graph (it breaks the
    # graph there); newer dynamo traces the whole step
    whole = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    compiled = torch.compile(step, fullgraph=whole)
    # torch < 2.6 has no set_stance: recompiles then go unnoticed, the values are still checked
    stance = getattr(torch.compiler, "set_stance", lambda _: contextlib.nullcontext())
    g = torch.Generator().manual_seed(9)
    params = {"w": torch.randn(4, 3, generator=g, dtype=F64), "b": torch.randn(4, generator=g, dtype=F64)}
    eager_p, eager_s = params, opt.init(params)
    comp_p, comp_s = params, opt.init(params)
    for i in range(3):
        eager_p, eager_s = step(eager_p, eager_s)
        with stance("fail_on_recompile" if i else "default"):
            comp_p, comp_s = compiled(comp_p, comp_s)
        assert_dicts_close(comp_p, eager_p, rtol=1e-12, atol=1e-14)
    assert int(comp_s[2].step["w"]) == 3  # a plain chain: positions are the transforms' order
    assert_dicts_close(comp_s[3].trace, eager_s[3].trace, rtol=1e-12, atol=1e-14)


# -- (6) errors ---------------------------------------------------------------------------

BAD_HYPERPARAMETERS = [
    (optim.sgd, dict(lr=-0.1), ValueError, "fparams.optim.sgd: `lr` must be a finite number >= 0; got -0.1."),
    (optim.sgd, dict(lr=float("nan")), ValueError, "`lr` must be a finite number >= 0; got nan"),
    (optim.sgd, dict(lr=float("inf")), ValueError, "`lr` must be a finite number >= 0; got inf"),
    (
        optim.sgd,
        dict(lr="0.1"),
        TypeError,
        "fparams.optim.sgd: `lr` must be a number, a tensor or a dict of per-parameter rates; "
        "got str '0.1'.",
    ),
    (optim.sgd, dict(lr=True), TypeError, "`lr` must be a number, a tensor or a dict of per-parameter rates"),
    (optim.sgd, dict(momentum=-0.9), ValueError, "sgd: `momentum` must be a finite number >= 0; got -0.9"),
    (optim.sgd, dict(dampening=1.5), ValueError, "sgd: `dampening` must be in [0, 1]; got 1.5"),
    (optim.sgd, dict(weight_decay=-1e-4), ValueError, "sgd: `weight_decay` must be a finite number >= 0"),
    (
        optim.sgd,
        dict(nesterov=True),
        ValueError,
        "sgd: `nesterov=True` needs a `momentum` > 0; got momentum=0.0",
    ),
    (
        optim.sgd,
        dict(momentum=0.9, dampening=0.1, nesterov=True),
        ValueError,
        "sgd: `nesterov=True` needs `dampening` == 0; got dampening=0.1",
    ),
    (optim.sgd, dict(nesterov=1), TypeError, "sgd: `nesterov` must be True or False; got int 1"),
    (optim.sgd, dict(lr={"w": -1.0}), ValueError, "sgd: `lr['w']` must be a finite number >= 0; got -1.0"),
    (optim.adam, dict(lr=-1e-3), ValueError, "fparams.optim.adam: `lr` must be a finite number >= 0"),
    (optim.adam, dict(betas=(1.0, 0.999)), ValueError, "adam: `betas[0]` must be in [0, 1); got 1.0"),
    (optim.adam, dict(betas=(0.9, -0.1)), ValueError, "adam: `betas[1]` must be in [0, 1); got -0.1"),
    (optim.adam, dict(betas=(0.9,)), ValueError, "adam: `betas` must be a pair (beta1, beta2) of numbers or"),
    (optim.adam, dict(betas=0.9), TypeError, "adam: `betas` must be a pair (beta1, beta2)"),
    (optim.adam, dict(eps=-1e-8), ValueError, "adam: `eps` must be a finite number >= 0; got -1e-08"),
    (optim.adam, dict(weight_decay=-0.1), ValueError, "adam: `weight_decay` must be a finite number >= 0"),
    (optim.adam, dict(amsgrad="no"), TypeError, "adam: `amsgrad` must be True or False; got str"),
    (optim.adamw, dict(lr=-1.0), ValueError, "fparams.optim.adamw: `lr` must be a finite number >= 0"),
    (optim.adamw, dict(betas=(0.9, 1.0)), ValueError, "adamw: `betas[1]` must be in [0, 1); got 1.0"),
    (optim.adamw, dict(eps=-1.0), ValueError, "adamw: `eps` must be a finite number >= 0"),
    (optim.adamw, dict(weight_decay=-0.01), ValueError, "adamw: `weight_decay` must be a finite number >= 0"),
    (optim.adamw, dict(amsgrad=None), TypeError, "adamw: `amsgrad` must be True or False"),
    (optim.rmsprop, dict(lr=-0.01), ValueError, "fparams.optim.rmsprop: `lr` must be a finite number >= 0"),
    (optim.rmsprop, dict(alpha=1.01), ValueError, "rmsprop: `alpha` must be in [0, 1]; got 1.01"),
    (optim.rmsprop, dict(alpha=-0.5), ValueError, "rmsprop: `alpha` must be in [0, 1]; got -0.5"),
    (optim.rmsprop, dict(eps=-1e-8), ValueError, "rmsprop: `eps` must be a finite number >= 0"),
    (optim.rmsprop, dict(weight_decay=-1.0), ValueError, "rmsprop: `weight_decay` must be a finite number"),
    (optim.rmsprop, dict(momentum=-0.1), ValueError, "rmsprop: `momentum` must be a finite number >= 0"),
    (optim.rmsprop, dict(centered=0), TypeError, "rmsprop: `centered` must be True or False"),
    (optim.trace, dict(momentum=-1.0), ValueError, "fparams.optim.trace: `momentum` must be a finite number"),
    (optim.trace, dict(momentum=0.9, dampening=-0.1), ValueError, "trace: `dampening` must be in [0, 1]"),
    (optim.trace, dict(momentum=0.9, nesterov="yes"), TypeError, "trace: `nesterov` must be True or False"),
    (optim.scale_by_adam, dict(betas=(-0.1, 0.9)), ValueError, "scale_by_adam: `betas[0]` must be in [0, 1)"),
    (optim.scale_by_adam, dict(eps=-1.0), ValueError, "scale_by_adam: `eps` must be a finite number >= 0"),
    (optim.scale_by_adam, dict(amsgrad=1), TypeError, "scale_by_adam: `amsgrad` must be True or False"),
    (optim.scale_by_rms, dict(alpha=2.0), ValueError, "scale_by_rms: `alpha` must be in [0, 1]; got 2.0"),
    (optim.scale_by_rms, dict(eps=-1.0), ValueError, "scale_by_rms: `eps` must be a finite number >= 0"),
    (optim.scale_by_rms, dict(centered="x"), TypeError, "scale_by_rms: `centered` must be True or False"),
    (
        optim.add_decayed_weights,
        dict(weight_decay=-0.5),
        ValueError,
        "add_decayed_weights: `weight_decay` must",
    ),
    (
        optim.scale_by_learning_rate,
        dict(lr=-0.5),
        ValueError,
        "scale_by_learning_rate: `lr` must be a finite",
    ),
    (
        optim.scale_by_learning_rate,
        dict(lr=[-0.1]),
        ValueError,
        "scale_by_learning_rate: `lr[0]` must be a finite number >= 0; got -0.1.",
    ),
    (
        optim.scale_by_learning_rate,
        dict(lr="0.1"),
        TypeError,
        "scale_by_learning_rate: `lr` must be a number, a tensor or a dict of per-parameter rates; got str",
    ),
]


@pytest.mark.parametrize(
    "factory,hyper,error,message",
    BAD_HYPERPARAMETERS,
    ids=[f"{f.__name__}-{sorted(h.items())}" for f, h, _, _ in BAD_HYPERPARAMETERS],
)
def test_bad_hyperparameters_raise_naming_them(
    factory: Callable[..., Any], hyper: Dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        factory(**hyper)


def test_tensor_hyperparameters_are_not_read_so_they_are_not_checked() -> None:
    # A tensor may be a learned value under torch.func; reading it is not an option.
    optim.sgd(lr=torch.tensor(-1.0), momentum=torch.tensor(0.0), nesterov=True)
    optim.adam(betas=(torch.tensor(1.0), torch.tensor(2.0)), eps=torch.tensor(-1.0))


def _w() -> Dict[str, Tensor]:
    return {"w": torch.ones(2)}


BAD_UPDATES = [
    (
        "unexpected-grad",
        lambda: optim.sgd(momentum=0.9).update(
            {"w": torch.ones(2), "v": torch.ones(1)}, optim.sgd(momentum=0.9).init(_w())
        ),
        ValueError,
        "fparams.optim.trace: `grads` has a name the state was not initialised with. Unexpected key(s): 'v'.",
    ),
    (
        "grad-not-in-params",
        lambda: optim.sgd().update({"w": torch.ones(2), "v": torch.ones(1)}, optim.sgd().init(_w()), _w()),
        ValueError,
        "fparams.optim.sgd: `grads` has names that `params` lacks. Unexpected key(s): 'v'.",
    ),
    (
        "grad-of-the-wrong-shape",
        lambda: optim.adam().update({"w": torch.ones(1)}, optim.adam().init(_w()), _w()),
        ValueError,
        "fparams.optim.adam: `grads['w']` is float32[1] but its parameter is float32[2]; give each "
        "gradient its parameter's shape and dtype.",
    ),
    (
        "grad-of-the-wrong-dtype",
        lambda: optim.adam().update({"w": torch.ones(2, dtype=F64)}, optim.adam().init(_w()), _w()),
        ValueError,
        "fparams.optim.adam: `grads['w']` is float64[2] but its parameter is float32[2]",
    ),
    (
        "grad-not-a-tensor",
        lambda: optim.adam().update({"w": 1.0}, optim.adam().init(_w()), _w()),
        TypeError,
        "fparams.optim.adam: `grads['w']` must be a tensor; got float.",
    ),
    (
        "grads-not-a-dict",
        lambda: optim.rmsprop().update([torch.ones(2)], optim.rmsprop().init(_w())),
        TypeError,
        "fparams.optim.rmsprop: `grads` must be a dict of tensors keyed by name; got list",
    ),
    (
        "wrong-state",
        lambda: optim.scale_by_adam().update(_w(), optim.scale_by_rms().init(_w())),
        TypeError,
        "fparams.optim.scale_by_adam: `state` must be the ScaleByAdamState that this transform's "
        "init() returned; got ScaleByRmsState",
    ),
    (
        "chain-state-length",
        lambda: optim.adam().update(_w(), optim.sgd().init(_w())),
        TypeError,
        "fparams.optim.adam: `state` must be the AdamState of 3 states that this chain's "
        "init() returned; got SgdState.",
    ),
    (
        "chain-state-namedtuple",
        lambda: optim.chain(optim.trace(0.5), optim.trace(0.5)).update(_w(), optim.trace(0.5).init(_w())),
        TypeError,
        "fparams.optim.chain: `state` must be the tuple of 2 states",
    ),
    (
        "weight-decay-without-params",
        lambda: optim.adam(weight_decay=0.1).update(_w(), optim.adam(weight_decay=0.1).init(_w())),
        TypeError,
        "fparams.optim.add_decayed_weights: `params` is required because the update reads the "
        "parameters; call update(grads, state, params).",
    ),
    (
        "lr-dict-lacks-a-name",
        lambda: optim.sgd(lr={"v": 0.1}).init(_w()),
        ValueError,
        "fparams.optim.scale_by_learning_rate: `lr` is a dict of per-parameter rates but has no rate for: "
        "'w'. Give one rate per parameter that gets a gradient.",
    ),
    (
        "named-chain-not-a-namedtuple",
        lambda: optim.named_chain(tuple, a=optim.identity()),
        TypeError,
        "fparams.optim.named_chain: `state_type` must be a NamedTuple class; got <class 'tuple'>.",
    ),
    (
        "named-chain-wrong-fields",
        lambda: optim.named_chain(optim.AdamState, adam=optim.scale_by_adam()),
        ValueError,
        "fparams.optim.named_chain: the transforms must be given by the fields of AdamState, in "
        "order: weight_decay, adam, lr; got adam.",
    ),
    (
        "named-chain-of-a-non-transform",
        lambda: optim.named_chain(
            optim.AdamWState, adam=optim.identity(), weight_decay=1, lr=optim.identity()
        ),
        TypeError,
        "fparams.optim.named_chain: transform 1 must have `init` and `update` methods",
    ),
    (
        "identity-wrong-state",
        lambda: optim.identity().update(_w(), ()),
        TypeError,
        "fparams.optim.identity: `state` must be the EmptyState that this transform's init() returned; "
        "got tuple.",
    ),
    (
        "chain-of-a-non-transform",
        lambda: optim.chain(optim.trace(0.9), 0.1),
        TypeError,
        "fparams.optim.chain: transform 1 must have `init` and `update` methods",
    ),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in BAD_UPDATES], ids=[c[0] for c in BAD_UPDATES])
def test_bad_updates_raise_with_the_fix(call: Callable[[], Any], error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call()


# -- (7) purity: inputs are left untouched ----------------------------------------------


def _state_tensors(state: Any, prefix: str = "state") -> Dict[str, Tensor]:
    if isinstance(state, Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        items = state.items()
    elif hasattr(state, "_fields"):
        items = zip(state._fields, state)
    else:
        items = ((str(i), s) for i, s in enumerate(state))
    out: Dict[str, Tensor] = {}
    for k, s in items:
        out.update(_state_tensors(s, f"{prefix}.{k}"))
    return out


@pytest.mark.parametrize("name,factory,cls,hyper", CASES, ids=CASE_IDS)
def test_init_and_update_leave_their_inputs_untouched(
    name: str, factory: Callable[..., Any], cls: type, hyper: Dict[str, Any]
) -> None:
    lr = torch.tensor(hyper["lr"], requires_grad=True)
    opt = factory(**{**hyper, "lr": lr})
    g = torch.Generator().manual_seed(10)
    params = {"a": torch.randn(3, 2, generator=g, requires_grad=True), "b": torch.randn(3, generator=g)}
    grads = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    lr_snap, params_snap, grads_snap = snapshot({"lr": lr}), snapshot(params), snapshot(grads)
    state = opt.init(params)
    for _ in range(2):  # the second update reads non-zero moments and buffers
        state_snap = snapshot(_state_tensors(state))
        updates, new_state = opt.update(grads, state, params)
        assert_untouched(_state_tensors(state), state_snap)
        assert updates is not grads and all(updates[k] is not grads[k] for k in grads)
        state = new_state
    assert_untouched(params, params_snap)
    assert_untouched(grads, grads_snap)
    assert_untouched({"lr": lr}, lr_snap)


# -- integration: fparams.adapt, map_tasks and MAML take an optimizer for lr --------------


def _tiny_loss(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return _mse(_tiny_net(p, x), y)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_adapt_with_an_optimizer_equals_the_manual_loop(first_order: bool) -> None:
    meta, xs, ys, xq, yq = _tiny_task(seed=11)
    results = []
    for use_adapt in (True, False):
        params = {k: t.clone().requires_grad_() for k, t in meta.items()}
        opt = optim.adam(lr=0.05, weight_decay=0.01)
        if use_adapt:
            fast = fparams.adapt(_tiny_loss, params, xs, ys, lr=opt, steps=5, first_order=first_order)
        else:
            grad_fn = torch.func.grad(_tiny_loss)
            fast, state = params, opt.init(params)
            for _ in range(5):
                grads = grad_fn(fast, xs, ys)
                if first_order:
                    grads = fparams.detach(grads)
                updates, state = opt.update(grads, state, fast)
                fast = fparams.apply_updates(fast, updates)
        meta_grads = torch.autograd.grad(_tiny_loss(fast, xq, yq), list(params.values()))
        results.append((fparams.detach(fast), dict(zip(params, meta_grads))))
    assert_dicts_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    assert_dicts_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(results[0][0]["w1"], meta["w1"]), "the inner loop should move the params"


def test_adapt_with_an_optimizer_and_a_filter_adapts_only_the_selected_params() -> None:
    meta, xs, ys, xq, yq = _tiny_task(seed=12)
    params = {k: t.clone().requires_grad_() for k, t in meta.items()}
    opt = optim.sgd(lr=0.1, momentum=0.9, nesterov=True)
    fast = fparams.adapt(_tiny_loss, params, xs, ys, lr=opt, steps=3, filter=["w2", "b2"])
    head, body = fparams.partition(params, ["w2", "b2"])
    grad_fn = torch.func.grad(lambda h: _tiny_loss({**h, **body}, xs, ys))
    state = opt.init(head)
    for _ in range(3):
        updates, state = opt.update(grad_fn(head), state, head)
        head = fparams.apply_updates(head, updates)
    assert_dicts_close(fast, {**head, **body}, rtol=1e-12, atol=1e-14)
    assert fast["w1"] is params["w1"]


def test_map_tasks_over_adapt_with_adam_equals_the_per_task_loop() -> None:
    meta, xs, ys, xq, yq = _tasks()
    params = {k: t.clone().requires_grad_() for k, t in meta.items()}

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        fast = fparams.adapt(_tiny_loss, p, xs, ys, lr=optim.adam(lr=0.05), steps=4)
        return _tiny_loss(fast, xq, yq)

    mapped = fparams.map_tasks(task)(params, xs, ys, xq, yq)
    looped = torch.stack(
        [
            _tiny_loss(_adapt(optim.adam(lr=0.05), params, xs[i], ys[i], steps=4), xq[i], yq[i])
            for i in range(4)
        ]
    )
    torch.testing.assert_close(mapped, looped, rtol=1e-10, atol=1e-12)
    grad_m = torch.autograd.grad(mapped.sum(), list(params.values()))
    grad_l = torch.autograd.grad(looped.sum(), list(params.values()))
    assert_dicts_close(dict(zip(params, grad_m)), dict(zip(params, grad_l)), rtol=1e-10, atol=1e-12)


def test_maml_with_an_optimizer_equals_the_manual_loop() -> None:
    net, x, y = _problem()
    maml = fparams.MAML(copy.deepcopy(net), lr=optim.adam(lr=0.05, betas=(0.5, 0.9)))
    learner = maml.clone()
    for _ in range(3):
        learner.adapt(_mse(learner(x), y))
    _mse(learner(x[:8]), y[:8]).backward()

    arch, params, _ = fparams.split(copy.deepcopy(net))
    grad_fn = torch.func.grad(lambda p: _mse(arch(p, x), y))
    opt = optim.adam(lr=0.05, betas=(0.5, 0.9))
    fast, state = params, opt.init(params)
    for _ in range(3):
        updates, state = opt.update(grad_fn(fast), state, fast)
        fast = fparams.apply_updates(fast, updates)
    meta_grads = torch.autograd.grad(_mse(arch(fast, x[:8]), y[:8]), list(params.values()))
    assert_dicts_close(dict(learner.module.named_parameters()), fast, rtol=1e-12, atol=1e-14)
    assert_dicts_close(
        {k: p.grad for k, p in maml.module.named_parameters()},
        dict(zip(params, meta_grads)),
        rtol=1e-10,
        atol=1e-12,
    )


# -- (8) named states of a fixed shape, and reprs -------------------------------------------

FIXED_SHAPE = [
    (optim.sgd, optim.SgdState, [dict(), dict(momentum=0.9, weight_decay=0.1)]),
    (optim.adam, optim.AdamState, [dict(), dict(weight_decay=0.1), dict(amsgrad=True, weight_decay=0.01)]),
    (optim.adamw, optim.AdamWState, [dict(), dict(weight_decay=0.0), dict(amsgrad=True)]),
    (optim.rmsprop, optim.RmspropState, [dict(), dict(momentum=0.9, weight_decay=0.1), dict(centered=True)]),
]


def _structure(state: Any) -> Any:
    # field names and types all the way down, and the dict keys: everything but values
    if isinstance(state, dict):
        return sorted(state)
    if isinstance(state, Tensor):
        return (state.dtype, tuple(state.shape))
    return type(state).__name__, getattr(state, "_fields", None), [_structure(s) for s in state]


@pytest.mark.parametrize("factory,kind,variants", FIXED_SHAPE, ids=[f[0].__name__ for f in FIXED_SHAPE])
def test_a_named_optimizer_state_has_the_same_fields_whatever_the_hyperparameters(
    factory: Callable[..., Any], kind: type, variants: List[Dict[str, Any]]
) -> None:
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    # flags (amsgrad, centered) fill a dict that is otherwise empty; the fields stay
    numeric = [v for v in variants if not any(isinstance(x, bool) for x in v.values())]
    shapes = {str(_structure(factory(**v).init(params))) for v in numeric}
    assert len(shapes) == 1, shapes
    for v in variants:
        state = factory(**v).init(params)
        assert type(state) is kind and state._fields == kind._fields


def test_a_checkpoint_survives_a_change_of_hyperparameters() -> None:
    # Train with weight decay 0 and momentum 0, continue with both switched on: the state fits.
    params = {"w": torch.tensor([1.0, -2.0], dtype=F64)}
    grads = {"w": torch.tensor([0.5, 0.25], dtype=F64)}
    first = optim.sgd(lr=0.1)
    _, state = first.update(grads, first.init(params), params)
    second = optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.01)
    updates, state = second.update(grads, state, params)
    # torch.optim's rule with the buffer carried over: b = 0.9 * g + (g + 0.01 p)
    want = -0.1 * (0.9 * grads["w"] + grads["w"] + 0.01 * params["w"])
    torch.testing.assert_close(updates["w"], want, rtol=1e-15, atol=0)
    assert int(state.momentum.step["w"]) == 2
    adam0 = optim.adam(lr=0.1)
    _, adam_state = adam0.update(grads, adam0.init(params), params)
    optim.adam(lr=0.01, weight_decay=0.1).update(grads, adam_state, params)  # fits


def test_momentum_zero_is_plain_sgd_even_with_dampening() -> None:
    # torch ignores dampening without momentum: the update is -lr * g at every step
    opt = optim.sgd(lr=0.5, dampening=0.7)
    params = {"w": torch.ones(3, dtype=F64)}
    state = opt.init(params)
    for _ in range(3):
        g = {"w": torch.arange(3.0, dtype=F64)}
        updates, state = opt.update(g, state, params)
        torch.testing.assert_close(updates["w"], -0.5 * g["w"], rtol=0, atol=0)


REPRS = [
    (lambda: optim.adam(1e-2), "adam(lr=0.01, betas=(0.9, 0.999), eps=1e-08)"),
    (
        lambda: optim.adam(0.1, weight_decay=0.1, amsgrad=True),
        "adam(lr=0.1, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.1, amsgrad=True)",
    ),
    (lambda: optim.adamw(), "adamw(lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01)"),
    (lambda: optim.sgd(0.1), "sgd(lr=0.1)"),
    (lambda: optim.sgd(0.1, momentum=0.9, nesterov=True), "sgd(lr=0.1, momentum=0.9, nesterov=True)"),
    (lambda: optim.rmsprop(), "rmsprop(lr=0.01, alpha=0.99, eps=1e-08)"),
    (
        lambda: optim.rmsprop(centered=True, momentum=0.5),
        "rmsprop(lr=0.01, alpha=0.99, eps=1e-08, momentum=0.5, centered=True)",
    ),
    (lambda: optim.sgd(torch.tensor(0.5, requires_grad=True)), "sgd(lr=tensor(0.5, requires_grad=True))"),
    (lambda: optim.sgd({"w": torch.ones(3)}), "sgd(lr={'w': tensor(shape=(3,))})"),
    (
        lambda: optim.chain(optim.trace(0.9, dampening=0.1), optim.scale_by_learning_rate(0.1)),
        "chain(trace(momentum=0.9, dampening=0.1), scale_by_learning_rate(lr=0.1))",
    ),
    (
        lambda: optim.chain(optim.scale_by_rms(centered=True), optim.scale_by_adam(amsgrad=True)),
        "chain(scale_by_rms(alpha=0.99, eps=1e-08, centered=True), "
        "scale_by_adam(betas=(0.9, 0.999), eps=1e-08, amsgrad=True))",
    ),
    (lambda: optim.identity(), "identity()"),
]


@pytest.mark.parametrize("make,text", REPRS, ids=[t for _, t in REPRS])
def test_an_optimizer_prints_as_its_call(make: Callable[[], Any], text: str) -> None:
    opt = make()
    assert repr(opt) == text
    assert isinstance(opt, optim.GradientTransformation)


def test_a_state_prints_names_and_shapes_not_values() -> None:
    params = {f"layer{i}.weight": torch.zeros(40, 40) for i in range(5)}
    opt = optim.adam(1e-2)
    state = opt.init(params)
    _, state = opt.update({k: torch.ones_like(p) for k, p in params.items()}, state, params)
    text = repr(state)
    assert text == (
        "AdamState(weight_decay=EmptyState(), adam=ScaleByAdamState(step={'layer0.weight': 1, "
        "'layer1.weight': 1, 'layer2.weight': 1, ... 5 tensors}, "
        "mu={'layer0.weight': float32[40, 40], 'layer1.weight': float32[40, 40], "
        "'layer2.weight': float32[40, 40], ... 5 tensors}, "
        "nu={'layer0.weight': float32[40, 40], 'layer1.weight': float32[40, 40], "
        "'layer2.weight': float32[40, 40], ... 5 tensors}, nu_max={}), lr=EmptyState())"
    )
    assert repr(optim.scale_by_rms().init({"w": torch.zeros(2, dtype=F64)})) == (
        "ScaleByRmsState(step={'w': 0}, nu={'w': float64[2]}, mu={})"
    )


def test_a_hand_made_transformation_prints_its_functions() -> None:
    adam = optim.adam()
    mixed = optim.GradientTransformation(adam.init, optim.sgd().update)  # not adam any more
    assert repr(mixed).startswith("GradientTransformation(init=<bound method")
    assert repr(optim.GradientTransformation(len, len)).startswith("GradientTransformation(init=<built-in")
