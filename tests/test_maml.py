"""MAML and MetaSGD against learn2learn's semantics, written out with torch.autograd.grad.

The reference keeps its own leaf copies of the parameters and runs the module
functionally: one step is ``p - lr * g`` with ``g`` from
``torch.autograd.grad(loss, params, create_graph=not first_order)``.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import (
    TiedNet,
    assert_dicts_close,
    grads_of,
    grads_wrt,
    leaves,
    loss_fn,
    module_snapshot,
    task_data,
)

TOL = dict(rtol=1e-10, atol=1e-12)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def _ref_steps(
    net: nn.Module,
    params: Dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    lrs: Mapping[str, Any],
    steps: int,
    first_order: bool,
    buffers: Optional[Dict[str, Tensor]] = None,
) -> Dict[str, Tensor]:
    """learn2learn's adapt, ``steps`` times: ``p - lr * g`` on every parameter in ``lrs``."""
    fast = dict(params)
    for _ in range(steps):
        out = torch.func.functional_call(net, {**fast, **(buffers or {})}, (x,))
        names = list(lrs)
        grads = torch.autograd.grad(loss_fn(out, y), [fast[k] for k in names], create_graph=not first_order)
        fast.update({k: fast[k] - lrs[k] * g for k, g in zip(names, grads)})
    return fast


def _query(net: nn.Module, params: Dict[str, Tensor], x: Tensor, **kw: Any) -> Tensor:
    return torch.func.functional_call(net, {**params, **kw.get("buffers", {})}, (x,))


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_matches_the_reference(steps: int, first_order: bool) -> None:
    net = _mlp()
    ref_net = copy.deepcopy(net)
    xs, ys, xq, yq = (t[0] for t in task_data(1, shots=6))
    maml = fparams.MAML(net, lr=0.2, first_order=first_order)
    snap = module_snapshot(maml.module)
    learner = maml.clone()
    assert learner.module is not maml.module
    for _ in range(steps):
        learner.adapt(loss_fn(learner(xs), ys))
    assert_module_unchanged_values(maml.module, snap)
    out = learner(xq)
    loss_fn(out, yq).backward()

    ref = leaves(dict(ref_net.named_parameters()))
    fast = _ref_steps(ref_net, ref, xs, ys, dict.fromkeys(ref, 0.2), steps, first_order)
    want = _query(ref_net, fast, xq)
    torch.testing.assert_close(out, want, **TOL)
    assert_dicts_close(dict(learner.module.named_parameters()), fast, **TOL)
    assert_dicts_close(grads_of(maml.module), grads_wrt(loss_fn(want, yq), ref), **TOL)


def assert_module_unchanged_values(module: nn.Module, snap: Mapping[str, Any]) -> None:
    for k, t in module.state_dict(keep_vars=True).items():
        torch.testing.assert_close(t.detach(), snap[k].value, rtol=0, atol=0)


def test_maml_clone_and_adapt_overrides() -> None:
    net = _mlp()
    xs, ys, xq, yq = (t[0] for t in task_data(1, shots=6))
    results = {}
    for label, kw_clone, kw_adapt in [
        ("second", {}, {}),
        ("clone-first", {"first_order": True}, {}),
        ("adapt-first", {}, {"first_order": True}),
        ("adapt-second", {"first_order": True}, {"first_order": False}),
    ]:
        maml = fparams.MAML(copy.deepcopy(net), lr=0.5)
        learner = maml.clone(**kw_clone)
        learner.adapt(loss_fn(learner(xs), ys), **kw_adapt)
        loss_fn(learner(xq), yq).backward()
        results[label] = grads_of(maml.module)
    assert_dicts_close(results["clone-first"], results["adapt-first"], **TOL)
    assert_dicts_close(results["second"], results["adapt-second"], **TOL)
    first = torch.cat([g.flatten() for g in results["clone-first"].values()])
    second = torch.cat([g.flatten() for g in results["second"].values()])
    assert (first - second).abs().max() > 1e-4


