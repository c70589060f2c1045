"""fparams.adapt against an inner loop written by hand with torch.autograd.grad."""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import (
    assert_dicts_close,
    grads_wrt,
    leaves,
    loss_fn,
    ref_adapt,
    rel_err,
    task_data,
)

TOL = dict(rtol=1e-10, atol=1e-12)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    arch, params, _ = fparams.split(net)
    xs, ys, xq, yq = (t[0] for t in task_data(1, shots=6, outputs=2, seed=seed))

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    return mse, leaves(params), (xs, ys), (xq, yq)


def _rates(params: Dict[str, Tensor]) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        k: (0.05 + 0.1 * torch.rand(p.shape, generator=g, dtype=p.dtype)).requires_grad_()
        for k, p in params.items()
    }


# name -> lr factory taking the params; the rates that require grad get meta-gradients
LRS: Dict[str, Callable[[Dict[str, Tensor]], Any]] = {
    "float": lambda p: 0.1,
    "int": lambda p: 1,
    "tensor": lambda p: torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
    "dict": _rates,
}


def _lr_leaves(lr: Any) -> Dict[str, Tensor]:
    if isinstance(lr, Tensor):
        return {"lr": lr}
    if isinstance(lr, dict):
        return {f"lr.{k}": v for k, v in lr.items()}
    return {}


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("lr_kind", sorted(LRS))
def test_adapt_matches_autograd_reference(lr_kind: str, steps: int, first_order: bool) -> None:
    mse, params, support, query = _setup()
    lr = LRS[lr_kind](params)
    fast = fparams.adapt(mse, params, *support, lr=lr, steps=steps, first_order=first_order)
    ref = ref_adapt(mse, params, *support, lr=lr, steps=steps, first_order=first_order)
    assert list(fast) == list(params)
    assert_dicts_close(fast, ref, **TOL)
    # meta-gradients: into the params and into every learned rate
    wrt = {**params, **_lr_leaves(lr)}
    got = grads_wrt(mse(fast, *query), wrt)
    want = grads_wrt(mse(ref, *query), wrt)
    assert_dicts_close(got, want, **TOL)
    for k in _lr_leaves(lr):
        assert got[k].abs().sum() > 0, f"{k} got no meta-gradient"


def test_first_order_really_differs_from_second_order() -> None:
    # keeps the first_order comparison above from passing trivially
    mse, params, support, query = _setup()
    second = grads_wrt(mse(fparams.adapt(mse, params, *support, lr=0.5, steps=2), *query), params)
    first = grads_wrt(
        mse(fparams.adapt(mse, params, *support, lr=0.5, steps=2, first_order=True), *query), params
    )
    assert rel_err(first, second) > 1e-3


def test_inputs_are_left_untouched() -> None:
    mse, params, support, _ = _setup()
    before = {k: (t, t.detach().clone(), t._version) for k, t in params.items()}
    fparams.adapt(mse, params, *support, lr=0.1, steps=2)
    for k, (t, value, version) in before.items():
        assert params[k] is t and t._version == version
        torch.testing.assert_close(t.detach(), value, rtol=0, atol=0)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize(
    "head",
    ["2.*", ["2.weight", "2.bias"], lambda k, t: k.startswith("2.")],
    ids=["glob", "names", "predicate"],
)
def test_filter_adapts_only_the_head(head: Any, first_order: bool) -> None:
    # ANIL: the body stays as it is, and its meta-gradient is the outer one
    mse, params, support, query = _setup()
    fast = fparams.adapt(mse, params, *support, lr=0.3, steps=2, filter=head, first_order=first_order)
    ref = ref_adapt(
        mse, params, *support, lr=0.3, steps=2, only=["2.weight", "2.bias"], first_order=first_order
    )
    assert list(fast) == list(params), "adapt must keep the order of the params' keys"
    assert fast["0.weight"] is params["0.weight"] and fast["0.bias"] is params["0.bias"]
    assert not torch.equal(fast["2.weight"], params["2.weight"])
    assert_dicts_close(fast, ref, **TOL)
    got = grads_wrt(mse(fast, *query), params)
    assert_dicts_close(got, grads_wrt(mse(ref, *query), params), **TOL)
    assert got["0.weight"].abs().sum() > 0
    # and it differs from adapting everything
    full = grads_wrt(mse(fparams.adapt(mse, params, *support, lr=0.3, steps=2), *query), params)
    assert rel_err(got, full) > 1e-3


def test_filter_with_dict_rates_for_the_head_only() -> None:
    mse, params, support, query = _setup()
    rates = {k: v for k, v in _rates(params).items() if k.startswith("2.")}
    fast = fparams.adapt(mse, params, *support, lr=rates, filter="2.*")
    ref = ref_adapt(mse, params, *support, lr=rates, only=list(rates))
    assert_dicts_close(fast, ref, **TOL)
    wrt = {**params, **rates}
    assert_dicts_close(grads_wrt(mse(fast, *query), wrt), grads_wrt(mse(ref, *query), wrt), **TOL)


