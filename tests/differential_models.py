"""Model families and the independent plain-autograd reference for tests/test_differential.py.

Every family is an ``nn.Module`` (what fparams runs, through ``fparams.split``)
paired with a forward pass written here again from ``torch.nn.functional`` and
the layers' documented equations, over a plain dict of tensors keyed by the
names ``named_parameters()`` gives (a tied tensor under its first name). The
reference inner loops and optimizers below are written from the papers' and
``torch.optim``'s documented formulas with ``torch.autograd.grad(create_graph=True)``,
one task at a time. Nothing here imports fparams: it is the other side of the
comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tensors = Dict[str, Tensor]
Forward = Callable[[Tensors, Tensors, Tensor], Tensor]

#: The model families, each a small float64 net: body -> (norm) -> tanh -> head.
FAMILIES = (
    "mlp",
    "conv",
    "batchnorm",
    "batchnorm_eval",
    "layernorm",
    "groupnorm",
    "gru",
    "attention",
    "tied",
    "conv_batchnorm",
    "instancenorm",
) + (("rmsnorm",) if hasattr(nn, "RMSNorm") else ())  # nn.RMSNorm is new in torch 2.4
#: Families torch's vmap cannot run (no batching rule): only the loop and "auto" apply.
LOOP_ONLY = frozenset({"gru"})
#: Families whose loss depends on the batch's statistics (rows are not independent).
BATCH_STATS = frozenset({"batchnorm", "conv_batchnorm"})
#: Families with a bias that normalization cancels (its gradient is rounding noise).
CANCELLED_BIAS = frozenset({"batchnorm", "batchnorm_eval", "conv_batchnorm", "instancenorm"})


@dataclass
class Family:
    """One model family: the module fparams runs, and its reference forward."""

    name: str
    module: nn.Module
    forward: Forward  # forward(params, buffers, x) -> (rows, 1), written without the module
    row_shape: Tuple[int, ...]  # one input row, without the rows dim
    buffers: Tensors

    def inputs(self, g: torch.Generator, *lead: int) -> Tensor:
        return torch.randn(*lead, *self.row_shape, generator=g, dtype=torch.float64)


class _Net(nn.Module):
    """body -> (norm) -> tanh -> head: the shape every family shares."""

    def __init__(
        self, body: nn.Module, head: nn.Module, norm: Optional[nn.Module] = None, kind: str = ""
    ) -> None:
        super().__init__()
        self.body = body
        if norm is not None:
            self.norm = norm
        self.head = head
        self.kind = kind
        if kind == "tied":  # registered after body: the shared weight is named body.weight
            self.twin = nn.Linear(body.in_features, body.out_features)  # type: ignore[arg-type]
            self.body.weight = self.twin.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gru":
            h = self.body(x)[0][:, -1]
        elif self.kind == "attention":
            h = self.body(x, x, x, need_weights=False)[0].mean(1)
        elif self.kind == "tied":
            h = self.body(torch.tanh(self.twin(x)))  # the same weight twice
        else:
            h = self.body(x)
        if hasattr(self, "norm"):
            h = self.norm(h)
        out: Tensor = self.head(torch.tanh(h.flatten(1)))
        return out


def _linear(p: Tensors, name: str, x: Tensor) -> Tensor:
    out = x @ p[f"{name}.weight"].t()
    return out + p[f"{name}.bias"] if f"{name}.bias" in p else out


def _head(p: Tensors, h: Tensor) -> Tensor:
    return _linear(p, "head", torch.tanh(h))


def _mlp(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    return _head(p, _linear(p, "body", x))


def _conv(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    return _head(p, F.conv2d(x, p["body.weight"], p["body.bias"], padding=1).flatten(1))


def _conv_batchnorm(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    h = F.conv2d(x, p["body.weight"], p["body.bias"], padding=1)
    mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    w, bias = p["norm.weight"][:, None, None], p["norm.bias"][:, None, None]
    return _head(p, ((h - mean) / torch.sqrt(var + 1e-5) * w + bias).flatten(1))


def _instancenorm(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    h = F.conv1d(x, p["body.weight"], p["body.bias"], padding=1)  # (rows, channels, length)
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    normed = (h - mean) / torch.sqrt(var + 1e-5) * p["norm.weight"][:, None] + p["norm.bias"][:, None]
    return _head(p, normed.flatten(1))


def _rmsnorm(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    h = _linear(p, "body", x)
    return _head(p, h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * p["norm.weight"])


def _batchnorm(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    h = _linear(p, "body", x)
    mean, var = h.mean(0), h.var(0, unbiased=False)  # the batch's own statistics
    return _head(p, (h - mean) / torch.sqrt(var + 1e-5) * p["norm.weight"] + p["norm.bias"])


def _batchnorm_eval(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    h = _linear(p, "body", x)
    normed = (h - b["norm.running_mean"]) / torch.sqrt(b["norm.running_var"] + 1e-5)
    return _head(p, normed * p["norm.weight"] + p["norm.bias"])


def _layernorm(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    h = _linear(p, "body", x)
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    return _head(p, (h - mean) / torch.sqrt(var + 1e-5) * p["norm.weight"] + p["norm.bias"])


def _groupnorm(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    h = _linear(p, "body", x)
    g = h.reshape(h.shape[0], 2, -1)
    mean, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
    normed = ((g - mean) / torch.sqrt(var + 1e-5)).reshape(h.shape)
    return _head(p, normed * p["norm.weight"] + p["norm.bias"])


def _gru(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    # torch.nn.GRU's documented equations, gates in the order r, z, n
    w_ih, w_hh, b_ih, b_hh = (p[f"body.{k}_l0"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    h = x.new_zeros(x.shape[0], w_hh.shape[1])
    for t in range(x.shape[1]):
        gi, gh = x[:, t] @ w_ih.t() + b_ih, h @ w_hh.t() + b_hh
        (ir, iz, inn), (hr, hz, hn) = gi.chunk(3, -1), gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        h = (1 - z) * n + z * h
    return _head(p, h)


def _attention(p: Tensors, b: Tensors, x: Tensor, heads: int = 2) -> Tensor:
    # scaled dot-product self-attention, written out: softmax(q k^T / sqrt(d)) v
    rows, seq, dim = x.shape
    q, k, v = (x @ p["body.in_proj_weight"].t() + p["body.in_proj_bias"]).chunk(3, -1)
    q, k, v = (t.reshape(rows, seq, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), -1)
    out = (weights @ v).transpose(1, 2).reshape(rows, seq, dim)
    return _head(p, _linear(p, "body.out_proj", out).mean(1))


def _tied(p: Tensors, b: Tensors, x: Tensor) -> Tensor:
    # twin and body share one weight: split keeps it once, under its first name (body's)
    w = p["body.weight"]
    h = torch.tanh(x @ w.t() + p["twin.bias"])
    return _head(p, h @ w.t() + p["body.bias"])


def build(name: str, width: int, seed: int) -> Family:
    """The family ``name`` in float64, with ``width`` hidden units (even), seeded."""
    torch.manual_seed(seed)
    d = 2
    norm: Optional[nn.Module] = None
    row: Tuple[int, ...] = (d,)
    kind = ""
    forward: Forward = _mlp
    body: nn.Module = nn.Linear(d, width)
    head_in = width
    if name == "conv":
        body, row, forward = nn.Conv2d(1, 2, 3, padding=1), (1, 3, 3), _conv
        head_in = 2 * 9
    elif name in ("batchnorm", "batchnorm_eval"):
        norm = nn.BatchNorm1d(width)
        forward = _batchnorm if name == "batchnorm" else _batchnorm_eval
    elif name == "layernorm":
        norm, forward = nn.LayerNorm(width), _layernorm
    elif name == "groupnorm":
        norm, forward = nn.GroupNorm(2, width), _groupnorm
    elif name == "gru":
        body, row, kind, forward = nn.GRU(d, width, batch_first=True), (3, d), "gru", _gru
    elif name == "attention":
        body = nn.MultiheadAttention(width, 2, batch_first=True)
        row, kind, forward = (3, width), "attention", _attention
    elif name == "tied":
        body, kind, forward = nn.Linear(width, width), "tied", _tied
        row = (width,)
    elif name == "conv_batchnorm":
        body, norm, row = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), (1, 3, 3)
        forward, head_in = _conv_batchnorm, 2 * 9
    elif name == "instancenorm":
        body, norm = nn.Conv1d(1, 2, 3, padding=1), nn.InstanceNorm1d(2, affine=True)
        row, forward, head_in = (1, 4), _instancenorm, 2 * 4
    elif name == "rmsnorm":
        norm, forward = nn.RMSNorm(width, eps=1e-5), _rmsnorm
    net = _Net(body, nn.Linear(head_in, 1), norm, kind).double()
    with torch.no_grad():  # non-trivial affine and running statistics, so that every term matters
        for n_, t in net.named_parameters():
            if n_.startswith("norm."):
                t.copy_(torch.rand_like(t) + 0.5 if n_.endswith("weight") else torch.randn_like(t) * 0.3)
        for n_, b in net.named_buffers():
            if n_.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif n_.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.3)
    net.train(name != "batchnorm_eval")
    buffers = {k: t.detach().clone() for k, t in net.named_buffers() if t.is_floating_point()}
    return Family(name, net, forward, row, buffers)


# --------------------------------------------------------------------------
# The reference inner loops: plain autograd, one task at a time
# --------------------------------------------------------------------------


def mse(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).pow(2).mean()


def sgd_rule(rates: Sequence[Tensors], steps: int) -> Callable[[int, Tensors, Tensors, Tensors], Tensors]:
    """Plain steps ``p - lr * g``; ``rates[i]`` holds step i's rate per name (or one entry for all steps)."""

    def step(i: int, p: Tensors, g: Tensors, state: Tensors) -> Tensors:
        r = rates[i] if len(rates) > 1 else rates[0]
        return {k: p[k] - r[k] * g[k] for k in g}

    return step


