"""fparams._kernels: attention on a kernel with a double backward where fparams differentiates twice,
and ops without one named in an fparams error (no transformers needed here)."""

from __future__ import annotations

import re
import warnings
from typing import Any, Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fparams
from fparams import _grads, _kernels, _torch_compat as compat

D = torch.float64


class Attention(nn.Module):
    """One self-attention layer on F.scaled_dot_product_attention (the default, fused kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 1, 4)).movedim(-3, 0).transpose(-2, -3)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(-2, -3).flatten(-2)).mean(-2)


def _setup() -> Any:
    torch.manual_seed(0)
    net = Attention().double()
    arch, params, _ = fparams.split(net)
    x, y = torch.randn(2, 5, 4, dtype=D), torch.randn(2, 1, dtype=D)
    return net, arch, params, x, y


def _flags() -> Dict[str, bool]:
    b = torch.backends.cuda
    return {
        "flash": b.flash_sdp_enabled(),
        "math": b.math_sdp_enabled(),
        "mem": b.mem_efficient_sdp_enabled(),
    }


DEFAULT = {"flash": True, "math": True, "mem": True}
MATH_ONLY = {"flash": False, "math": True, "mem": False}


def test_only_second_order_inner_steps_run_on_the_math_kernel() -> None:
    _, arch, params, x, y = _setup()
    seen: List[Dict[str, bool]] = []

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        seen.append(_flags())
        return (arch(p, x) - y).pow(2).mean()

    fast = fparams.adapt(mse, params, x, y, lr=0.1, steps=2)
    assert seen == [MATH_ONLY, MATH_ONLY]
    mse(fast, x, y).backward()  # the query pass keeps the fast kernels, and the double backward runs
    assert seen[-1] == DEFAULT
    seen.clear()
    fparams.adapt(mse, params, x, y, lr=0.1, steps=2, first_order=True)
    with torch.no_grad():
        fparams.adapt(mse, params, x, y, lr=0.1, steps=1)
    assert seen == [DEFAULT] * 3
    assert _flags() == DEFAULT


def test_second_order_through_attention_matches_finite_differences() -> None:
    _, arch, params, x, y = _setup()
    names = list(params)

    def meta_loss(*values: Tensor) -> Tensor:
        p = dict(zip(names, values))

        def mse(q: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return (arch(q, x) - y).pow(2).mean()

        return mse(fparams.adapt(mse, p, x, y, lr=0.5, steps=2), x, y)

    inputs = tuple(p.detach().clone().requires_grad_() for p in params.values())
    assert torch.autograd.gradcheck(meta_loss, inputs)


def test_the_graph_is_walked_once_per_adapt_not_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    _, arch, params, x, y = _setup()
    calls: List[int] = []
    real = _kernels.ops_without_double_backward
    monkeypatch.setattr(_kernels, "ops_without_double_backward", lambda g: calls.append(1) or real(g))

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    fparams.adapt(mse, params, x, y, lr=0.1, steps=4)
    assert len(calls) == 1
    fparams.map_tasks(
        lambda p, x, y: mse(fparams.adapt(mse, p, x, y, lr=0.1, steps=3), x, y), strategy="vmap"
    )(params, x.expand(3, 2, 5, 4), y.expand(3, 2, 1))
    assert len(calls) == 2  # one vmap over all tasks: one walk
    fparams.adapt(mse, params, x, y, lr=0.1, steps=4, first_order=True)
    assert len(calls) == 2  # first order: nothing to check


def test_map_tasks_vmap_runs_attention_batched_on_the_math_kernel() -> None:
    _, arch, params, x, y = _setup()
    seen: List[Dict[str, bool]] = []

    def task(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        seen.append(_flags())
        return (arch(p, x) - y).pow(2).mean()

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fparams.map_tasks(task, strategy="vmap")(params, x.expand(2, 2, 5, 4), y.expand(2, 2, 1))
    messages = [str(w.message) for w in record]
    if _math_kernel_is_batched():
        assert messages == []  # no "performance drop" per-example fallback
    else:  # torch 2.3: the math kernel itself has no batching rule, and fparams says so
        assert len(messages) == 1 and "aten::_scaled_dot_product_attention_math" in messages[0]
    assert seen == [MATH_ONLY]


def _math_kernel_is_batched() -> bool:
    """Whether this torch's vmap runs the math attention kernel without its per-example fallback."""
    q = torch.randn(2, 1, 3, 4)
    with warnings.catch_warnings(record=True) as record, _kernels.vmap_kernels():
        warnings.simplefilter("always")
        torch.func.vmap(lambda q: F.scaled_dot_product_attention(q, q, q))(q)
    return not any("performance drop" in str(w.message) for w in record)


def _user_flash_grads(net: nn.Module, x: Tensor, y: Tensor) -> List[Tensor]:
    loss = (net(x) - y).pow(2).mean()
    return list(torch.autograd.grad(loss, list(net.parameters()), create_graph=True))


USER_ATTENTION_BODY = (
    "the gradient goes through `aten::_scaled_dot_product_flash_attention_for_cpu_backward`: the loss "
    "was computed with a fused attention kernel, which has no double backward, so the second-order "
    "meta-gradient cannot be computed (torch would fail at the outer backward). Compute the loss "
    "under `with torch.nn.attention.sdpa_kernel(SDPBackend.MATH):`, or build the model with "
    '`attn_implementation="eager"`, or take a first-order step (`first_order=True` in MAML / '
    "MetaSGD; `create_graph=False` in your own torch.autograd.grad)."
)


