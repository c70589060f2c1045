"""adapt's research knobs: has_aux, per-step learning rates, the inner optimizer's state."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from fparams import FparamsTypeError, FparamsValueError
from tests.helpers import assert_dicts_close, grads_wrt, leaves, task_data, task_slice

TOL = dict(rtol=1e-10, atol=1e-12)


def _setup() -> Tuple[fparams.Architecture, Dict[str, Tensor], List[Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    arch, params, _ = fparams.split(net)
    return arch, params, task_data(3)


def _mse(arch: fparams.Architecture) -> Any:
    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    return mse


def _mse_aux(arch: fparams.Architecture) -> Any:
    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        out = arch(p, x)
        loss = (out - y).pow(2).mean()
        return loss, {"loss": loss, "out": out}

    return mse


def _ref_schedule(
    mse: Any, params: Dict[str, Tensor], x: Tensor, y: Tensor, rates: List[Any]
) -> Dict[str, Tensor]:
    """Hand-written inner loop: step i is ``p - rates[i] * g``, with ``torch.autograd.grad``."""
    fast = dict(params)
    for rate in rates:
        grads = torch.autograd.grad(mse(fast, x, y), list(fast.values()), create_graph=True)
        fast = {
            k: p - (rate[k] if isinstance(rate, dict) else rate) * g for (k, p), g in zip(fast.items(), grads)
        }
    return fast


# -- has_aux ---------------------------------------------------------------------


@pytest.mark.parametrize("route", ["autograd", "vmap", "func"])
def test_has_aux_returns_the_last_steps_aux(route: str) -> None:
    arch, params, data = _setup()
    mse, mse_aux = _mse(arch), _mse_aux(arch)
    ref = leaves(params)
    want_aux, want_query = [], []
    for i in range(3):
        xs, ys, xq, yq = task_slice(data, i)
        first = _ref_schedule(mse, ref, xs, ys, [0.1])  # the parameters the last step starts from
        fast = _ref_schedule(mse, first, xs, ys, [0.1])
        want_aux.append(arch(first, xs))
        want_query.append(mse(fast, xq, yq))

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tuple[Tensor, Tensor]:
        fast, aux = fparams.adapt(mse_aux, p, xs, ys, lr=0.1, steps=2, has_aux=True)
        return mse(fast, xq, yq), aux["out"]

    p = leaves(params)
    if route == "autograd":
        losses, auxes = fparams.map_tasks(task, strategy="loop")(p, *data)
    elif route == "vmap":
        losses, auxes = fparams.map_tasks(task, strategy="vmap")(p, *data)
    else:  # under an outer torch.func.grad: the "func" route

        def total(q: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
            losses, auxes = fparams.map_tasks(task, strategy="loop")(q, *data)
            return losses.sum(), auxes

        grads, auxes = torch.func.grad(total, has_aux=True)(p)
        want_grads = grads_wrt(torch.stack(want_query).sum(), ref)
        assert_dicts_close(grads, want_grads, **TOL)
        torch.testing.assert_close(auxes, torch.stack(want_aux).detach(), **TOL)
        return
    torch.testing.assert_close(losses, torch.stack(want_query), **TOL)
    torch.testing.assert_close(auxes, torch.stack(want_aux), **TOL)
    # the meta-gradient through the aux flows too
    assert_dicts_close(grads_wrt(auxes.sum(), p), grads_wrt(torch.stack(want_aux).sum(), ref), **TOL)


def test_has_aux_with_buffers_filter_and_first_order() -> None:
    arch, params, data = _setup()
    xs, ys = data[0][0], data[1][0]

    def loss_fn(p: Dict[str, Tensor], x: Tensor, y: Tensor, buffers: Dict[str, Tensor]) -> Any:
        loss = (arch(p, x, buffers=buffers) - y).pow(2).mean()
        return loss, loss.detach()

    fast, aux = fparams.adapt(loss_fn, params, xs, ys, lr=0.1, steps=2, filter="2.*", buffers={},
                              first_order=True, has_aux=True)  # fmt: skip
    once = fparams.adapt(_mse(arch), params, xs, ys, lr=0.1, filter="2.*", first_order=True)
    torch.testing.assert_close(aux, _mse(arch)(once, xs, ys).detach(), **TOL)
    assert fast["0.weight"] is params["0.weight"]


def test_has_aux_with_zero_steps_gives_none() -> None:
    arch, params, data = _setup()
    fast, aux = fparams.adapt(_mse_aux(arch), params, data[0][0], data[1][0], lr=0.1, steps=0, has_aux=True)
    assert aux is None and fast["0.weight"] is params["0.weight"]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_has_aux_needs_a_pair(strategy: str) -> None:
    arch, params, data = _setup()

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return fparams.adapt(_mse(arch), p, xs, ys, lr=0.1, has_aux=True)["0.bias"]

    with pytest.raises(ValueError, match=r"fparams.adapt: has_aux=True needs `loss_fn` to return a pair"):
        fparams.map_tasks(task, strategy=strategy)(params, *data)


# -- per-step learning rates -------------------------------------------------------


def _rates(kind: str, params: Dict[str, Tensor]) -> List[Any]:
    if kind == "numbers":
        return [0.1, 0.05, 0.2]
    if kind == "tensors":
        return [torch.tensor(r, dtype=torch.float64, requires_grad=True) for r in (0.1, 0.05, 0.2)]
    return [  # MAML++: per-layer, per-step learned rates
        {k: torch.full_like(p, r).requires_grad_() for k, p in params.items()} for r in (0.1, 0.05, 0.2)
    ]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("kind", ["numbers", "tensors", "dicts"])
def test_per_step_rates_match_a_hand_written_loop(kind: str, strategy: str) -> None:
    arch, params, data = _setup()
    mse = _mse(arch)
    rates = _rates(kind, params)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, lr=rates, steps=3), xq, yq)

    p = leaves(params)
    got = fparams.map_tasks(task, strategy=strategy)(p, *data)
    ref = leaves(params)
    want = []
    for i in range(3):
        xs, ys, xq, yq = task_slice(data, i)
        fast = _ref_schedule(mse, ref, xs, ys, rates)
        want.append(mse(fast, xq, yq))
    want_t = torch.stack(want)
    torch.testing.assert_close(got, want_t, **TOL)
    learned = [r for r in rates if isinstance(r, Tensor)] + [
        t for r in rates if isinstance(r, dict) for t in r.values()
    ]
    inputs = list(p.values()) + learned
    got_g = torch.autograd.grad(got.sum(), inputs)
    want_g = torch.autograd.grad(want_t.sum(), list(ref.values()) + learned)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, **TOL)
    if learned:  # every step's rate takes part
        assert all(g.abs().sum() > 0 for g in got_g[len(p) :])


def test_per_step_rates_equal_a_single_rate_when_constant() -> None:
    arch, params, data = _setup()
    mse, xs, ys = _mse(arch), data[0][0], data[1][0]
    a = fparams.adapt(mse, params, xs, ys, lr=(0.1, 0.1), steps=2)
    b = fparams.adapt(mse, params, xs, ys, lr=0.1, steps=2)
    assert_dicts_close(a, b, **TOL)


def test_per_step_rate_errors() -> None:
    arch, params, data = _setup()
    mse, xs, ys = _mse(arch), data[0][0], data[1][0]

    def raises(kind: Any, message: str, lr: Any, steps: int) -> None:
        with pytest.raises(kind, match=re.escape("fparams.adapt: " + message)):
            fparams.adapt(mse, params, xs, ys, lr=lr, steps=steps)

    raises(FparamsValueError, "`lr` is a sequence of 2 per-step rates but steps=3; give one", [0.1, 0.2], 3)
    raises(FparamsTypeError, "`lr[1]` is an optimizer", [0.1, fparams.optim.sgd(0.1)], 2)
    raises(FparamsTypeError, "`lr[0]` must be a number, a tensor or a dict of per-parameter rates; "
           "got str '0.1'.", ["0.1"], 1)
    raises(FparamsValueError, "`lr[0]` must be a finite number >= 0; got -0.1.", [-0.1], 1)
    raises(FparamsValueError, "`lr[1]` is a dict of per-parameter rates but does not fit the params. "
           "Missing key(s): '2.bias'.", [0.1, {k: 0.1 for k in list(params)[:3]}], 2)
    raises(FparamsValueError, "the learning rate for '0.bias' has shape (4, 1)",
           [torch.ones(4, 1, dtype=torch.float64)], 1)
    raises(FparamsValueError, "the learning rate for '0.weight' has shape (5,)",
           [torch.ones(5, dtype=torch.float64)], 1)


# -- the inner optimizer's state -------------------------------------------------------


def test_return_state_matches_a_hand_written_optimizer_loop() -> None:
    arch, params, data = _setup()
    mse, mse_aux, xs, ys = _mse(arch), _mse_aux(arch), data[0][0], data[1][0]
    opt = fparams.optim.adam(0.05)
    fast, state = fparams.adapt(mse, params, xs, ys, lr=opt, steps=3, return_state=True)
    ref, ref_state = dict(params), opt.init(params)
    for _ in range(3):
        grads = dict(zip(ref, torch.autograd.grad(mse(ref, xs, ys), list(ref.values()), create_graph=True)))
        updates, ref_state = opt.update(grads, ref_state, ref)
        ref = fparams.apply_updates(ref, updates)
    assert_dicts_close(fast, ref, **TOL)
    adam_state, ref_adam = state.adam, ref_state.adam
    assert {int(s) for s in adam_state.step.values()} == {3}  # step counts per parameter (optim branch)
    assert_dicts_close(adam_state.mu, ref_adam.mu, **TOL)
    assert_dicts_close(adam_state.nu, ref_adam.nu, **TOL)
    # with has_aux too: (params, aux, state)
    fast2, aux, state2 = fparams.adapt(
        mse_aux, params, xs, ys, lr=opt, steps=3, has_aux=True, return_state=True
    )
    assert_dicts_close(fast2, ref, **TOL)
    assert_dicts_close(state2.adam.nu, ref_adam.nu, **TOL)
    assert set(aux) == {"loss", "out"}


def test_return_state_under_vmap_and_filter() -> None:
    arch, params, data = _setup()
    mse = _mse(arch)
    opt = fparams.optim.sgd(0.1, momentum=0.9)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Dict[str, Tensor]:
        _, state = fparams.adapt(mse, p, xs, ys, lr=opt, steps=2, filter="2.*", return_state=True)
        return state.momentum.trace

    vm = fparams.map_tasks(task, strategy="vmap")(params, *data)
    lp = fparams.map_tasks(task, strategy="loop")(params, *data)
    assert sorted(vm) == ["2.bias", "2.weight"]
    assert_dicts_close(vm, lp, **TOL)


def test_return_state_with_plain_rates_gives_their_state() -> None:
    # every form of lr is one transformation, so return_state works for each
    arch, params, data = _setup()
    mse, xs, ys = _mse(arch), data[0][0], data[1][0]
    fast, state = fparams.adapt(mse, params, xs, ys, lr=0.1, steps=2, return_state=True)
    assert state == fparams.optim.EmptyState()
    assert_dicts_close(fast, fparams.adapt(mse, params, xs, ys, lr=0.1, steps=2), rtol=0, atol=0)
    out = fparams.adapt(mse, params, xs, ys, lr=[0.1, 0.2], steps=2, return_state=True)
    assert isinstance(out, fparams.AdaptedState) and out.state.step == 2