def inner_loop(
    loss: Callable[[Tensors], Tensor],
    params: Tensors,
    adapted: Sequence[str],
    steps: int,
    rule: Callable[[int, Tensors, Tensors, Tensors], Tensors],
    first_order: bool,
    starts: Optional[List[Tensors]] = None,
) -> Tensors:
    """``steps`` differentiable steps on ``loss`` over the names in ``adapted``.

    ``starts``, where given, receives the parameters each step starts from.
    """
    fast = dict(params)
    state: Tensors = {}
    for i in range(steps):
        if starts is not None:
            starts.append(fast)
        picked = [fast[k] for k in adapted]
        grads = torch.autograd.grad(loss(fast), picked, create_graph=not first_order)
        if first_order:
            grads = tuple(g.detach() for g in grads)
        new = rule(i, {k: fast[k] for k in adapted}, dict(zip(adapted, grads)), state)
        fast = {**fast, **new}
    return fast


def safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` whose gradient is 0 where ``v`` is 0 (fparams.optim's documented rule), not inf."""
    positive = v > 0
    return torch.where(
        positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v)
    )


def optimizer_rule(kind: str, hyper: Dict[str, float]) -> Callable[[int, Tensors, Tensors, Tensors], Tensors]:
    """torch.optim's documented update for ``kind`` (sgd, adam, adamw, rmsprop), state in ``state``."""
    lr = hyper["lr"]

    def step(i: int, p: Tensors, g: Tensors, state: Tensors) -> Tensors:
        t = i + 1
        out = {}
        for k in g:
            grad = g[k]
            wd = hyper.get("weight_decay", 0.0)
            if kind != "adamw" and wd:
                grad = grad + wd * p[k]
            if kind == "sgd":
                mu, d = hyper["momentum"], grad
                if mu:  # torch.optim.SGD keeps no buffer (and ignores dampening) without momentum
                    buf = grad if t == 1 else mu * state[k] + (1 - hyper["dampening"]) * grad
                    state[k] = buf
                    d = grad + mu * buf if hyper["nesterov"] else buf
                out[k] = p[k] - lr * d
            elif kind in ("adam", "adamw"):
                b1, b2 = hyper["beta1"], hyper["beta2"]
                m = b1 * state.get("m." + k, torch.zeros_like(grad)) + (1 - b1) * grad
                v = b2 * state.get("v." + k, torch.zeros_like(grad)) + (1 - b2) * grad * grad
                state["m." + k], state["v." + k] = m, v
                base = p[k] * (1 - lr * wd) if kind == "adamw" else p[k]
                m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
                out[k] = base - lr * m_hat / (safe_sqrt(v_hat) + hyper["eps"])
            else:  # rmsprop
                a = hyper["alpha"]
                v = a * state.get("v." + k, torch.zeros_like(grad)) + (1 - a) * grad * grad
                state["v." + k] = v
                if hyper["centered"]:
                    ga = a * state.get("g." + k, torch.zeros_like(grad)) + (1 - a) * grad
                    state["g." + k] = ga
                    v = v - ga * ga
                d = grad / (safe_sqrt(v) + hyper["eps"])
                if hyper["momentum"]:
                    d = hyper["momentum"] * state.get("b." + k, torch.zeros_like(grad)) + d
                    state["b." + k] = d
                out[k] = p[k] - lr * d
        return out

    return step


def implicit_reference(
    loss: Callable[[Tensors], Tensor],
    query: Callable[[Tensors], Tensor],
    params: Tensors,
    lam: float,
    lr: float,
    steps: int,
) -> Tuple[Tensors, Tensor, List[Tensor], float]:
    """iMAML by hand: the adapted params, the query loss, d query / d params and min eig(H + lam I).

    ``steps`` plain gradient steps (no graph) on ``loss + lam/2 ||phi - params||^2``,
    then the gradient ``lam (H + lam I)^{-1} grad query`` from the Hessian
    ``H`` of ``loss`` at the adapted point, built densely and solved exactly.
    """
    names = list(params)
    phi = {k: t.detach().clone() for k, t in params.items()}
    for _ in range(steps):
        phi = {k: t.requires_grad_() for k, t in phi.items()}
        prox = loss(phi) + 0.5 * lam * sum(((phi[k] - params[k].detach()) ** 2).sum() for k in names)
        grads = torch.autograd.grad(prox, [phi[k] for k in names])
        phi = {k: (phi[k] - lr * g).detach() for k, g in zip(names, grads)}
    shapes = [phi[k].shape for k in names]
    flat = torch.cat([phi[k].reshape(-1) for k in names])

    def unflat(v: Tensor) -> Tensors:
        parts = torch.split(v, [math.prod(s) for s in shapes])
        return {k: t.reshape(s) for k, t, s in zip(names, parts, shapes)}

    hess = torch.autograd.functional.hessian(lambda v: loss(unflat(v)), flat)  # type: ignore[no-untyped-call]
    at = {k: t.requires_grad_() for k, t in unflat(flat.clone()).items()}
    q = query(at)
    gq = torch.cat([g.reshape(-1) for g in torch.autograd.grad(q, [at[k] for k in names])])
    system = hess + lam * torch.eye(len(flat), dtype=flat.dtype)
    meta = lam * torch.linalg.solve(system, gq)
    lowest = torch.linalg.eigvalsh(system).min().item()
    return unflat(flat), q.detach(), list(unflat(meta).values()), lowest
