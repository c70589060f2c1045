"""split and Architecture: names, identity, calls against the module itself, strict keys, bind."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import (
    NETS,
    TiedNet,
    assert_module_untouched,
    assert_untouched,
    flat_weights_follow_slots,
    grads_of,
    loss_fn,
    make_input,
    make_net,
    make_target,
    module_snapshot,
    snapshot,
)

ALL = sorted(NETS)


# -- split ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_split_gives_the_modules_own_tensors_under_their_names(name: str) -> None:
    net = make_net(name)
    arch, params, buffers = fparams.split(net)
    assert list(params) == [k for k, _ in net.named_parameters()]
    assert list(buffers) == [k for k, _ in net.named_buffers()]
    for k, p in net.named_parameters():
        assert params[k] is p
    for k, b in net.named_buffers():
        assert buffers[k] is b
    assert arch.module is net
    assert arch.param_names == frozenset(params)
    assert arch.buffer_names == frozenset(buffers)


def test_split_lists_a_tied_tensor_once_under_its_first_name() -> None:
    net = TiedNet()
    _, params, _ = fparams.split(net)
    assert sorted(params) == ["embed.weight", "hidden.bias", "hidden.weight"]
    assert len(params) == len(list(net.parameters()))
    assert len(list(net.named_parameters(remove_duplicate=False))) == 4


@pytest.mark.parametrize("name", ALL)
def test_gradients_through_split_params_land_on_the_module(name: str) -> None:
    net = make_net(name)
    ref = copy.deepcopy(net)
    x, y = make_input(name), make_target(name)
    arch, params, buffers = fparams.split(net)
    loss_fn(arch(params, x), y).backward()
    loss_fn(ref(x), y).backward()
    got, want = grads_of(net), grads_of(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# -- Architecture.__call__ ------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ALL)
def test_call_equals_the_module_call_and_uses_the_module_buffers(name: str, train: bool) -> None:
    net = make_net(name).train(train)
    ref = copy.deepcopy(net)
    x = make_input(name)
    arch, params, _ = fparams.split(net)
    snap = snapshot(params)
    out = arch(params, x)
    torch.testing.assert_close(out, ref(x))
    assert_untouched(params, snap)  # the dict, its tensors, their values and versions
    for k, p in net.named_parameters():
        assert p is params[k], k  # the module holds its own parameters again
    # buffers=None: the module's own buffers, updated as the module call updates them.
    for (k, b), (_, rb) in zip(net.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, rb, msg=lambda m, k=k: f"{k}: {m}")
    assert flat_weights_follow_slots(net) == []


def test_call_passes_positional_and_keyword_arguments() -> None:
    class Affine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([2.0, 3.0]))

        def forward(self, x: Tensor, y: Tensor, *, scale: float = 1.0) -> Tensor:
            return (self.w * x + y) * scale

    arch, params, _ = fparams.split(Affine())
    out = arch({"w": torch.tensor([1.0, -1.0])}, torch.ones(2), torch.tensor([5.0, 5.0]), scale=10.0)
    torch.testing.assert_close(out, torch.tensor([60.0, 40.0]))


def test_call_with_explicit_buffers_uses_them_and_leaves_the_module_alone() -> None:
    net = make_net("batchnorm")
    x = make_input("batchnorm")
    arch, params, buffers = fparams.split(net)
    snap = module_snapshot(net)
    given = {k: b.clone() for k, b in buffers.items()}
    given["1.running_mean"] = torch.linspace(-1, 1, 6)
    given["1.running_var"] = torch.linspace(0.5, 2, 6)

    # eval mode: the output is that of a module holding these statistics.
    net.eval()
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref[1].running_mean.copy_(given["1.running_mean"])
        ref[1].running_var.copy_(given["1.running_var"])
    torch.testing.assert_close(arch(params, x, buffers=given), ref(x))
    assert not torch.allclose(arch(params, x, buffers=given), arch(params, x))

    # train mode: the given buffers take the running update, the module's do not.
    net.train()
    ref.train()
    arch(params, x, buffers=given)
    ref(x)
    torch.testing.assert_close(given["1.running_mean"], ref[1].running_mean)
    torch.testing.assert_close(given["1.num_batches_tracked"], ref[1].num_batches_tracked)
    assert_module_untouched(net, snap)


def test_call_with_other_params_does_not_change_the_module() -> None:
    net = make_net("lstm")
    x = make_input("lstm")
    ref, pristine = copy.deepcopy(net), copy.deepcopy(net)
    arch, params, _ = fparams.split(net)
    snap = module_snapshot(net)
    new = {k: p.detach() * 0.5 for k, p in params.items()}
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(arch(new, x), ref(x))
    assert_module_untouched(net, snap)
    assert flat_weights_follow_slots(net) == []
    torch.testing.assert_close(net(x), pristine(x))


# -- strict keys ------------------------------------------------------------------------


def _keyed(net: nn.Module) -> Dict[str, Tensor]:
    return dict(net.named_parameters())


KEY_ERRORS = [
    pytest.param(
        lambda p, b: ({k: v for k, v in p.items() if k not in ("3.bias", "0.weight")}, None),
        r"`params` does not match the module\. Missing key\(s\): '0\.weight', '3\.bias'\. Pass every",
        id="missing",
    ),
    pytest.param(
        lambda p, b: ({**p, "zz": torch.ones(1), "aa.weight": torch.ones(1)}, None),
        r"`params` does not match the module\. Unexpected key\(s\): 'aa\.weight', 'zz'\. Pass every",
        id="unexpected",
    ),
    pytest.param(
        lambda p, b: ({**{k: v for k, v in p.items() if k != "1.weight"}, "x": torch.ones(1)}, None),
        r"Missing key\(s\): '1\.weight'\. Unexpected key\(s\): 'x'\. Pass every name from "
        r"fparams\.split\(module\)",
        id="both",
    ),
    pytest.param(
        lambda p, b: (p, {k: v for k, v in b.items() if k != "1.running_var"}),
        r"fparams\.Architecture(\.bind)?: `buffers` does not match the module\. Missing key\(s\): "
        r"'1\.running_var'\.",
        id="buffers-missing",
    ),
    pytest.param(
        lambda p, b: (p, {**b, "1.extra": torch.ones(1)}),
        r"`buffers` does not match the module\. Unexpected key\(s\): '1\.extra'\.",
        id="buffers-unexpected",
    ),
]


@pytest.mark.parametrize("method", ["call", "bind"])
@pytest.mark.parametrize("edit, message", KEY_ERRORS)
def test_strict_keys_list_missing_and_unexpected_sorted(
    edit: Callable[..., Any], message: str, method: str
) -> None:
    net = make_net("batchnorm")
    arch, params, buffers = fparams.split(net)
    snap = module_snapshot(net)
    p, b = edit(params, buffers)
    with pytest.raises(ValueError, match=message):
        if method == "call":
            arch(p, make_input("batchnorm"), buffers=b)
        else:
            arch.bind(p, b)
    assert_module_untouched(net, snap)


# -- a failing call leaves the module as it was ------------------------------------------


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x: Tensor) -> Tensor:
        self.lin(x)
        self.seen.add_(1)
        raise RuntimeError("boom in forward")


FAILURES = [
    pytest.param("lstm", lambda arch, p: arch(p, torch.randn(3, 2, 7)), RuntimeError, id="bad-input-shape"),
    pytest.param("mlp", lambda arch, p: arch({"0.weight": p["0.weight"]}, torch.randn(5, 4)), ValueError,
                 id="missing-key"),
    pytest.param("mlp", lambda arch, p: arch({**p, "0.weight": torch.ones(2, 2)}, torch.randn(5, 4)),
                 ValueError, id="bad-param-shape"),
    pytest.param("exploding", lambda arch, p: arch(p, torch.randn(2, 4), buffers={"seen": torch.zeros(4)}),
                 RuntimeError, id="forward-raises"),
]  # fmt: skip


@pytest.mark.parametrize("name, call, exc", FAILURES)
def test_module_is_unchanged_after_a_failing_call(name: str, call: Callable[..., Any], exc: type) -> None:
    net = Exploding() if name == "exploding" else make_net(name)
    arch, params, _ = fparams.split(net)
    snap = module_snapshot(net)
    slots = {k: dict(m._parameters) for k, m in net.named_modules()}
    with pytest.raises(exc):
        call(arch, {k: p.detach() * 2 for k, p in params.items()})
    assert_module_untouched(net, snap)
    assert {k: dict(m._parameters) for k, m in net.named_modules()} == slots
    assert flat_weights_follow_slots(net) == []


# -- bind ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_bind_is_a_structural_copy_holding_the_given_tensors(name: str) -> None:
    net = make_net(name)
    x = make_input(name)
    snap = module_snapshot(net)
    arch, params, buffers = fparams.split(net)
    new = {k: p.detach() * 1.5 for k, p in params.items()}
    bound = arch.bind(new)

    assert type(bound) is type(net) and bound is not net
    for (k, m), (_, bm) in zip(net.named_modules(), bound.named_modules()):
        assert bm is not m, k
        assert type(bm) is type(m), k
    for k, p in bound.named_parameters():
        assert p is new[k], k
    for k, b in bound.named_buffers():
        assert b is buffers[k], k  # buffers=None keeps the module's own
    # tied slots stay tied, shared submodules stay shared, both as in the original
    orig_ids = [id(p) for _, p in net.named_parameters(remove_duplicate=False)]
    bound_ids = [id(p) for _, p in bound.named_parameters(remove_duplicate=False)]
    assert [orig_ids.index(i) for i in orig_ids] == [bound_ids.index(i) for i in bound_ids]
    assert len(list(bound.parameters())) == len(list(net.parameters()))
    assert flat_weights_follow_slots(bound) == []

    ref = copy.deepcopy(net).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(bound.eval()(x), ref(x))
    assert_module_untouched(net, snap)
    assert net.training is True  # .eval() on the copy did not reach the original


def test_bind_with_buffers_puts_them_in_the_copy() -> None:
    net = make_net("batchnorm")
    arch, params, buffers = fparams.split(net)
    given = {k: b.clone() for k, b in buffers.items()}
    bound = arch.bind(params, given)
    for k, b in bound.named_buffers():
        assert b is given[k]
    for k, p in bound.named_parameters():
        assert p is params[k]
    assert net[1].running_mean is buffers["1.running_mean"]


def test_bind_tied_weights_stay_tied_and_gradients_flow_to_the_given_tensors() -> None:
    net = TiedNet()
    arch, params, _ = fparams.split(net)
    new = fparams.clone(params)
    bound = arch.bind(new)
    assert bound.out.weight is bound.embed.weight is new["embed.weight"]
    x, y = make_input("tied"), make_target("tied")
    loss_fn(bound(x), y).backward()
    ref = copy.deepcopy(net)
    loss_fn(ref(x), y).backward()
    torch.testing.assert_close(net.embed.weight.grad, ref.embed.weight.grad)


def test_split_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"fparams\.split: `module` must be a torch\.nn\.Module; got dict\."):
        fparams.split({"w": torch.ones(1)})  # type: ignore[arg-type]
