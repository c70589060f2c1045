"""gradcheck / gradgradcheck of the meta-objective (map_tasks + adapt) in float64."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import loss_fn, task_data

NORMS: Dict[str, Callable[[], Optional[nn.Module]]] = {
    "none": lambda: None,
    "batchnorm": lambda: nn.BatchNorm1d(3),
    "layernorm": lambda: nn.LayerNorm(3),
}


def _objective(norm: str, strategy: str, steps: int = 1) -> Tuple[Callable[..., Tensor], Tuple[Tensor, ...]]:
    """The mean query loss over 2 tasks as a function of the flat parameter tensors."""
    torch.manual_seed(0)
    layer = NORMS[norm]()
    net = nn.Sequential(nn.Linear(2, 3), *([layer] if layer is not None else []), nn.Tanh(), nn.Linear(3, 1))
    net = net.double()
    arch, params, _ = fparams.split(net)
    names = list(params)
    data = task_data(2, shots=4, features=2)

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.3, steps=steps), xq, yq)

    mapped = fparams.map_tasks(task, strategy=strategy, batch_stats=norm == "batchnorm")

    def objective(*flat: Tensor) -> Tensor:
        return mapped(dict(zip(names, flat)), *data).mean()

    inputs = tuple(p.detach().clone().requires_grad_() for p in params.values())
    return objective, inputs


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_gradcheck_meta_objective(norm: str, strategy: str) -> None:
    # the meta-gradient differentiates through the inner gradient (second order)
    objective, inputs = _objective(norm, strategy, steps=2)
    assert torch.autograd.gradcheck(objective, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("norm", ["none", "batchnorm"])
def test_gradgradcheck_meta_objective(norm: str) -> None:
    # the meta-Hessian: third derivatives of the task loss, through vmap
    objective, inputs = _objective(norm, "vmap")
    assert torch.autograd.gradgradcheck(objective, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_of_the_pure_meta_gradient() -> None:
    # meta_value_and_grad's grads, differentiated once more: its own second order
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 1)).double()
    arch, params, _ = fparams.split(net)
    names = list(params)
    data = task_data(2, shots=4, features=2)

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    step = fparams.meta_value_and_grad(
        lambda p, xs, ys, xq, yq: mse(fparams.adapt(mse, p, xs, ys, lr=0.3), xq, yq)
    )

    def meta_grad(*flat: Tensor) -> Tuple[Tensor, ...]:
        _, grads = step(dict(zip(names, flat)), *data)
        return tuple(grads[k] for k in names)

    inputs = tuple(p.detach().clone().requires_grad_() for p in params.values())
    assert torch.autograd.gradcheck(meta_grad, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_catches_a_first_order_meta_gradient() -> None:
    # first_order=True is not the derivative of the meta-objective: gradcheck must see it,
    # which shows the checks above can fail
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    arch, params, _ = fparams.split(net)
    names = list(params)
    data = task_data(2, shots=4, features=2)

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.3, first_order=True), xq, yq)

    def objective(*flat: Tensor) -> Tensor:
        return fparams.map_tasks(task)(dict(zip(names, flat)), *data).mean()

    inputs = tuple(p.detach().clone().requires_grad_() for p in params.values())
    assert not torch.autograd.gradcheck(
        objective, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False
    )