def test_update_module_by_hand_names_the_attention_fix() -> None:
    net, _, _, x, y = _setup()
    clone = fparams.clone_module(net)
    grads = _user_flash_grads(clone, x, y)
    # TRANSITION: "fparams.update_module: " comes with update_module's @public (the core branch)
    with pytest.raises(
        fparams.FparamsRuntimeError,
        match=r"^(fparams\.update_module: )?" + re.escape(USER_ATTENTION_BODY) + "$",
    ):
        fparams.update_module(clone, updates=[-0.1 * g for g in grads])
    with pytest.raises(fparams.FparamsRuntimeError, match=re.escape(USER_ATTENTION_BODY)):
        fparams.maml_update(clone, 0.1, grads)
    # the fix: the user's forward on the math kernel
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        grads = _user_flash_grads(clone, x, y)
    fparams.maml_update(clone, 0.1, grads)
    (clone(x) - y).pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_maml_adapt_names_the_attention_fix() -> None:
    net, _, _, x, y = _setup()
    learner = fparams.MAML(net, lr=0.1).clone()
    with pytest.raises(fparams.FparamsRuntimeError, match=re.escape(USER_ATTENTION_BODY)):
        learner.adapt((learner(x) - y).pow(2).mean())
    learner = fparams.MAML(net, lr=0.1, first_order=True).clone()
    learner.adapt((learner(x) - y).pow(2).mean())  # first order: the fused kernel is fine


def test_ops_without_double_backward_finds_each_op() -> None:
    x = torch.randn(4, 6, dtype=D, requires_grad=True)
    cases = {
        "aten::hardsigmoid_backward": lambda t: F.hardsigmoid(t),
        "aten::_cdist_backward": lambda t: torch.cdist(t, t.detach() + 1),
        "aten::_pdist_backward": lambda t: F.pdist(t),
        "aten::multi_margin_loss_backward": lambda t: F.multi_margin_loss(t, torch.tensor([0, 1, 2, 3])),
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward": lambda t: (
            F.scaled_dot_product_attention(t[None, None], t[None, None], t[None, None])
        ),
    }
    for op, fn in cases.items():
        (g,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        assert compat.ops_without_double_backward([g, None, 1.0]) == [op]
        assert op in _kernels.NO_DOUBLE_BACKWARD
    (g,) = torch.autograd.grad(F.gelu(x).pow(2).sum(), x, create_graph=True)
    assert compat.ops_without_double_backward([g]) == []
    assert compat.ops_without_double_backward([x.detach()]) == []


def test_an_op_whose_name_cannot_be_read_is_still_reported() -> None:
    # Where a torch release renames the node's private metadata or rewords its error, the op is
    # "an op" and the error still names the fix.
    class Node:
        def __call__(self, *args: Any) -> None:
            raise RuntimeError("something else")

    assert compat._node_op(Node()) == "an op"


def test_second_order_kernels_restore_the_flags() -> None:
    with _kernels.second_order_kernels():
        assert _flags() == MATH_ONLY
    assert _flags() == DEFAULT
    with pytest.raises(KeyError):
        with _kernels.vmap_kernels():
            raise KeyError
    assert _flags() == DEFAULT


def test_the_route_functions_keep_their_signatures() -> None:
    # _inner.py (the adapt branch) calls these; the kernel handling added no argument.
    for route in ("autograd", "func"):
        fn = _grads.inner_grad(lambda p: (p["w"] ** 3).sum(), route, create_graph=True)
        w = torch.ones(2, dtype=D, requires_grad=True)
        assert torch.equal(fn({"w": w})["w"].detach(), torch.full((2,), 3.0, dtype=D))


def test_implicit_adapt_through_attention_with_the_default_kernels() -> None:
    # iMAML's backward differentiates the inner gradient (Hessian-vector products): the same
    # meta-gradient as with everything on the math kernel, which torch needs for it.
    _, arch, params, x, y = _setup()

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    def meta_grads() -> List[Tensor]:
        leaves = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
        fast = fparams.implicit.adapt(mse, leaves, x, y, lam=10.0, lr=0.05, steps=20)
        return list(torch.autograd.grad(mse(fast, x, y), list(leaves.values())))

    got = meta_grads()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = meta_grads()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_the_route_errors_are_fparams_errors_naming_adapt() -> None:
    _, arch, params, x, y = _setup()
    with pytest.raises(
        fparams.FparamsValueError,
        match="^"
        + re.escape(
            "fparams.adapt: `loss_fn` must return a scalar tensor (reduce it, e.g. .mean()); "
            "got shape (2, 1)."
        ),
    ):
        fparams.adapt(lambda p, x: arch(p, x), params, x, lr=0.1)
    with pytest.raises(
        fparams.FparamsValueError,
        match="^"
        + re.escape(
            "fparams.adapt: has_aux=True needs `loss_fn` to return a pair (loss, aux); got Tensor. "
            "Return `loss, aux`, or drop has_aux."
        ),
    ):
        fparams.adapt(lambda p, x: arch(p, x).sum(), params, x, lr=0.1, has_aux=True)
