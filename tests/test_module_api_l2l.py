"""learn2learn 0.2's remaining helpers: maml_update, meta_sgd_update, clone_(named_)parameters."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import flat_weights_follow_slots, make_input, make_net, make_target

NAMES = ["mlp", "tied", "shared", "gru", "lstm", "conv"]


def _grads(net: nn.Module, name: str) -> List[Tensor]:
    out = net(make_input(name, dtype=torch.float64))
    loss = (out - make_target(name, dtype=torch.float64)).pow(2).mean()
    return list(torch.autograd.grad(loss, list(net.parameters()), create_graph=True))


def _reference(net: nn.Module, name: str, updates: List[Optional[Tensor]]) -> Tensor:
    """The updated network's output, by hand: a deepcopy run on ``{name: p + u}``."""
    names = dict(net.named_parameters())  # tied / shared tensors once, in parameters() order
    new = {k: p if u is None else p + u for (k, p), u in zip(names.items(), updates)}
    arch = copy.deepcopy(net)
    full = dict(new)
    for k, p in net.named_parameters(remove_duplicate=False):  # the tied aliases get the same tensor
        full[k] = new[next(n for n, q in names.items() if q is p)]
    return torch.func.functional_call(arch, full, (make_input(name, seed=3, dtype=torch.float64),))


def _after(net: nn.Module, name: str) -> Tensor:
    return net(make_input(name, seed=3, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_maml_update_matches_a_deepcopy_reference(name: str) -> None:
    net = make_net(name, dtype=torch.float64)
    ref_net = copy.deepcopy(net)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    grads = _grads(net, name)
    grads[-1] = None  # skipped, as in learn2learn
    leaves = list(net.parameters())
    got = fparams.maml_update(net, lr, grads)
    assert got is net and not flat_weights_follow_slots(net)
    out = _after(net, name)
    ref_leaves = list(ref_net.parameters())
    ref_grads = _grads(ref_net, name)
    want = _reference(
        ref_net, name, [None if i == len(ref_grads) - 1 else -lr * g for i, g in enumerate(ref_grads)]
    )
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    got_g = torch.autograd.grad(out.sum(), leaves + [lr])
    want_g = torch.autograd.grad(want.sum(), ref_leaves + [lr])
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if name == "tied":
        assert net.out.weight is net.embed.weight


def test_maml_update_without_grads_applies_the_update_attributes() -> None:
    net = make_net("mlp", dtype=torch.float64)
    ref = copy.deepcopy(net)
    for p in net.parameters():
        p.update = -0.1 * torch.ones_like(p)
    fparams.maml_update(net, lr=0.5)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q - 0.1)


@pytest.mark.parametrize("name", ["mlp", "tied", "gru"])
def test_meta_sgd_update_matches_a_deepcopy_reference(name: str) -> None:
    net = make_net(name, dtype=torch.float64)
    ref_net = copy.deepcopy(net)
    lrs = [torch.rand_like(p).requires_grad_() for p in net.parameters()]
    grads = _grads(net, name)
    assert fparams.meta_sgd_update(net, lrs=lrs, grads=grads) is net
    out = _after(net, name)
    want = _reference(ref_net, name, [-lr * g for lr, g in zip(lrs, _grads(ref_net, name))])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    got_g = torch.autograd.grad(out.sum(), lrs)
    want_g = torch.autograd.grad(want.sum(), lrs)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_maml_and_meta_sgd_update_equal_the_classes() -> None:
    net = make_net("mlp", dtype=torch.float64)
    x, y = make_input("mlp", dtype=torch.float64), make_target("mlp", dtype=torch.float64)
    maml = fparams.MAML(net, lr=0.2)
    learner = maml.clone()
    learner.adapt((learner(x) - y).pow(2).mean())
    clone = fparams.clone_module(net)
    grads = torch.autograd.grad((clone(x) - y).pow(2).mean(), list(clone.parameters()), create_graph=True)
    fparams.maml_update(clone, 0.2, grads)
    torch.testing.assert_close(clone(x), learner(x), rtol=1e-12, atol=0)


def _bad_calls() -> List[Any]:
    net = nn.Linear(2, 1)
    ps = list(net.parameters())
    return [
        (
            lambda: fparams.maml_update("net", 0.1, []),
            TypeError,
            r"fparams.maml_update: `model` must be a torch.nn.Module",
        ),
        (
            lambda: fparams.maml_update(net, 0.1, [torch.ones(1, 2)]),
            ValueError,
            r"fparams.maml_update: got 1 grads for 2 parameters",
        ),
        (
            lambda: fparams.maml_update(net, 0.1, torch.ones(2)),
            TypeError,
            r"fparams.maml_update: `grads` must be a list",
        ),
        (
            lambda: fparams.maml_update(net, 0.1, [torch.ones(3), None]),
            ValueError,
            r"fparams.maml_update: the gradient for parameter 'weight' has shape \(3,\)",
        ),
        (
            lambda: fparams.meta_sgd_update(net, grads=ps),
            ValueError,
            r"fparams.meta_sgd_update: `lrs` missing",
        ),
        (
            lambda: fparams.meta_sgd_update(net),
            ValueError,
            r"fparams.meta_sgd_update: `lrs` and `grads` missing",
        ),
        (
            lambda: fparams.meta_sgd_update(net, [0.1], ps),
            ValueError,
            r"fparams.meta_sgd_update: got 1 lrs for 2",
        ),
        (
            lambda: fparams.meta_sgd_update(net, 0.1, ps),
            TypeError,
            r"fparams.meta_sgd_update: `lrs` must be a list",
        ),
        (
            lambda: fparams.clone_parameters(ps[0]),
            TypeError,
            r"fparams.clone_parameters: `param_list` must be a list",
        ),
        (
            lambda: fparams.clone_parameters([ps[0], 1.0]),
            TypeError,
            r"`param_list\[1\]` is a float, not a tensor",
        ),
        (
            lambda: fparams.clone_named_parameters(ps),
            TypeError,
            r"fparams.clone_named_parameters: `param_dict` must be a dict",
        ),
        (
            lambda: fparams.clone_named_parameters({"b": 1, "a": ps[0]}),
            TypeError,
            r"fparams.clone_named_parameters: `param_dict` must map names to tensors; the values for \['b'\] "
            r"are not\.",
        ),
    ]


@pytest.mark.parametrize("i", range(12))
def test_errors(i: int) -> None:
    call, kind, message = _bad_calls()[i]
    with pytest.raises(kind, match=message):
        call()


def test_clone_parameters_and_named_parameters() -> None:
    net = make_net("tied", dtype=torch.float64)
    params = list(net.parameters())
    named: Dict[str, Tensor] = dict(net.named_parameters())
    cloned = fparams.clone_parameters(params)
    cloned_named = fparams.clone_named_parameters(named)
    assert list(cloned_named) == list(named)
    for c, p in zip(cloned + list(cloned_named.values()), params + list(named.values())):
        assert c is not p and c.data_ptr() != p.data_ptr()
        torch.testing.assert_close(c, p, rtol=0, atol=0)
    (sum(c.sum() for c in cloned) + sum(2 * c.sum() for c in cloned_named.values())).backward()
    for p in params:
        torch.testing.assert_close(p.grad, torch.full_like(p, 3.0))
    assert fparams.clone_parameters(iter([])) == []
