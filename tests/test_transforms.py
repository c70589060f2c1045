"""Pure dict transforms: results against hand computations, purity, and every error."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict

import pytest
import torch
from torch import Tensor

import fparams
from tests.helpers import assert_untouched, snapshot


def _params() -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "body.0.weight": torch.randn(3, 2, generator=g, requires_grad=True),
        "body.0.bias": torch.randn(3, generator=g, requires_grad=True),
        "head.weight": torch.randn(1, 3, generator=g, requires_grad=True),
        "head.bias": torch.randn(1, generator=g, requires_grad=True),
    }


def _like(params: Dict[str, Tensor], seed: int) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g) for k, p in params.items()}


# -- clone ------------------------------------------------------------------


def test_clone_copies_values_into_new_storage_and_keeps_the_graph() -> None:
    params = _params()
    out = fparams.clone(params)
    assert list(out) == list(params)
    for k, p in params.items():
        assert out[k] is not p
        assert out[k].data_ptr() != p.data_ptr()
        torch.testing.assert_close(out[k], p, rtol=0, atol=0)
        assert out[k].grad_fn is not None
    weights = {k: torch.full(p.shape, float(i + 1)) for i, (k, p) in enumerate(params.items())}
    sum((out[k] * weights[k]).sum() for k in out).backward()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, weights[k])


def test_clone_of_a_non_grad_tensor_is_a_copy() -> None:
    t = torch.arange(4.0)
    out = fparams.clone({"t": t})
    out["t"].add_(1)
    torch.testing.assert_close(t, torch.arange(4.0))


# -- detach -----------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
def test_detach_cuts_the_graph_and_shares_storage(requires_grad: bool) -> None:
    leaf = torch.randn(3, requires_grad=True)
    d = {"w": leaf * 2, "leaf": leaf, "steps": torch.tensor([3])}
    out = fparams.detach(d, requires_grad=requires_grad)
    for k in d:
        assert out[k] is not d[k]
        assert out[k].grad_fn is None
        assert out[k].data_ptr() == d[k].data_ptr()
        torch.testing.assert_close(out[k], d[k].detach(), rtol=0, atol=0)
    assert out["w"].requires_grad is requires_grad
    assert out["leaf"].requires_grad is requires_grad
    assert out["steps"].requires_grad is False  # integers can never require grad
    if requires_grad:
        out["w"].sum().backward()
        assert leaf.grad is None
        torch.testing.assert_close(out["w"].grad, torch.ones(3))


def test_detach_default_is_no_grad() -> None:
    out = fparams.detach({"w": torch.ones(2, requires_grad=True)})
    assert out["w"].requires_grad is False


# -- apply_updates ------------------------------------------------------------


def test_apply_updates_adds_updates_and_passes_others_through() -> None:
    params = _params()
    updates = {"head.weight": torch.full((1, 3), 0.5), "body.0.bias": torch.tensor([1.0, -1.0, 2.0])}
    out = fparams.apply_updates(params, updates)
    assert list(out) == list(params)
    torch.testing.assert_close(out["head.weight"], params["head.weight"].detach() + 0.5)
    torch.testing.assert_close(
        out["body.0.bias"], params["body.0.bias"].detach() + torch.tensor([1.0, -1.0, 2.0])
    )
    assert out["body.0.weight"] is params["body.0.weight"]
    assert out["head.bias"] is params["head.bias"]


def test_apply_updates_is_differentiable_in_the_update() -> None:
    p = {"w": torch.ones(3, requires_grad=True)}
    u = {"w": torch.tensor([1.0, 2.0, 3.0], requires_grad=True)}
    out = fparams.apply_updates(p, u)
    (out["w"] ** 2).sum().backward()
    expected = 2 * (torch.ones(3) + torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(u["w"].grad, expected)
    torch.testing.assert_close(p["w"].grad, expected)


# -- sgd_step -----------------------------------------------------------------


def test_sgd_step_with_a_float_rate() -> None:
    params = _params()
    grads = _like(params, 1)
    del grads["body.0.weight"]
    out = fparams.sgd_step(params, grads, lr=0.25)
    for k, p in params.items():
        if k in grads:
            torch.testing.assert_close(out[k], p.detach() - 0.25 * grads[k])
        else:
            assert out[k] is p


def test_sgd_step_learned_rate_gets_the_hand_computed_gradient() -> None:
    # L(lr) = sum_k sum((p_k - lr * g_k) ** 2)  =>  dL/dlr = sum_k sum(-2 g_k (p_k - lr g_k)).
    params = {k: p.detach() for k, p in _params().items()}
    grads = _like(params, 2)
    lr = torch.tensor(0.3, requires_grad=True)
    out = fparams.sgd_step(params, grads, lr=lr)
    loss = sum((t**2).sum() for t in out.values())
    (dlr,) = torch.autograd.grad(loss, lr)
    expected = sum((-2 * grads[k] * (params[k] - 0.3 * grads[k])).sum() for k in params)
    torch.testing.assert_close(dlr, expected)


def test_sgd_step_with_a_dict_of_rates_meta_sgd() -> None:
    params = {k: p.detach() for k, p in _params().items()}
    grads = _like(params, 3)
    del grads["head.bias"]
    lrs = {k: torch.full(params[k].shape, 0.1 * (i + 1), requires_grad=True) for i, k in enumerate(grads)}
    out = fparams.sgd_step(params, grads, lr=lrs)
    assert out["head.bias"] is params["head.bias"]
    for k in grads:
        torch.testing.assert_close(out[k], params[k] - lrs[k].detach() * grads[k])
    loss = sum((t**2).sum() for t in out.values())
    dl = torch.autograd.grad(loss, list(lrs.values()))
    for (k, lr), d in zip(lrs.items(), dl):
        # d/dlr_k of sum((p - lr * g) ** 2), elementwise
        torch.testing.assert_close(d, -2 * grads[k] * (params[k] - lr.detach() * grads[k]))


def test_sgd_step_rates_for_params_without_a_gradient_are_ignored() -> None:
    p = {"w": torch.ones(2), "frozen": torch.ones(1)}
    out = fparams.sgd_step(p, {"w": torch.ones(2)}, lr={"w": torch.tensor(0.5), "frozen": torch.tensor(9.0)})
    torch.testing.assert_close(out["w"], torch.full((2,), 0.5))
    assert out["frozen"] is p["frozen"]


def test_sgd_step_and_adapt_reject_a_rate_for_no_parameter_alike() -> None:
    # one rule for a dict of rates: a key that names no parameter is a mistake
    p = {"w": torch.ones(2)}
    lr = {"w": torch.tensor(0.5), "other": torch.tensor(9.0)}
    for call, where in [
        (lambda: fparams.sgd_step(p, {"w": torch.ones(2)}, lr=lr), "sgd_step"),
        (lambda: fparams.adapt(lambda q: (q["w"] ** 2).sum(), p, lr=lr), "adapt"),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == (
            f"fparams.{where}: `lr` is a dict of per-parameter rates but does not fit the params. "
            "Unexpected key(s): 'other'. Give one rate per parameter that gets a gradient."
        )


# -- map_params -----------------------------------------------------------------


def test_map_params_over_one_and_several_dicts() -> None:
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([3.0])}
    b = {"x": torch.tensor([10.0, 20.0]), "y": torch.tensor([30.0])}
    c = {"y": torch.tensor([300.0]), "x": torch.tensor([100.0, 200.0])}  # order of keys is free
    assert fparams.map_params(torch.neg, a).keys() == a.keys()
    torch.testing.assert_close(fparams.map_params(torch.neg, a)["x"], torch.tensor([-1.0, -2.0]))
    out = fparams.map_params(lambda p, q, r: p + q * r, a, b, c)
    torch.testing.assert_close(out["x"], torch.tensor([1001.0, 4002.0]))
    torch.testing.assert_close(out["y"], torch.tensor([9003.0]))


# -- partition / combine --------------------------------------------------------

FILTERS = [
    pytest.param("head.*", ["head.weight", "head.bias"], id="glob"),
    pytest.param("*.bias", ["body.0.bias", "head.bias"], id="glob-suffix"),
    pytest.param("head.weight", ["head.weight"], id="exact-name"),
    pytest.param(re.compile(r"\.bias$"), ["body.0.bias", "head.bias"], id="regex"),
    pytest.param(re.compile(r"0\.w"), ["body.0.weight"], id="regex-search-not-match"),
    pytest.param(
        ["head.bias", re.compile(r"^body")], ["body.0.weight", "body.0.bias", "head.bias"], id="list"
    ),
    pytest.param(("head.weight",), ["head.weight"], id="tuple"),
    pytest.param((n for n in ["body.0.weight"]), ["body.0.weight"], id="generator"),
    pytest.param([], [], id="empty-iterable"),
    pytest.param(lambda name, t: t.dim() == 1, ["body.0.bias", "head.bias"], id="predicate-tensor"),
    pytest.param(
        lambda name, t: name.startswith("body"), ["body.0.weight", "body.0.bias"], id="predicate-name"
    ),
    pytest.param(lambda name, t: False, [], id="predicate-none"),
]


@pytest.mark.parametrize("filter, selected", FILTERS)
def test_partition_selects_by_every_filter_form(filter: Any, selected: list) -> None:
    params = _params()
    snap = snapshot(params)
    picked, rest = fparams.partition(params, filter)
    assert list(picked) == [k for k in params if k in selected]
    assert list(rest) == [k for k in params if k not in selected]
    for k in params:
        assert (picked.get(k) if k in selected else rest.get(k)) is params[k]
    merged = fparams.combine(picked, rest)
    assert sorted(merged) == sorted(params)
    assert all(merged[k] is params[k] for k in params)
    assert_untouched(params, snap)


def test_adapt_only_the_head_is_one_argument() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    arch, params, _ = fparams.split(net)
    head, body = fparams.partition(params, "1.*")
    x = torch.randn(4, 2)
    loss = arch(fparams.combine(head, body), x).pow(2).sum()
    grads = dict(zip(head, torch.autograd.grad(loss, list(head.values()))))
    new = fparams.combine(fparams.sgd_step(head, grads, lr=0.1), body)
    assert new["0.weight"] is net[0].weight
    torch.testing.assert_close(new["1.weight"], net[1].weight.detach() - 0.1 * grads["1.weight"])


def test_combine_of_nothing_and_of_one() -> None:
    assert fparams.combine() == {}
    t = torch.ones(1)
    assert fparams.combine({"a": t})["a"] is t


# -- purity -----------------------------------------------------------------------

PURE: Dict[str, Callable[[Dict[str, Tensor], Dict[str, Tensor]], Any]] = {
    "clone": lambda p, g: fparams.clone(p),
    "detach": lambda p, g: fparams.detach(p),
    "detach-requires-grad": lambda p, g: fparams.detach(p, requires_grad=True),
    "apply_updates": lambda p, g: fparams.apply_updates(p, g),
    "sgd_step-float": lambda p, g: fparams.sgd_step(p, g, lr=0.1),
    "sgd_step-tensor": lambda p, g: fparams.sgd_step(p, g, lr=torch.tensor(0.1, requires_grad=True)),
    "sgd_step-dict": lambda p, g: fparams.sgd_step(p, g, lr={k: torch.tensor(0.1) for k in g}),
    "map_params": lambda p, g: fparams.map_params(torch.add, p, g),
    "partition": lambda p, g: fparams.partition(p, "head.*"),
    "combine": lambda p, g: fparams.combine(*fparams.partition(p, "head.*")),
    "zeros_like": lambda p, g: fparams.zeros_like(p),
}


@pytest.mark.parametrize("fn", list(PURE.values()), ids=list(PURE))
def test_pure_functions_leave_inputs_untouched(fn: Callable[..., Any]) -> None:
    params = _params()
    grads = _like(params, 4)
    order_p, order_g = list(params), list(grads)
    snap_p, snap_g = snapshot(params), snapshot(grads)
    out = fn(params, grads)
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert o is not params and o is not grads
    # Using the results (even in place) must not reach back into the inputs' dicts.
    for o in outs:
        o.clear()
    assert list(params) == order_p and list(grads) == order_g
    assert_untouched(params, snap_p)
    assert_untouched(grads, snap_g)


def test_zeros_like() -> None:
    params = _params()
    out = fparams.zeros_like(params)
    for k, p in params.items():
        assert out[k].shape == p.shape and out[k].dtype == p.dtype
        assert not out[k].requires_grad
        assert torch.count_nonzero(out[k]) == 0


# -- errors -------------------------------------------------------------------------

ONE = torch.ones(2)
P = {"a": ONE, "b": ONE}

ERRORS = [
    pytest.param(lambda: fparams.clone([torch.ones(1)]), TypeError,
                 r"fparams\.clone: `tensors` must be a dict of tensors keyed by name; got list", id="clone"),
    pytest.param(lambda: fparams.detach(torch.ones(1)), TypeError,
                 r"fparams\.detach: `tensors` must be a dict .* got Tensor", id="detach"),
    pytest.param(lambda: fparams.apply_updates([1], P), TypeError,
                 r"fparams\.apply_updates: `params` must be a dict .* got list", id="apply-params"),
    pytest.param(lambda: fparams.apply_updates(P, None), TypeError,
                 r"fparams\.apply_updates: `updates` must be a dict .* got NoneType", id="apply-updates"),
    pytest.param(lambda: fparams.apply_updates(P, {"z": ONE, "c": ONE, "a": ONE}),
                 ValueError,
                 r"^fparams\.apply_updates: `updates` does not have the expected keys\. "
                 r"Unexpected key\(s\): 'c', 'z'\. Every key must name a parameter\.$",
                 id="apply-extra-keys"),
    pytest.param(lambda: fparams.sgd_step(P, {"a": ONE, "q": ONE}, lr=0.1), ValueError,
                 r"^fparams\.sgd_step: `grads` does not have the expected keys\. Unexpected key\(s\): 'q'\.",
                 id="sgd-extra"),
    pytest.param(lambda: fparams.sgd_step(P, {"b": ONE, "a": ONE}, lr={"x": torch.ones(1)}),
                 ValueError, r"^fparams\.sgd_step: `lr` is a dict of per-parameter rates but does not "
                 r"fit the params\. Missing key\(s\): 'a', 'b'\. Unexpected key\(s\): 'x'\.",
                 id="sgd-lr-dict-missing"),
    pytest.param(lambda: fparams.sgd_step(P, P, lr="0.1"), TypeError,
                 r"^fparams\.sgd_step: `lr` must be a number, a tensor or a dict of per-parameter rates; "
                 r"got str '0\.1'\.$",
                 id="sgd-lr-type"),
    pytest.param(lambda: fparams.sgd_step(P, [1], lr=0.1), TypeError,
                 r"fparams\.sgd_step: `grads` must be a dict", id="sgd-grads-type"),
    pytest.param(lambda: fparams.map_params(torch.add, P, {"a": ONE, "c": ONE}), ValueError,
                 r"^fparams\.map_params: `rest\[0\]` does not have the expected keys\. Missing key\(s\): "
                 r"'b'\. Unexpected key\(s\): 'c'\. Every dict must have the keys of `tensors`\.$",
                 id="map-keys"),
    pytest.param(lambda: fparams.map_params(torch.add, P, P, {"a": ONE}), ValueError,
                 r"`rest\[1\]` does not have the expected keys\. Missing key\(s\): 'b'\. Every",
                 id="map-keys-second"),
    pytest.param(lambda: fparams.map_params(torch.add, P, 3), TypeError,
                 r"fparams\.map_params: `rest\[0\]` must be a dict", id="map-type"),
    pytest.param(lambda: fparams.partition(P, "c*"), ValueError,
                 r"fparams\.partition: filter pattern\(s\) 'c\*' match no name; the names are \['a', 'b'\]",
                 id="partition-glob-no-match"),
    pytest.param(lambda: fparams.partition(P, ["a", re.compile("zz"), "q"]), ValueError,
                 r"filter pattern\(s\) 'zz', 'q' match no name", id="partition-some-no-match"),
    pytest.param(lambda: fparams.partition(P, 3), TypeError,
                 r"fparams\.partition: `filter` must be a glob string, a compiled regex, an iterable of "
                 r"those, or a predicate fn\(name, tensor\) -> bool; got int", id="partition-filter-type"),
    pytest.param(lambda: fparams.partition(P, ["a", 3]), TypeError,
                 r"fparams\.partition: every entry of `filter` must be a glob string or a compiled regex; "
                 r"got 3 of type int", id="partition-entry-type"),
    pytest.param(lambda: fparams.partition("ab", "a"), TypeError,
                 r"fparams\.partition: `tensors` must be a dict", id="partition-tensors-type"),
    pytest.param(lambda: fparams.combine({"a": torch.ones(1), "b": torch.ones(1)}, {"b": torch.ones(1)},
                                         {"a": torch.ones(1)}), ValueError,
                 r"fparams\.combine: key\(s\) 'b' appear in more than one dict", id="combine-clash"),
    pytest.param(lambda: fparams.combine(P, [1]), TypeError,
                 r"fparams\.combine: `dicts\[1\]` must be a dict", id="combine-type"),
    pytest.param(lambda: fparams.zeros_like(None), TypeError,
                 r"fparams\.zeros_like: `tensors` must be a dict", id="zeros-like"),
]  # fmt: skip


@pytest.mark.parametrize("call, exc, message", ERRORS)
def test_errors(call: Callable[[], Any], exc: type, message: str) -> None:
    with pytest.raises(exc, match=message):
        call()