def test_maml_lr_tensor_receives_a_meta_gradient() -> None:
    net = _mlp()
    xs, ys, xq, yq = (t[0] for t in task_data(1, shots=6))
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    learner = fparams.MAML(net, lr=lr).clone()
    learner.adapt(loss_fn(learner(xs), ys))
    (got,) = torch.autograd.grad(loss_fn(learner(xq), yq), lr)
    ref_lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    ref = leaves(dict(net.named_parameters()))
    fast = _ref_steps(net, ref, xs, ys, dict.fromkeys(ref, ref_lr), 1, False)
    (want,) = torch.autograd.grad(loss_fn(_query(net, fast, xq), yq), ref_lr)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_metasgd_rates_get_the_reference_meta_gradients(first_order: bool) -> None:
    net = _mlp()
    xs, ys, xq, yq = (t[0] for t in task_data(1, shots=6))
    meta = fparams.MetaSGD(net, lr=0.3, first_order=first_order)
    assert len(meta.lrs) == len(list(net.parameters()))
    with torch.no_grad():  # distinct rates per entry
        for r in meta.lrs:
            r.uniform_(0.1, 0.4)
    names = [k for k, _ in net.named_parameters()]
    ref_rates = {k: r.detach().clone().requires_grad_() for k, r in zip(names, meta.lrs)}
    ref = leaves(dict(net.named_parameters()))

    learner = meta.clone()
    for _ in range(2):
        learner.adapt(loss_fn(learner(xs), ys))
    out = learner(xq)
    loss_fn(out, yq).backward()

    fast = _ref_steps(net, ref, xs, ys, ref_rates, 2, first_order)
    want = _query(net, fast, xq)
    torch.testing.assert_close(out, want, **TOL)
    want_grads = grads_wrt(loss_fn(want, yq), {**ref, **{f"lr.{k}": r for k, r in ref_rates.items()}})
    assert_dicts_close(grads_of(meta.module), {k: want_grads[k] for k in names}, **TOL)
    for k, r in zip(names, meta.lrs):
        assert r.grad is not None and r.grad.abs().sum() > 0, k
        torch.testing.assert_close(r.grad, want_grads[f"lr.{k}"], **TOL, msg=lambda m, k=k: f"lr of {k}: {m}")


@pytest.mark.parametrize("cls", ["MAML", "MetaSGD"])
def test_tied_weights_stay_tied(cls: str) -> None:
    torch.manual_seed(0)
    net = TiedNet().double()
    idx = torch.tensor([0, 3, 5, 1, 2])
    target = torch.randn(5, 6, dtype=torch.float64)
    algo = fparams.MAML(net, lr=0.3) if cls == "MAML" else fparams.MetaSGD(net, lr=0.3)
    learner = algo.clone()
    for _ in range(2):
        learner.adapt(loss_fn(learner(idx), target))
        assert learner.module.out.weight is learner.module.embed.weight
    out = learner(idx)
    loss_fn(out, target).backward()
    # reference: the tied tensor appears once, gets one update with the summed gradient
    ref = leaves(dict(net.named_parameters()))
    assert "out.weight" not in ref
    fast = _ref_steps(net, ref, idx, target, dict.fromkeys(ref, 0.3), 2, False)
    want = _query(net, fast, idx)
    torch.testing.assert_close(out, want, **TOL)
    assert_dicts_close(grads_of(algo.module), grads_wrt(loss_fn(want, target), ref), **TOL)


# -- allow_nograd / allow_unused -------------------------------------------------------


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 1)
        self.unused = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def _frozen() -> nn.Module:
    net = _mlp()
    net[0].weight.requires_grad_(False)
    return net


@pytest.mark.parametrize(
    "kwargs", [{"allow_nograd": True}, {"allow_nograd": True, "allow_unused": True}], ids=["nograd", "both"]
)
def test_allow_nograd_skips_frozen_parameters(kwargs: Dict[str, bool]) -> None:
    net = _frozen()
    xs, ys, xq, yq = (t[0] for t in task_data(1, shots=6))
    maml = fparams.MAML(net, lr=0.2, **kwargs)
    learner = maml.clone()
    learner.adapt(loss_fn(learner(xs), ys))
    torch.testing.assert_close(learner.module[0].weight, net[0].weight, rtol=0, atol=0)
    loss_fn(learner(xq), yq).backward()
    assert net[0].weight.grad is None
    trainable = {k: p for k, p in net.named_parameters() if p.requires_grad}
    ref = leaves(trainable)
    frozen = {"0.weight": net[0].weight.detach()}
    fast = _ref_steps(net, {**ref, **frozen}, xs, ys, dict.fromkeys(ref, 0.2), 1, False)
    want = grads_wrt(loss_fn(_query(net, fast, xq), yq), ref)
    assert_dicts_close({k: p.grad for k, p in trainable.items()}, want, **TOL)


def test_allow_nograd_can_be_given_to_adapt() -> None:
    net = _frozen()
    xs, ys = (t[0] for t in task_data(1, shots=6)[:2])
    learner = fparams.MAML(net, lr=0.2).clone()
    learner.adapt(loss_fn(learner(xs), ys), allow_nograd=True)
    assert not torch.equal(learner.module[2].weight, net[2].weight)


def test_allow_unused_skips_unused_parameters() -> None:
    torch.manual_seed(0)
    net = WithUnused().double()
    xs, ys = (t[0] for t in task_data(1, shots=6)[:2])
    for learner in (fparams.MAML(net, lr=0.2, allow_unused=True).clone(), fparams.MAML(net, lr=0.2).clone()):
        kw = {} if learner.allow_unused else {"allow_unused": True}
        learner.adapt(loss_fn(learner(xs), ys), **kw)
        torch.testing.assert_close(learner.module.unused.weight, net.unused.weight, rtol=0, atol=0)
        assert not torch.equal(learner.module.used.weight, net.used.weight)


