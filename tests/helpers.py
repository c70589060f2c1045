"""Helpers shared by the test files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set

import torch
from torch import Tensor, nn


def assert_dicts_close(a: Mapping[str, Tensor], b: Mapping[str, Tensor], **tol: float) -> None:
    """Same keys, and every pair of tensors close (``torch.testing.assert_close``)."""
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


class Snap(NamedTuple):
    """What a pure function must not change about one tensor of its input."""

    tensor: Tensor
    value: Tensor
    version: int
    requires_grad: bool


def snapshot(d: Mapping[str, Tensor]) -> Dict[str, Snap]:
    """Record identity, value, ``_version`` and ``requires_grad`` of every entry."""
    return {k: Snap(t, t.detach().clone(), t._version, t.requires_grad) for k, t in d.items()}


def assert_untouched(d: Mapping[str, Tensor], snap: Mapping[str, Snap]) -> None:
    """``d`` still holds the same tensor objects, unchanged in value, version and flag."""
    assert list(d) == list(snap), (list(d), list(snap))
    for k, s in snap.items():
        assert d[k] is s.tensor, f"{k}: a different tensor object"
        assert d[k]._version == s.version, f"{k}: _version {d[k]._version} != {s.version}"
        assert d[k].requires_grad == s.requires_grad, f"{k}: requires_grad changed"
        torch.testing.assert_close(d[k].detach(), s.value, rtol=0, atol=0, equal_nan=True)


def module_snapshot(module: nn.Module) -> Dict[str, Snap]:
    """:func:`snapshot` of every parameter and buffer of ``module``, all names kept."""
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    return snapshot(state)


def assert_module_untouched(module: nn.Module, snap: Mapping[str, Snap]) -> None:
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    assert_untouched(state, snap)


def grads_of(module: nn.Module) -> Dict[str, Tensor]:
    """``.grad`` of every parameter (zeros where none was accumulated)."""
    return {
        k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for k, p in module.named_parameters()
    }


def flat_weights_follow_slots(module: nn.Module) -> List[str]:
    """Names of RNN flat weights that are not the tensors in the module's slots."""
    bad = []
    for prefix, m in module.named_modules():
        if isinstance(m, nn.RNNBase):
            for name, w in zip(m._flat_weights_names, m._flat_weights):
                if w is not m._parameters[name]:
                    bad.append(f"{prefix}.{name}" if prefix else name)
    return bad


# -- small networks, each with an input maker ------------------------------------


class RecurrentNet(nn.Module):
    """A two-layer RNN / LSTM / GRU with a linear head on the last step."""

    def __init__(self, cell: type, num_layers: int = 2, bidirectional: bool = False) -> None:
        super().__init__()
        self.rnn = cell(4, 5, num_layers=num_layers, bidirectional=bidirectional)
        self.head = nn.Linear(5 * (2 if bidirectional else 1), 2)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])


class TiedNet(nn.Module):
    """An embedding whose weight is also the output layer's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(idx))))


class GradBufferNet(nn.Module):
    """A linear layer scaled by a buffer that requires grad."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 2).requires_grad_())
        self.register_buffer("count", torch.tensor(0))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * self.scale


def _shared() -> nn.Module:
    block = nn.Linear(4, 4)
    return nn.Sequential(block, nn.Tanh(), block, nn.Linear(4, 2))


def _frozen() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    net[0].weight.requires_grad_(False)
    return net


NETS = {
    "mlp": lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)),
    "batchnorm": lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)),
    "layernorm": lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)),
    "conv": lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    ),
    "tied": TiedNet,
    "shared": _shared,
    "frozen": _frozen,
    "grad-buffer": GradBufferNet,
    "rnn": lambda: RecurrentNet(nn.RNN),
    "lstm": lambda: RecurrentNet(nn.LSTM, bidirectional=True),
    "gru": lambda: RecurrentNet(nn.GRU),
}


