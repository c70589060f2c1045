"""hypothesis: the shims and split/Architecture over random architectures, against deepcopy references.

Architectures are Sequential stacks: a front end (vectors, an Embedding, a
Conv2d with optional BatchNorm2d, an LSTM / GRU), then Linear, BatchNorm1d,
LayerNorm and Tanh layers, with tied weights (across modules, and an output
layer tied to the embedding), a submodule used twice, frozen parameters, and
train or eval mode.
"""

from __future__ import annotations

import copy
from typing import Any, List, Optional, Tuple

import torch
from hypothesis import given, note, strategies as st
from torch import Tensor, nn

import fparams
from tests.helpers import flat_weights_follow_slots, grads_of


class LastStep(nn.Module):
    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0][-1]


BATCH = 4


@st.composite
def architectures(draw: Any) -> Tuple[nn.Module, Tensor]:
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    dim = st.integers(1, 4)
    layers: List[nn.Module] = []
    embed: Optional[nn.Embedding] = None

    front = draw(st.sampled_from(["vector", "embedding", "conv", "lstm", "gru"]))
    if front == "vector":
        d = draw(dim)
        x = torch.randn(BATCH, d, generator=g)
    elif front == "embedding":
        vocab, d = draw(st.integers(2, 5)), draw(dim)
        embed = nn.Embedding(vocab, d)
        layers.append(embed)
        x = torch.randint(0, vocab, (BATCH,), generator=g)
    elif front == "conv":
        c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.Flatten())
        d = c_out * 9
        x = torch.randn(BATCH, c_in, 3, 3, generator=g)
    else:
        d_in, hidden = draw(dim), draw(dim)
        bidirectional = draw(st.booleans())
        cell = nn.LSTM if front == "lstm" else nn.GRU
        layers.append(
            LastStep(cell(d_in, hidden, num_layers=draw(st.integers(1, 2)), bidirectional=bidirectional))
        )
        d = hidden * (2 if bidirectional else 1)
        x = torch.randn(3, BATCH, d_in, generator=g)

    for kind in draw(st.lists(st.sampled_from(["linear", "batchnorm", "layernorm", "tanh", "shared", "tied"]),
                              max_size=4)):  # fmt: skip
        if kind == "linear":
            d_out = draw(dim)
            layers.append(nn.Linear(d, d_out, bias=draw(st.booleans())))
            d = d_out
        elif kind == "batchnorm":
            layers.append(nn.BatchNorm1d(d, affine=draw(st.booleans())))
        elif kind == "layernorm":
            layers.append(nn.LayerNorm(d))
        elif kind == "tanh":
            layers.append(nn.Tanh())
        elif kind == "shared":  # one submodule reachable twice
            block = nn.Linear(d, d)
            layers += [block, nn.Tanh(), block]
        else:  # one weight in two modules, each with its own bias
            first, second = nn.Linear(d, d), nn.Linear(d, d)
            second.weight = first.weight
            layers += [first, nn.Tanh(), second]
    if embed is not None and d == embed.embedding_dim and draw(st.booleans()):
        out = nn.Linear(d, embed.num_embeddings, bias=False)
        out.weight = embed.weight  # the output layer tied to the embedding
        layers.append(out)

    net = nn.Sequential(*layers)
    params = list(net.parameters())
    for p, frozen in zip(params, draw(st.lists(st.booleans(), min_size=len(params), max_size=len(params)))):
        if frozen:
            p.requires_grad_(False)
    net.train(draw(st.booleans()))
    note(repr(net))
    note(f"frozen: {[k for k, p in net.named_parameters() if not p.requires_grad]}")
    return net, x


def _loss(out: Tensor) -> Tensor:
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return (out * w).sum() + out.pow(2).mean()


def _backward(loss: Tensor) -> None:
    if loss.requires_grad:  # every parameter may be frozen
        loss.backward()


def _assert_same_grads(net: nn.Module, ref: nn.Module) -> None:
    for (k, p), (_, r) in zip(net.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (r.grad is None), k
    got, want = grads_of(net), grads_of(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}")


@given(architectures())
def test_clone_module_output_and_gradients_equal_the_original(arch_x: Tuple[nn.Module, Tensor]) -> None:
    net, x = arch_x
    ref = copy.deepcopy(net)
    clone = fparams.clone_module(net)
    assert len(list(clone.parameters())) == len(list(net.parameters()))
    assert flat_weights_follow_slots(clone) == []
    out, want = clone(x), ref(x)
    torch.testing.assert_close(out, want)
    _backward(_loss(out))
    _backward(_loss(want))
    _assert_same_grads(net, ref)


@given(architectures(), st.integers(0, 2**16))
def test_update_module_equals_a_deepcopy_updated_by_hand(arch_x: Tuple[nn.Module, Tensor], seed: int) -> None:
    net, x = arch_x
    g = torch.Generator().manual_seed(seed)
    updates = [
        None if torch.rand((), generator=g) < 0.25 else 0.1 * torch.randn(p.shape, generator=g)
        for p in net.parameters()
    ]
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for p, u in zip(ref.parameters(), updates):
            if u is not None:
                p.add_(u)

    clone = fparams.update_module(fparams.clone_module(net), updates)
    for (k, c), (_, r) in zip(clone.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(c, r, msg=lambda m, k=k: f"{k}: {m}")
    assert flat_weights_follow_slots(clone) == []
    out, want = clone(x), ref(x)
    torch.testing.assert_close(out, want)
    _backward(_loss(out))
    _backward(_loss(want))
    _assert_same_grads(net, ref)


@given(architectures())
def test_split_and_architecture_equal_the_module_call(arch_x: Tuple[nn.Module, Tensor]) -> None:
    net, x = arch_x
    ref = copy.deepcopy(net)
    arch, params, buffers = fparams.split(net)
    assert list(params) == [k for k, _ in net.named_parameters()]
    assert list(buffers) == [k for k, _ in net.named_buffers()]
    out, want = arch(params, x), ref(x)
    torch.testing.assert_close(out, want)
    for (k, b), (_, r) in zip(net.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, r, msg=lambda m, k=k: f"{k}: {m}")
    _backward(_loss(out))
    _backward(_loss(want))
    _assert_same_grads(net, ref)
