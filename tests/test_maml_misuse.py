"""MAML / MetaSGD adapted without clone(): learn2learn's semantics, and a clear error where it must fail."""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import torch
from torch import nn

import fparams
from tests.helpers import grads_of

LEARNERS: Dict[str, Callable[[nn.Module], Any]] = {
    "maml": lambda net: fparams.MAML(net, lr=0.1),
    "metasgd": lambda net: fparams.MetaSGD(net, lr=0.1),
}


def _data() -> Any:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(
        8, 1, generator=g, dtype=torch.float64
    )


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()


@pytest.mark.parametrize("kind", sorted(LEARNERS))
@pytest.mark.parametrize("step", [True, False], ids=["optimizer-step", "backward-only"])
def test_adapting_the_uncloned_object_again_says_to_clone(kind: str, step: bool) -> None:
    meta = LEARNERS[kind](_net())
    opt = torch.optim.SGD(meta.parameters(), lr=0.01)
    x, y = _data()
    meta.adapt((meta(x) - y).pow(2).mean())
    (meta(x) - y).pow(2).mean().backward()
    if step:
        opt.step()
    name = "MAML" if kind == "maml" else "MetaSGD"
    what = r"changed in place \(an optimizer step\)" if step else r"used by backward\(\)"
    with pytest.raises(
        RuntimeError,
        match=rf"{name}.adapt: this {name} was adapted itself, not a clone, .* {what}.* \.clone\(\)",
    ):
        meta.adapt((meta(x) - y).pow(2).mean())


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_adapting_the_uncloned_object_keeps_learn2learns_semantics(kind: str) -> None:
    x, y = _data()
    root_net, clone_net = _net(), _net()
    root, meta = LEARNERS[kind](root_net), LEARNERS[kind](clone_net)
    originals = dict(root_net.named_parameters())  # the object's module will hold adapted tensors
    for _ in range(2):  # two steps on the object itself, one graph: allowed, as in learn2learn
        root.adapt((root(x) - y).pow(2).mean())
    learner = meta.clone()
    for _ in range(2):
        learner.adapt((learner(x) - y).pow(2).mean())
    torch.testing.assert_close(root(x), learner(x), rtol=1e-12, atol=0)
    (root(x) - y).pow(2).mean().backward()
    (learner(x) - y).pow(2).mean().backward()
    want = grads_of(clone_net)
    assert sorted(originals) == sorted(want)
    for k, p in originals.items():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, want[k], rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # using the adapted object without a backward stays fine
        root(x)


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_a_clone_per_iteration_never_raises(kind: str) -> None:
    meta = LEARNERS[kind](_net())
    opt = torch.optim.SGD(meta.parameters(), lr=0.01)
    x, y = _data()
    for _ in range(3):
        opt.zero_grad()
        learner = meta.clone()
        learner.adapt((learner(x) - y).pow(2).mean())
        learner.adapt((learner(x) - y).pow(2).mean())
        (learner(x) - y).pow(2).mean().backward()
        opt.step()
