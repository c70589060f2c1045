"""Meta-gradients of every optimizer (initial params and every hyperparameter as a tensor) against
float64 finite differences; the optimizers inside fparams.adapt (loop and vmap); serialization."""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
import fparams.optim as optim
from tests.helpers import assert_dicts_close, task_data

F64 = torch.float64


def _t(v: float) -> Tensor:
    return torch.tensor(v, dtype=F64, requires_grad=True)


#: (factory, hyperparameters given as tensors (name -> value, a pair for betas/etas), numbers, steps)
META: List[Tuple[Callable[..., Any], Dict[str, Any], Dict[str, Any], int]] = [
    (
        optim.adagrad,
        dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.2, eps=1e-2),
        {},
        4,
    ),
    (optim.adadelta, dict(lr=0.5, rho=0.8, eps=1e-3, weight_decay=0.1), {}, 4),
    (optim.adamax, dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1), {}, 4),
    (optim.asgd, dict(lr=0.1, lambd=0.05, alpha=0.6, t0=1.5, weight_decay=0.1), {}, 4),
    (optim.rprop, dict(lr=0.05, etas=(0.4, 1.3), step_sizes=(1e-4, 0.06)), {}, 4),
    (optim.nadam, dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1, momentum_decay=0.05), {}, 4),
    (optim.nadam, dict(lr=0.05, weight_decay=0.1), dict(decoupled_weight_decay=True), 3),
    (optim.radam, dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1), {}, 8),
    (optim.radam, dict(lr=0.05, weight_decay=0.1), dict(decoupled_weight_decay=True, betas=(0.8, 0.9)), 8),
    (optim.adafactor, dict(lr=0.02, weight_decay=0.1), dict(eps=(1e-3, 1e-3)), 4),
    (optim.adam, dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1), dict(maximize=True), 4),
]


def _problem() -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(3, 2, generator=g, dtype=F64), "b": torch.randn(2, generator=g, dtype=F64)}
    return params, torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)