def test_zero_steps_returns_the_params() -> None:
    mse, params, support, _ = _setup()
    fast = fparams.adapt(mse, params, *support, lr=0.1, steps=0)
    assert fast is not params
    assert list(fast) == list(params)
    assert all(fast[k] is params[k] for k in params)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_buffers_are_passed_and_updated_like_a_native_loop(first_order: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1)).double()
    arch, params, buffers = fparams.split(net)
    params = leaves(params)
    xs, ys, xq, yq = (t[0] for t in task_data(1, shots=8))

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor, buffers: Dict[str, Tensor]) -> Tensor:
        return loss_fn(arch(p, x, buffers=buffers), y)

    mine, theirs = fparams.clone(buffers), fparams.clone(buffers)
    fast = fparams.adapt(mse, params, xs, ys, lr=0.2, steps=2, buffers=mine, first_order=first_order)
    ref = ref_adapt(
        lambda p, x, y: loss_fn(torch.func.functional_call(net, {**p, **theirs}, (x,)), y),
        params,
        xs,
        ys,
        lr=0.2,
        steps=2,
        first_order=first_order,
    )
    assert_dicts_close(fast, ref, **TOL)
    assert_dicts_close(mine, theirs, **TOL)  # two updates of the running statistics
    assert int(mine["1.num_batches_tracked"]) == 2
    got = grads_wrt(mse(fast, xq, yq, buffers=fparams.clone(mine)), params)
    want = grads_wrt(mse(ref, xq, yq, buffers=fparams.clone(theirs)), params)
    assert_dicts_close(got, want, **TOL)
    # the module's own buffers are not the ones updated
    assert float(net[1].running_mean.abs().sum()) == 0.0


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1.5, True, "2", None])
def test_steps_of_a_wrong_type(steps: Any) -> None:
    mse, params, support, _ = _setup()
    with pytest.raises(TypeError, match=r"^fparams\.adapt: `steps` must be an int; got "):
        fparams.adapt(mse, params, *support, lr=0.1, steps=steps)


def test_negative_steps() -> None:
    mse, params, support, _ = _setup()
    with pytest.raises(ValueError, match=r"^fparams\.adapt: `steps` must be an int >= 0; got -1\.$"):
        fparams.adapt(mse, params, *support, lr=0.1, steps=-1)


@pytest.mark.parametrize("lr", ["0.1", None, True, {0.1}, object()])  # [0.1]: one rate per step
def test_bad_lr_type(lr: Any) -> None:
    mse, params, support, _ = _setup()
    with pytest.raises(
        TypeError,
        match=r"^fparams\.adapt: `lr` must be a number, a tensor, a dict of per-parameter rates, a list "
        r"of per-step rates or an fparams\.optim optimizer; got ",
    ):
        fparams.adapt(mse, params, *support, lr=lr)


def test_lr_dict_missing_and_unknown_keys() -> None:
    mse, params, support, _ = _setup()
    rates = _rates(params)
    del rates["0.bias"]
    with pytest.raises(ValueError, match=r"fit the params\. Missing key\(s\): '0\.bias'\. Give one rate"):
        fparams.adapt(mse, params, *support, lr=rates)
    rates = {**_rates(params), "nope": torch.ones(())}
    with pytest.raises(ValueError, match=r"fit the params\. Unexpected key\(s\): 'nope'\. Give one rate"):
        fparams.adapt(mse, params, *support, lr=rates)
    with pytest.raises(ValueError, match=r"`lr` is a dict of per-parameter rates"):
        fparams.adapt(mse, params, *support, lr={"nope": torch.ones(())})


def test_lr_dict_is_checked_even_without_steps() -> None:
    mse, params, support, _ = _setup()
    with pytest.raises(ValueError, match=r"Missing key\(s\)"):
        fparams.adapt(mse, params, *support, lr={}, steps=0)


def test_filter_selecting_nothing() -> None:
    mse, params, support, _ = _setup()
    with pytest.raises(ValueError, match=r"fparams\.adapt: `filter` selects no parameter"):
        fparams.adapt(mse, params, *support, lr=0.1, filter=lambda k, t: False)
    with pytest.raises(ValueError, match=r"no_such\.\*"):
        fparams.adapt(mse, params, *support, lr=0.1, filter="no_such.*")


def test_params_must_be_a_dict() -> None:
    mse, params, support, _ = _setup()
    with pytest.raises(TypeError, match=r"fparams\.adapt: `params` must be a dict of tensors .*; got list"):
        fparams.adapt(mse, list(params.values()), *support, lr=0.1)