def make_net(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return NETS[name]().to(dtype)


def make_input(name: str, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "tied":
        return torch.randint(0, 6, (5,), generator=g)
    if name == "conv":
        return torch.randn(3, 1, 6, 6, generator=g, dtype=dtype)
    if name in ("rnn", "lstm", "gru"):
        return torch.randn(3, 2, 4, generator=g, dtype=dtype)
    return torch.randn(5, 4, generator=g, dtype=dtype)


def make_target(name: str, seed: int = 2, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = {"tied": 5, "conv": 3, "rnn": 2, "lstm": 2, "gru": 2}.get(name, 5)
    cols = 6 if name == "tied" else 2
    return torch.randn(rows, cols, generator=g, dtype=dtype)


def loss_fn(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).mean()


# -- meta-learning references ----------------------------------------------------


def task_data(
    num_tasks: int,
    shots: int = 5,
    features: int = 3,
    outputs: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> List[Tensor]:
    """``[xs, ys, xq, yq]``: a support and a query set per task, tasks on dim 0."""
    g = torch.Generator().manual_seed(seed)
    x_shape, y_shape = (num_tasks, shots, features), (num_tasks, shots, outputs)
    return [torch.randn(s, generator=g, dtype=dtype) for s in (x_shape, y_shape, x_shape, y_shape)]


def task_slice(batches: Sequence[Tensor], i: int) -> List[Tensor]:
    """Task ``i`` of every batch."""
    return [b[i] for b in batches]


def leaves(tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Fresh leaf copies that require grad: the reference's own parameters."""
    return {k: t.detach().clone().requires_grad_() for k, t in tensors.items()}


def ref_adapt(
    loss: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    *args: Any,
    lr: Any,
    steps: int = 1,
    first_order: bool = False,
    only: Optional[Sequence[str]] = None,
) -> Dict[str, Tensor]:
    """The inner loop by hand: ``p - lr * g`` with ``torch.autograd.grad``.

    ``create_graph=True`` for second order; with ``first_order`` the gradients
    are taken without a graph and detached. ``only`` names the parameters that
    adapt (all by default); ``lr`` is a number, a tensor or a dict of tensors.
    """
    names = list(params) if only is None else list(only)
    fast = dict(params)
    for _ in range(steps):
        grads = torch.autograd.grad(loss(fast, *args), [fast[k] for k in names], create_graph=not first_order)
        for k, g in zip(names, grads):
            rate = lr[k] if isinstance(lr, Mapping) else lr
            fast[k] = fast[k] - rate * (g.detach() if first_order else g)
    return fast


def grads_wrt(value: Tensor, tensors: Mapping[str, Tensor], retain_graph: bool = False) -> Dict[str, Tensor]:
    """``d value / d tensors`` as a dict (zeros where ``value`` does not depend on one)."""
    found = torch.autograd.grad(value, list(tensors.values()), allow_unused=True, retain_graph=retain_graph)
    return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(tensors.items(), found)}


def finite_diff_grad(
    fn: Callable[[Dict[str, Tensor]], Tensor], params: Mapping[str, Tensor], eps: float = 1e-6
) -> Dict[str, Tensor]:
    """Central differences of the scalar ``fn(params)``, entry by entry (float64)."""
    base = {k: t.detach().clone() for k, t in params.items()}
    out = {}
    with torch.no_grad():
        for k, t in base.items():
            g = torch.zeros_like(t)
            for i in range(t.numel()):
                step = torch.zeros_like(t).view(-1)
                step[i] = eps
                plus = fn({**base, k: t + step.view_as(t)})
                minus = fn({**base, k: t - step.view_as(t)})
                g.view(-1)[i] = (plus - minus) / (2 * eps)
            out[k] = g
    return out


def rel_err(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """``|a - b| / |b|`` over all entries of two dicts with the same keys."""
    flat_a = torch.cat([a[k].detach().reshape(-1) for k in b])
    flat_b = torch.cat([b[k].detach().reshape(-1) for k in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def autograd_ops(t: Tensor) -> Set[str]:
    """Names of every backward node in ``t``'s graph."""
    seen: Set[Any] = set()
    names: Set[str] = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


# -- benchmarks ---------------------------------------------------------------------


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (registered, so its dataclasses and pickles resolve)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