def _loss(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return ((torch.tanh(x @ p["w"] + p["b"]) - y) ** 2).mean()


def _unroll(
    factory: Callable[..., Any], names: List[str], numbers: Dict[str, Any], steps: int
) -> Callable[..., Tensor]:
    start, x, y = _problem()

    def final_loss(w: Tensor, b: Tensor, *flat: Tensor) -> Tensor:
        kw: Dict[str, Any] = dict(numbers)
        it = iter(flat)
        for name in names:
            kw[name] = (next(it), next(it)) if name in ("betas", "etas", "step_sizes") else next(it)
        opt = factory(**kw)
        params = {"w": w, "b": b}
        state = opt.init(params)
        for t in range(steps):
            shift = 0.3 * t
            g = torch.autograd.grad(_loss(params, x + shift, y), list(params.values()), create_graph=True)
            updates, state = opt.update(dict(zip(params, g)), state, params)
            params = fparams.apply_updates(params, updates)
        return _loss(params, x, y)

    return final_loss


@pytest.mark.parametrize(
    "factory,tensors,numbers,steps", META, ids=[f"{m[0].__name__}-{sorted(m[2])}" for m in META]
)
def test_meta_gradients_equal_finite_differences(
    factory: Callable[..., Any], tensors: Dict[str, Any], numbers: Dict[str, Any], steps: int
) -> None:
    start, _, _ = _problem()
    flat: List[Tensor] = []
    for v in tensors.values():
        flat.extend([_t(v[0]), _t(v[1])] if isinstance(v, tuple) else [_t(v)])
    inputs = (start["w"].clone().requires_grad_(), start["b"].clone().requires_grad_(), *flat)
    fn = _unroll(factory, list(tensors), numbers, steps)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(fn(*inputs), inputs, allow_unused=True)
    if factory is not optim.rprop:  # rprop: nothing flows through the gradients' values
        assert all(g is not None and bool(g.abs().sum() > 0) for g in grads[:2])


def test_rprop_meta_gradient_wrt_the_start_is_the_identity_path() -> None:
    # documented: sign(g) has derivative 0, so d p_T / d p_0 is the identity
    start, x, y = _problem()
    w0, b0 = start["w"].clone().requires_grad_(), start["b"].clone().requires_grad_()
    opt = optim.rprop(0.05)
    params, state = {"w": w0, "b": b0}, opt.init({"w": w0, "b": b0})
    for _ in range(3):
        g = torch.autograd.grad(_loss(params, x, y), list(params.values()), create_graph=True)
        updates, state = opt.update(dict(zip(params, g)), state, params)
        params = fparams.apply_updates(params, updates)
    (dw,) = torch.autograd.grad(params["w"].sum(), [w0])
    torch.testing.assert_close(dw, torch.ones_like(dw), rtol=0, atol=0)


# -- inside fparams.adapt ---------------------------------------------------------------

ADAPT_OPTIMIZERS = [
    lambda: optim.adagrad(0.1),
    lambda: optim.adadelta(),
    lambda: optim.adamax(0.05),
    lambda: optim.asgd(0.1),
    lambda: optim.rprop(0.05),
    lambda: optim.nadam(0.05),
    lambda: optim.radam(0.05),
    lambda: optim.adafactor(0.05),
]


@pytest.mark.parametrize("make", ADAPT_OPTIMIZERS, ids=lambda m: repr(m()).split("(")[0])
def test_adapt_runs_every_optimizer_in_the_loop_and_under_vmap(make: Callable[[], Any]) -> None:
    torch.manual_seed(0)
    arch, params, _ = fparams.split(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double())
    data = task_data(3)
    opt = make()

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()  # type: ignore[no-any-return]

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, lr=opt, steps=3), xq, yq)

    loop = fparams.map_tasks(task, strategy="loop")(params, *data)
    vmap = fparams.map_tasks(task, strategy="vmap")(params, *data)
    torch.testing.assert_close(vmap, loop, rtol=1e-10, atol=1e-12)
    # the reference: the optimizer by hand, task 0
    ref, state = dict(params), opt.init(params)
    for _ in range(3):
        g = torch.autograd.grad(mse(ref, data[0][0], data[1][0]), list(ref.values()), create_graph=True)
        updates, state = opt.update(dict(zip(ref, g)), state, ref)
        ref = fparams.apply_updates(ref, updates)
    torch.testing.assert_close(loop[0], mse(ref, data[2][0], data[3][0]), rtol=1e-10, atol=1e-12)


# -- serialization (issue 16) --------------------------------------------------------------

ALL = [
    lambda: optim.sgd(0.1, momentum=0.9),
    lambda: optim.adam(0.1, amsgrad=True),
    lambda: optim.adamw(),
    lambda: optim.rmsprop(centered=True),
    lambda: optim.higher_adam(),
    lambda: optim.adagrad(),
    lambda: optim.adadelta(),
    lambda: optim.adamax(),
    lambda: optim.asgd(),
    lambda: optim.rprop(),
    lambda: optim.nadam(decoupled_weight_decay=True, weight_decay=0.1),
    lambda: optim.radam(),
    lambda: optim.adafactor(),
    lambda: optim.chain(optim.clip_grad_norm(1.0), optim.trace(0.9), optim.scale_by_learning_rate(0.1)),
]


@pytest.mark.parametrize("make", ALL, ids=lambda m: repr(m()).split("(")[0])
def test_optimizers_pickle_and_states_load_with_plain_torch_load(make: Callable[[], Any]) -> None:
    opt = make()
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    state = opt.init(params)
    _, state = opt.update({k: torch.ones_like(p) for k, p in params.items()}, state, params)
    again = pickle.loads(pickle.dumps(opt))
    assert repr(again) == repr(opt)
    buffer = io.BytesIO()
    torch.save({"opt": opt}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)["opt"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = torch.load(buffer)  # weights_only=True, torch's default
    assert type(restored) is type(state)
    grads = {k: torch.full_like(p, 0.5) for k, p in params.items()}
    want, _ = opt.update(grads, state, params)
    got, _ = loaded.update(grads, restored, params)
    assert_dicts_close(got, want, rtol=0, atol=0)
