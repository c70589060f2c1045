"""learn2learn's module API: each shim against a copy.deepcopy reference and learn2learn's behaviour."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import (
    AffineTransform,
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    TransformedDistribution,
)

import fparams
from tests.helpers import (
    NETS,
    TiedNet,
    assert_module_untouched,
    flat_weights_follow_slots,
    grads_of,
    loss_fn,
    make_input,
    make_net,
    make_target,
    module_snapshot,
)

ALL = sorted(NETS)
RECURRENT = ["rnn", "lstm", "gru"]


def _slot_pattern(net: nn.Module) -> List[int]:
    """For each parameter slot (duplicates kept), the index of the first slot holding that tensor."""
    ids = [id(p) for _, p in net.named_parameters(remove_duplicate=False)]
    return [ids.index(i) for i in ids]


def _random_updates(net: nn.Module, seed: int = 5, skip: int = -1) -> List[Optional[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        None if i == skip else 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for i, p in enumerate(net.parameters())
    ]


def _updated_reference(net: nn.Module, updates: List[Optional[Tensor]]) -> nn.Module:
    """The independent reference for update_module: a deepcopy updated by hand."""
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for p, u in zip(ref.parameters(), updates):
            if u is not None:
                p.add_(u)
    return ref


def _assert_grads_equal(net: nn.Module, ref: nn.Module) -> None:
    got, want = grads_of(net), grads_of(ref)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}")
    assert any(g.abs().sum() > 0 for g in got.values())


# -- clone_module ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_clone_module_matches_a_deepcopy_and_gradients_reach_the_original(name: str) -> None:
    net = make_net(name).eval()
    ref = copy.deepcopy(net)
    snap = module_snapshot(net)
    x, y = make_input(name), make_target(name)

    clone = fparams.clone_module(net)
    assert_module_untouched(net, snap)

    torch.testing.assert_close(clone(x), ref(x))
    loss_fn(clone(x), y).backward()
    loss_fn(ref(x), y).backward()
    _assert_grads_equal(net, ref)
    # The original's tensors are the same objects, unchanged in value and version.
    assert_module_untouched(net, snap)


@pytest.mark.parametrize("name", ALL)
def test_clone_module_structure(name: str) -> None:
    net = make_net(name)
    clone = fparams.clone_module(net)
    assert type(clone) is type(net)
    for (k, m), (ck, cm) in zip(net.named_modules(), clone.named_modules()):
        assert k == ck and cm is not m and type(cm) is type(m)
    assert [k for k, _ in clone.named_parameters()] == [k for k, _ in net.named_parameters()]
    for (k, p), (_, c) in zip(net.named_parameters(), clone.named_parameters()):
        assert c is not p, k
        assert c.requires_grad == p.requires_grad, k
        assert (c.grad_fn is not None) == p.requires_grad, k
        torch.testing.assert_close(c, p, rtol=0, atol=0)
    # tied slots stay tied, a shared submodule keeps the parameter count
    assert _slot_pattern(clone) == _slot_pattern(net)
    assert len(list(clone.parameters())) == len(list(net.parameters()))
    # buffers that require grad are cloned, the others are the original's own
    for (k, b), (_, c) in zip(net.named_buffers(), clone.named_buffers()):
        if b.requires_grad:
            assert c is not b and c.grad_fn is not None, k
            torch.testing.assert_close(c, b, rtol=0, atol=0)
        else:
            assert c is b, k
    assert flat_weights_follow_slots(clone) == []
    assert flat_weights_follow_slots(net) == []


@pytest.mark.parametrize("value", [None, 3, "text", torch.ones(2), [nn.Linear(1, 1)]], ids=repr)
def test_clone_module_returns_non_modules_as_they_are(value: Any) -> None:
    assert fparams.clone_module(value) is value


def test_clone_module_passes_none_entries_of_a_module_list_through() -> None:
    net = nn.ModuleList([nn.Linear(3, 3), None, nn.Linear(3, 2)])
    clone = fparams.clone_module(net)
    assert len(clone) == 3 and clone[1] is None
    assert list(clone._modules) == ["0", "1", "2"]
    x = torch.randn(4, 3)
    torch.testing.assert_close(clone[2](clone[0](x)), net[2](net[0](x)))
    assert clone[0] is not net[0] and clone[0].weight is not net[0].weight


def test_clone_module_tied_weights_get_one_clone_and_both_gradients() -> None:
    net = TiedNet()
    ref = copy.deepcopy(net)
    clone = fparams.clone_module(net)
    assert clone.out.weight is clone.embed.weight
    assert clone.embed.weight is not net.embed.weight
    x, y = make_input("tied"), make_target("tied")
    loss_fn(clone(x), y).backward()
    # Reference: untie the weight by hand and add up the two gradients.
    ref.out.weight = nn.Parameter(ref.embed.weight.detach().clone())
    loss_fn(ref(x), y).backward()
    torch.testing.assert_close(net.embed.weight.grad, ref.embed.weight.grad + ref.out.weight.grad)


def test_clone_module_shared_submodule_is_copied_once() -> None:
    net = make_net("shared")
    clone = fparams.clone_module(net)
    assert clone[0] is clone[2] and clone[0] is not net[0]
    assert len(list(clone.parameters())) == len(list(net.parameters())) == 4
    assert len(list(clone.modules())) == len(list(net.modules()))


def test_clone_module_frozen_parameters_stay_frozen_and_get_no_gradient() -> None:
    net = make_net("frozen")
    clone = fparams.clone_module(net)
    assert clone[0].weight.requires_grad is False
    assert clone[0].bias.requires_grad is True
    x, y = make_input("frozen"), make_target("frozen")
    loss_fn(clone(x), y).backward()
    assert net[0].weight.grad is None
    assert net[0].bias.grad is not None


def test_clone_module_shares_running_statistics_with_the_original() -> None:
    # learn2learn shares buffers that do not require grad: a training-mode
    # forward of the clone moves the original's running statistics.
    net = make_net("batchnorm")
    ref = copy.deepcopy(net)
    x = make_input("batchnorm")
    clone = fparams.clone_module(net)
    assert clone[1].running_mean is net[1].running_mean
    clone(x)
    ref(x)
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(net[1].num_batches_tracked, ref[1].num_batches_tracked)
    assert not torch.equal(net[1].running_mean, torch.zeros(6))


def test_clone_module_buffer_that_requires_grad_gets_its_gradient() -> None:
    net = make_net("grad-buffer")
    ref = copy.deepcopy(net)
    clone = fparams.clone_module(net)
    assert clone.scale is not net.scale and clone.count is net.count
    x, y = make_input("grad-buffer"), make_target("grad-buffer")
    loss_fn(clone(x), y).backward()
    loss_fn(ref(x), y).backward()
    torch.testing.assert_close(net.scale.grad, ref.scale.grad)


def test_clone_module_memo_keeps_tensors_tied_across_calls() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    memo: Dict[int, Any] = {}
    ca, cb = fparams.clone_module(a, memo), fparams.clone_module(b, memo)
    assert ca.weight is cb.weight and ca.weight is not a.weight
    assert ca.bias is not cb.bias
    # without a memo, each call makes its own clone
    assert fparams.clone_module(a).weight is not fparams.clone_module(b).weight


@pytest.mark.parametrize("name", RECURRENT)
def test_clone_module_rnn_runs_on_the_cloned_tensors(name: str) -> None:
    net = make_net(name)
    clone = fparams.clone_module(net)
    for w, orig in zip(clone.rnn._flat_weights, net.rnn._flat_weights):
        assert w is not orig
    assert flat_weights_follow_slots(clone) == []
    # Changing the clone's weights (a new tensor in its slot, refreshed by
    # update_module) changes its output and not the original's.
    x = make_input(name)
    before = net(x)
    fparams.update_module(clone, [torch.ones_like(p) for p in clone.parameters()])
    assert not torch.allclose(clone(x), before)
    torch.testing.assert_close(net(x), before)


# -- update_module ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_update_module_matches_a_deepcopy_updated_by_hand(name: str) -> None:
    net = make_net(name).eval()
    snap = module_snapshot(net)
    x, y = make_input(name), make_target(name)
    updates = _random_updates(net, skip=1)
    ref = _updated_reference(net, updates)

    clone = fparams.clone_module(net)
    pattern = _slot_pattern(clone)
    out = fparams.update_module(clone, updates)
    assert out is clone
    assert _slot_pattern(clone) == pattern  # tied stay tied
    assert flat_weights_follow_slots(clone) == []
    for (k, c), (_, r) in zip(clone.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(c, r, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(clone(x), ref(x))

    # d(p + u)/dp = 1: the original gets the reference's gradient.
    loss_fn(clone(x), y).backward()
    loss_fn(ref(x), y).backward()
    _assert_grads_equal(net, ref)
    assert_module_untouched(net, snap)


def test_update_module_skips_none_updates_by_identity() -> None:
    net = fparams.clone_module(make_net("mlp"))
    before = list(net.parameters())
    fparams.update_module(net, [None, torch.ones(6), None, None])
    after = list(net.parameters())
    assert after[0] is before[0] and after[2] is before[2] and after[3] is before[3]
    torch.testing.assert_close(after[1], before[1] + 1)


def test_update_module_tied_parameter_is_updated_once() -> None:
    net = fparams.clone_module(TiedNet())
    w = net.embed.weight
    u = torch.full(w.shape, 0.25)
    fparams.update_module(net, [u if p is w else None for p in net.parameters()])
    assert net.out.weight is net.embed.weight
    torch.testing.assert_close(net.out.weight, w + 0.25)


def test_update_module_with_update_attributes_on_params_and_buffers() -> None:
    net = make_net("batchnorm")
    clone = fparams.clone_module(net)
    w, b, rm = clone[0].weight, clone[0].bias, clone[1].running_mean
    assert rm is net[1].running_mean  # a buffer shared with the original
    w.update = torch.full(w.shape, 0.5)
    rm.update = torch.arange(6.0)
    out = fparams.update_module(clone)
    assert out is clone
    torch.testing.assert_close(clone[0].weight, w + 0.5)
    torch.testing.assert_close(clone[1].running_mean, rm + torch.arange(6.0))
    assert clone[0].bias is b  # no `.update`: untouched
    assert net[1].running_mean is rm and torch.equal(rm, torch.zeros(6))
    # learn2learn consumes the attribute: it is never applied twice, not even
    # through another module that holds the same tensor.
    assert getattr(rm, "update", None) is None and getattr(w, "update", None) is None
    fparams.update_module(net)
    assert net[1].running_mean is rm


def test_update_module_with_update_attributes_keeps_ties_and_reaches_the_original() -> None:
    net = TiedNet()
    clone = fparams.clone_module(net)
    for p in clone.parameters():
        p.update = torch.full(p.shape, -0.1)
    fparams.update_module(clone)
    assert clone.out.weight is clone.embed.weight
    ref = _updated_reference(net, [torch.full(p.shape, -0.1) for p in net.parameters()])
    x, y = make_input("tied"), make_target("tied")
    torch.testing.assert_close(clone(x), ref(x))
    loss_fn(clone(x), y).backward()
    loss_fn(ref(x), y).backward()
    _assert_grads_equal(net, ref)


def test_update_module_grad_buffer_update_attribute_keeps_the_graph() -> None:
    net = make_net("grad-buffer")
    clone = fparams.clone_module(net)
    clone.scale.update = torch.tensor([1.0, -1.0])
    fparams.update_module(clone)
    torch.testing.assert_close(clone.scale, net.scale.detach() + torch.tensor([1.0, -1.0]))
    clone.scale.sum().backward()
    torch.testing.assert_close(net.scale.grad, torch.ones(2))


def test_update_module_memo_shares_updates_across_modules() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    w, b_bias = a.weight, b.bias
    memo: Dict[int, Any] = {}
    fparams.update_module(a, [torch.ones(3, 3), torch.ones(3)], memo=memo)
    fparams.update_module(b, memo=memo)
    assert b.weight is a.weight
    torch.testing.assert_close(b.weight, w + 1)
    assert b.bias is b_bias
    # without the memo the second module keeps the old tensor
    c, d = nn.Linear(3, 3), nn.Linear(3, 3)
    d.weight = c.weight
    fparams.update_module(c, [torch.ones(3, 3), None])
    fparams.update_module(d)
    assert d.weight is not c.weight


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_adaptation_three_steps(name: str) -> None:
    # learn2learn's MAML loop on an RNN / LSTM / GRU, against the same loop run
    # on a deepcopy through torch.func.functional_call.
    lr = 0.5
    net = make_net(name)
    ref = copy.deepcopy(net)
    xs, ys = make_input(name, seed=1), make_target(name, seed=2)
    xq, yq = make_input(name, seed=3), make_target(name, seed=4)

    clone = fparams.clone_module(net)
    losses = []
    for _ in range(3):
        loss = loss_fn(clone(xs), ys)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(clone.parameters()), create_graph=True)
        fparams.update_module(clone, [-lr * g for g in grads])
        assert flat_weights_follow_slots(clone) == []
    losses.append(loss_fn(clone(xs), ys).item())
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    loss_fn(clone(xq), yq).backward()

    params = dict(ref.named_parameters())
    ref_losses = []
    for _ in range(3):
        loss = loss_fn(torch.func.functional_call(ref, params, (xs,)), ys)
        ref_losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    loss_fn(torch.func.functional_call(ref, params, (xq,)), yq).backward()

    assert losses[:3] == pytest.approx(ref_losses, rel=1e-5)
    _assert_grads_equal(net, ref)
    assert all(p.grad is not None for p in net.rnn.parameters())


# -- detach_module ------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True], ids=["plain", "keep_requires_grad"])
@pytest.mark.parametrize("name", ALL)
def test_detach_module_cuts_the_clone_from_the_original(name: str, keep: bool) -> None:
    net = make_net(name).eval()
    x, y = make_input(name), make_target(name)
    clone = fparams.clone_module(net)
    fparams.update_module(clone, _random_updates(net))
    modules = list(clone.modules())
    expected = clone(x).detach()
    flags = {k: p.requires_grad for k, p in net.named_parameters()}
    storages = {k: p.data_ptr() for k, p in clone.named_parameters()}

    assert fparams.detach_module(clone, keep_requires_grad=keep) is None
    assert list(clone.modules()) == modules  # in place
    assert _slot_pattern(clone) == _slot_pattern(net)
    assert flat_weights_follow_slots(clone) == []
    for k, p in clone.named_parameters():
        assert p.grad_fn is None, k
        assert p.requires_grad == (keep and flags[k]), k
        assert p.data_ptr() == storages[k], k  # detached, not copied
    for k, b in clone.named_buffers():
        assert b.grad_fn is None, k
        if b.is_floating_point() and name == "grad-buffer" and k == "scale":
            assert b.requires_grad == keep
    torch.testing.assert_close(clone(x), expected)
    out = loss_fn(clone(x), y)
    if keep:
        out.backward()
        assert any(p.grad is not None for p in clone.parameters())
    else:
        assert not out.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_detach_module_keep_requires_grad_on_leaves_keeps_the_optimizers_tensors() -> None:
    # learn2learn detaches in place (detach_), so an optimizer built on the
    # module's parameters still drives the module afterwards.
    net = make_net("mlp")
    ref = copy.deepcopy(net)
    params = list(net.parameters())
    fparams.detach_module(net, keep_requires_grad=True)
    assert all(a is b for a, b in zip(net.parameters(), params))
    x, y = make_input("mlp"), make_target("mlp")
    for model in (net, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn(model(x), y).backward()
        opt.step()
    for p, r in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r)


def test_detach_module_keeps_frozen_parameters_frozen() -> None:
    net = fparams.clone_module(make_net("frozen"))
    fparams.detach_module(net, keep_requires_grad=True)
    assert net[0].weight.requires_grad is False
    assert net[0].bias.requires_grad is True and net[0].bias.is_leaf


# -- errors -------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    return make_net("mlp")  # 0.weight (6, 4), 0.bias (6,), 2.weight (2, 6), 2.bias (2,)


SHIM_ERRORS = [
    pytest.param(lambda: fparams.update_module(_mlp(), [torch.ones(6, 4)] * 3), ValueError,
                 r"^fparams\.update_module: got 3 updates for 4 parameters; give one update \(or None\) per "
                 r"tensor of module\.parameters\(\), in that order\.$", id="too-few"),
    pytest.param(lambda: fparams.update_module(_mlp(), [None] * 5), ValueError,
                 r"update_module: got 5 updates for 4 parameters", id="too-many"),
    pytest.param(lambda: fparams.update_module(_mlp(), [None, None, torch.ones(6, 2), None]), ValueError,
                 r"update_module: the update for parameter '2\.weight' has shape \(6, 2\) but the parameter "
                 r"has shape \(2, 6\)\.", id="shape"),
    pytest.param(lambda: fparams.update_module(_mlp(), [None, 0.5, None, None]), TypeError,
                 r"^fparams\.update_module: the update for parameter '0\.bias' is float 0\.5; `updates` must "
                 r"hold tensors \(or None to skip\)\.$", id="non-tensor"),
    pytest.param(lambda: fparams.update_module(_mlp(), torch.ones(6, 4)), TypeError,
                 r"update_module: `updates` must be a list with one tensor per parameter; got a single "
                 r"tensor\. Wrap it in a list: updates=\[u\]\.", id="single-tensor"),
    pytest.param(lambda: fparams.update_module(None), TypeError,
                 r"update_module: `module` must be a torch\.nn\.Module; got NoneType\.",
                 id="update-non-module"),
    pytest.param(lambda: fparams.update_module({"w": torch.ones(1)}, []), TypeError,
                 r"update_module: `module` must be a torch\.nn\.Module; got dict\.", id="update-dict"),
    pytest.param(lambda: fparams.detach_module([nn.Linear(1, 1)]), TypeError,
                 r"detach_module: `module` must be a torch\.nn\.Module; got list\.", id="detach-non-module"),
    pytest.param(lambda: fparams.clone_distribution(torch.ones(2)), TypeError,
                 r"clone_distribution: `dist` must be a torch\.distributions\.Distribution; got Tensor\.",
                 id="clone-dist"),
    pytest.param(lambda: fparams.detach_distribution(nn.Linear(1, 1)), TypeError,
                 r"detach_distribution: `dist` must be a torch\.distributions\.Distribution; got Linear\.",
                 id="detach-dist"),
]  # fmt: skip


@pytest.mark.parametrize("call, exc, message", SHIM_ERRORS)
def test_shim_errors(call: Callable[[], Any], exc: type, message: str) -> None:
    with pytest.raises(exc, match=message):
        call()


def test_a_rejected_update_leaves_the_module_untouched() -> None:
    net = fparams.clone_module(make_net("mlp"))
    snap = module_snapshot(net)
    with pytest.raises(ValueError, match="'2.bias' has shape"):
        fparams.update_module(net, [torch.ones(6, 4), torch.ones(6), torch.ones(2, 6), torch.ones(3)])
    assert_module_untouched(net, snap)


# -- magic_box -------------------------------------------------------------------------------


def test_magic_box_is_one_with_gradient_dx() -> None:
    x = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    box = fparams.magic_box(x)
    torch.testing.assert_close(box, torch.ones(3), rtol=0, atol=0)
    c = torch.tensor([5.0, -2.0, 0.5])
    (g,) = torch.autograd.grad((box * c).sum(), x)
    torch.testing.assert_close(g, c)


def test_magic_box_derivatives_of_every_order() -> None:
    # f(t) = magic_box(g(t)) * R with g(t) = t**2. At the evaluation point
    # exp(g - stop(g)) = 1, so f' = g' R, f'' = (g'' + g'^2) R and
    # f''' = (g''' + 3 g' g'' + g'^3) R.
    t0, r = 0.7, 3.0
    t = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
    f = fparams.magic_box(t**2) * r
    (d1,) = torch.autograd.grad(f, t, create_graph=True)
    (d2,) = torch.autograd.grad(d1, t, create_graph=True)
    (d3,) = torch.autograd.grad(d2, t)
    assert f.item() == pytest.approx(r)
    assert d1.item() == pytest.approx(2 * t0 * r)
    assert d2.item() == pytest.approx((2 + 4 * t0**2) * r)
    assert d3.item() == pytest.approx((12 * t0 + 8 * t0**3) * r)


@pytest.mark.parametrize("value", [None, 3.0, "x", [1, 2]], ids=repr)
def test_magic_box_returns_non_tensors_unchanged(value: Any) -> None:
    assert fparams.magic_box(value) is value


# -- distributions ----------------------------------------------------------------------------


class NetNormal(Distribution):
    """A distribution that holds the module computing its mean."""

    arg_constraints: Dict[str, Any] = {}

    def __init__(self, net: nn.Module, x: Tensor) -> None:
        self.net = net
        self.x = x
        self.scale = torch.ones(())
        super().__init__(batch_shape=torch.Size([x.shape[0], 2]), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        return Normal(self.net(self.x), self.scale).log_prob(value)


def _leaves() -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "loc": torch.randn(3, generator=g).requires_grad_(),
        "raw_scale": torch.randn(3, generator=g).requires_grad_(),
        "logits": torch.randn(4, generator=g).requires_grad_(),
        "shift": torch.randn(3, generator=g).requires_grad_(),
    }


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


DISTS: Dict[str, Callable[[Dict[str, Tensor], nn.Module], Distribution]] = {
    "normal": lambda v, n: Normal(v["loc"], nn.functional.softplus(v["raw_scale"])),
    "categorical": lambda v, n: Categorical(logits=v["logits"] * 2),
    "independent": lambda v, n: Independent(Normal(v["loc"], nn.functional.softplus(v["raw_scale"])), 1),
    "transformed": lambda v, n: TransformedDistribution(
        Normal(v["loc"], nn.functional.softplus(v["raw_scale"])), [AffineTransform(loc=v["shift"], scale=2.0)]
    ),
    "mixture": lambda v, n: MixtureSameFamily(
        Categorical(logits=v["logits"][:3]), Normal(v["loc"], nn.functional.softplus(v["raw_scale"]))
    ),
    "module": lambda v, n: NetNormal(n, v["loc"].reshape(1, 3) * 2),
}

VALUES = {
    "normal": torch.tensor([0.1, -0.4, 1.3]),
    "categorical": torch.tensor([0, 3, 2]),
    "independent": torch.tensor([0.1, -0.4, 1.3]),
    "transformed": torch.tensor([0.1, -0.4, 1.3]),
    "mixture": torch.tensor([0.2, -0.7]),
    "module": torch.tensor([[0.5, -0.5]]),
}


def _tensors_in(obj: Any, seen: Optional[set] = None) -> List[Tensor]:
    """Every tensor reachable through a distribution's attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, nn.Module):
        return list(obj.parameters()) + list(obj.buffers())
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_in(v, seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return [t for v in vars(obj).values() for t in _tensors_in(v, seen)]
    return []


def _grads(leaves: Dict[str, Tensor], net: nn.Module) -> Dict[str, Tensor]:
    out = {k: (v.grad.clone() if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    out.update({f"net.{k}": (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                for k, p in net.named_parameters()})  # fmt: skip
    return out


@pytest.mark.parametrize("kind", sorted(DISTS))
def test_clone_distribution_stays_in_the_graph_and_leaves_the_original(kind: str) -> None:
    leaves, net = _leaves(), _net()
    dist = DISTS[kind](leaves, net)
    before = dict(vars(dist))
    value = VALUES[kind]

    clone = fparams.clone_distribution(dist)
    assert type(clone) is type(dist) and clone is not dist
    assert vars(dist) == before and all(vars(dist)[k] is v for k, v in before.items())
    torch.testing.assert_close(clone.log_prob(value), dist.log_prob(value))
    original = {id(t) for t in _tensors_in(dist) if t.requires_grad}
    shared = [t for t in _tensors_in(clone) if t.requires_grad and id(t) in original]
    assert shared == []

    clone.log_prob(value).sum().backward()
    got = _grads(leaves, net)
    ref_leaves, ref_net = _leaves(), _net()
    DISTS[kind](ref_leaves, ref_net).log_prob(value).sum().backward()
    want = _grads(ref_leaves, ref_net)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}")
    assert any(g.abs().sum() > 0 for g in got.values())


@pytest.mark.parametrize("kind", sorted(DISTS))
def test_detach_distribution_in_place(kind: str) -> None:
    leaves, net = _leaves(), _net()
    dist = DISTS[kind](leaves, net)
    value = VALUES[kind]
    expected = dist.log_prob(value).detach()
    held = {k: v for k, v in vars(dist).items() if isinstance(v, (nn.Module, Distribution))}

    out = fparams.detach_distribution(dist)
    assert out is dist
    assert [t for t in _tensors_in(dist) if t.requires_grad] == []
    for k, v in held.items():
        assert vars(dist)[k] is v, k  # modules and nested distributions are kept, not replaced
    lp = dist.log_prob(value)
    assert not lp.requires_grad
    torch.testing.assert_close(lp, expected)
    if kind == "module":
        assert isinstance(dist.net, nn.Linear)
        assert all(not p.requires_grad for p in dist.net.parameters())


def test_clone_distribution_keeps_a_shared_tensor_shared() -> None:
    loc = torch.zeros(3, requires_grad=True)
    dist = Normal(loc * 2, 1.0)
    dist.__dict__["alias"] = dist.loc
    clone = fparams.clone_distribution(dist)
    assert clone.loc is not dist.loc
    assert clone.__dict__["alias"] is clone.loc
