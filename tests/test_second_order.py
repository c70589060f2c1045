"""Second order: clone_module -> update_module(-lr * grad) -> loss, against float64 finite differences."""

from __future__ import annotations

import copy
from typing import Callable, Dict, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import loss_fn

F64 = torch.float64


class TinyTied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)
        self.hidden = nn.Linear(3, 3)
        self.out = nn.Linear(3, 4, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(idx))))


class TinyGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 2)
        self.head = nn.Linear(2, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])


def _data(name: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    if name == "tied":
        xs, xq = torch.randint(0, 4, (3,), generator=g), torch.randint(0, 4, (3,), generator=g)
        return xs, torch.randn(3, 4, generator=g, dtype=F64), xq, torch.randn(3, 4, generator=g, dtype=F64)
    shape = (3, 2, 2) if name == "gru" else (4, 3)
    rows = 2 if name == "gru" else 4
    return (
        torch.randn(shape, generator=g, dtype=F64),
        torch.randn(rows, 1, generator=g, dtype=F64),
        torch.randn(shape, generator=g, dtype=F64),
        torch.randn(rows, 1, generator=g, dtype=F64),
    )


NETS: Dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
    "batchnorm": lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)),
    "batchnorm-eval": lambda: nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)
    ).eval(),
    "tied": TinyTied,
    "gru": TinyGRU,
}


def _install(net: nn.Module, flat: Sequence[Tensor]) -> None:
    """Put ``flat`` (one tensor per ``net.parameters()``) in the net's slots, by hand."""
    index = {id(p): i for i, p in enumerate(net.parameters())}
    for m in net.modules():
        for key, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[key] = flat[index[id(p)]]
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()


def _meta_loss(name: str, steps: int, lr: float = 0.3) -> Tuple[Callable[..., Tensor], Tuple[Tensor, ...]]:
    torch.manual_seed(0)
    template = NETS[name]().to(F64)
    xs, ys, xq, yq = _data(name)

    def meta_loss(*flat: Tensor) -> Tensor:
        net = copy.deepcopy(template)
        _install(net, flat)
        learner = fparams.clone_module(net)
        for _ in range(steps):
            loss = loss_fn(learner(xs), ys)
            grads = torch.autograd.grad(loss, list(learner.parameters()), create_graph=True)
            fparams.update_module(learner, [-lr * g for g in grads])
        return loss_fn(learner(xq), yq)

    inputs = tuple(p.detach().clone().requires_grad_() for p in template.parameters())
    return meta_loss, inputs


CASES = [
    pytest.param("mlp", 1, id="mlp"),
    pytest.param("mlp", 2, id="mlp-2-steps"),
    pytest.param("batchnorm", 1, id="batchnorm"),
    pytest.param("tied", 1, id="tied"),
    pytest.param("gru", 1, id="gru"),
]


@pytest.mark.parametrize("name, steps", CASES)
def test_meta_gradient_gradcheck(name: str, steps: int) -> None:
    fn, inputs = _meta_loss(name, steps)
    # The meta-loss really depends on every input through the inner step.
    grads = torch.autograd.grad(fn(*inputs), inputs)
    assert all(g.abs().sum() > 0 for g in grads)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


GRADGRAD_CASES = [
    pytest.param("mlp", 1, id="mlp"),
    # torch's own third derivative of training-mode batch norm is wrong (a plain
    # functional_call loop fails gradgradcheck the same way), so eval mode here.
    pytest.param("batchnorm-eval", 1, id="batchnorm-eval"),
    pytest.param("tied", 1, id="tied"),
    pytest.param("gru", 1, id="gru"),
]


@pytest.mark.parametrize("name, steps", GRADGRAD_CASES)
def test_meta_gradient_gradgradcheck(name: str, steps: int) -> None:
    fn, inputs = _meta_loss(name, steps)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_first_order_shortcut_differs_from_the_true_meta_gradient() -> None:
    # A check that the meta-gradient above is second order: detaching the inner
    # gradients (first-order MAML) must give a different answer.
    fn, inputs = _meta_loss("mlp", 1)
    (full,) = torch.autograd.grad(fn(*inputs), inputs[:1])

    torch.manual_seed(0)
    net = NETS["mlp"]().to(F64)
    xs, ys, xq, yq = _data("mlp")
    learner = fparams.clone_module(net)
    grads = torch.autograd.grad(loss_fn(learner(xs), ys), list(learner.parameters()))
    fparams.update_module(learner, [-0.3 * g for g in grads])
    loss_fn(learner(xq), yq).backward()
    assert not torch.allclose(full, net[0].weight.grad)