ERRORS: List[Any] = [
    ("frozen", {}, {}),
    ("frozen", {"allow_unused": True}, {}),
    ("unused", {}, {}),
    ("unused", {}, {"allow_unused": False}),
]


@pytest.mark.parametrize(("net_kind", "init", "adapt"), ERRORS)
def test_failed_adaptation_suggests_the_flags(
    net_kind: str, init: Dict[str, bool], adapt: Dict[str, bool]
) -> None:
    torch.manual_seed(0)
    net = _frozen() if net_kind == "frozen" else WithUnused().double()
    xs, ys = (t[0] for t in task_data(1, shots=6)[:2])
    learner = fparams.MAML(net, lr=0.2, **init).clone()
    with pytest.raises(RuntimeError, match=r"^fparams\.MAML\.adapt: could not differentiate the loss") as err:
        learner.adapt(loss_fn(learner(xs), ys), **adapt)
    assert "pass allow_nograd=True" in str(err.value)
    assert "pass allow_unused=True" in str(err.value)


def test_metasgd_error_and_arguments() -> None:
    torch.manual_seed(0)
    net = WithUnused().double()
    xs, ys = (t[0] for t in task_data(1, shots=6)[:2])
    learner = fparams.MetaSGD(net, lr=0.2).clone()
    with pytest.raises(RuntimeError, match=r"MetaSGD\.adapt: could not differentiate.*allow_unused=True"):
        learner.adapt(loss_fn(learner(xs), ys))
    with pytest.raises(ValueError, match=r"MetaSGD: got 1 learning-rate tensors for 4 parameters"):
        fparams.MetaSGD(net, lrs=[torch.ones(1)])
    with pytest.raises(TypeError, match=r"MetaSGD: `model` must be a torch\.nn\.Module; got function"):
        fparams.MetaSGD(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"MAML: `model` must be a torch\.nn\.Module; got int"):
        fparams.MAML(3, lr=0.1)  # type: ignore[arg-type]


def test_allow_unused_defaults_to_allow_nograd() -> None:
    assert fparams.MAML(_mlp(), lr=0.1, allow_nograd=True).allow_unused is True
    assert fparams.MAML(_mlp(), lr=0.1).allow_unused is False
    assert fparams.MAML(_mlp(), lr=0.1, allow_nograd=True, allow_unused=False).allow_unused is False
    learner = fparams.MAML(_mlp(), lr=0.1, allow_nograd=True).clone(allow_nograd=False)
    assert learner.allow_nograd is False and learner.allow_unused is True


# -- a BatchNorm module trained with the class, learn2learn's way ---------------------


def test_batchnorm_meta_training_loop_matches_the_reference() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1)).double()
    ref_net = copy.deepcopy(net)
    maml = fparams.MAML(net, lr=0.1)
    opt = torch.optim.SGD(maml.parameters(), lr=0.05)
    ref_params = {k: p.detach().clone().requires_grad_() for k, p in ref_net.named_parameters()}
    ref_opt = torch.optim.SGD(list(ref_params.values()), lr=0.05)
    ref_buffers = dict(ref_net.named_buffers())  # shared by every task, as with clone_module
    for it in range(2):
        data = task_data(3, shots=6, seed=it)
        opt.zero_grad()
        ref_opt.zero_grad()
        for i in range(3):
            xs, ys, xq, yq = (t[i] for t in data)
            learner = maml.clone()
            learner.adapt(loss_fn(learner(xs), ys))
            (loss_fn(learner(xq), yq) / 3).backward()
            fast = _ref_steps(
                ref_net, ref_params, xs, ys, dict.fromkeys(ref_params, 0.1), 1, False, ref_buffers
            )
            (loss_fn(_query(ref_net, fast, xq, buffers=ref_buffers), yq) / 3).backward()
        assert_dicts_close(grads_of(maml.module), {k: p.grad for k, p in ref_params.items()}, **TOL)
        opt.step()
        ref_opt.step()
    assert_dicts_close(dict(maml.module.named_parameters()), ref_params, **TOL)
    assert_dicts_close(dict(maml.module.named_buffers()), dict(ref_net.named_buffers()), **TOL)
    assert int(net[1].num_batches_tracked) == 12  # 2 iterations x 3 tasks x (support + query)


def test_reprs_show_lr_first_order_and_clone() -> None:
    maml = fparams.MAML(torch.nn.Linear(2, 1), lr=0.1)
    assert "lr=0.1, first_order=False, clone=False" in repr(maml)
    assert "lr=0.1, first_order=True, clone=True" in repr(maml.clone(first_order=True))
    meta = fparams.MetaSGD(torch.nn.Linear(2, 1), lr=0.1)
    assert "lrs=2 tensors of rate 0.1, first_order=False, clone=False" in repr(meta)
    with torch.no_grad():
        meta.lrs[0].fill_(0.5)
    assert "lrs=2 tensors of rates from 0.1 to 0.5, first_order=False, clone=True" in repr(meta.clone())
