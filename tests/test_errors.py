"""Bad input across the functional API: each gets a specific exception whose
message names the function, the argument or key, and the fix."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict

import pytest
import torch
from torch import Tensor, nn

import fparams


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))


def _bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


ARCH, PARAMS, _ = fparams.split(_mlp())
X, Y = torch.randn(8, 1), torch.randn(8, 1)


def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return (ARCH(p, x) - y).pow(2).mean()


CASES: Dict[str, Callable[[], Any]] = {
    "adapt lr dict of wrong shape": lambda: fparams.adapt(
        mse, PARAMS, X, Y, lr={k: torch.full((v.shape[0], 1), 0.1) for k, v in PARAMS.items()}
    ),
    "adapt lr tensor of wrong shape": lambda: fparams.adapt(mse, PARAMS, X, Y, lr=torch.full((8,), 0.1)),
    "apply_updates wrong shape": lambda: fparams.apply_updates(PARAMS, {"0.bias": torch.ones(8, 1)}),
    "sgd_step wrong grad shape": lambda: fparams.sgd_step(PARAMS, {"0.bias": torch.ones(8, 1)}, lr=0.1),
    "sgd_step None grad": lambda: fparams.sgd_step(PARAMS, {"0.bias": None}, lr=0.1),  # type: ignore[dict-item]
    "sgd_step lr of wrong shape": lambda: fparams.sgd_step(
        PARAMS, {"0.bias": torch.ones(8)}, lr=torch.ones(8, 1)
    ),
    "adapt non-scalar loss": lambda: fparams.adapt(
        lambda p, x, y: (ARCH(p, x) - y).pow(2), PARAMS, X, Y, lr=0.1
    ),
    "stack_tasks of a list": lambda: fparams.stack_tasks([torch.ones(1)], 2),  # type: ignore[arg-type]
    "map_tasks of a non-callable": lambda: fparams.map_tasks(3),  # type: ignore[arg-type]
    "map_tasks over zero tasks": lambda: fparams.map_tasks(mse)(
        PARAMS, torch.randn(0, 5, 1), torch.randn(0, 5, 1)
    ),
    "meta_value_and_grad non-scalar task output": lambda: fparams.meta_value_and_grad(
        lambda p, x, y: ARCH(p, x)
    )(PARAMS, torch.randn(3, 5, 1), torch.randn(3, 5, 1)),
    "partition with a regex string": lambda: fparams.partition(PARAMS, r"^2\."),
}

EXPECTED = {
    "adapt lr dict of wrong shape": (
        ValueError,
        r"fparams\.adapt: the learning rate for '0\.bias' has shape \(8, 1\)",
    ),
    "adapt lr tensor of wrong shape": (
        ValueError,
        r"fparams\.adapt: the learning rate for '0\.weight' has shape \(8,\)",
    ),
    "apply_updates wrong shape": (
        ValueError,
        r"fparams\.apply_updates: `updates\[.0\.bias.\]` has shape \(8, 1\) but the parameter has "
        r"shape \(8,\)",
    ),
    "sgd_step wrong grad shape": (ValueError, r"fparams\.sgd_step: `grads\['0\.bias'\]` has shape \(8, 1\)"),
    "sgd_step None grad": (TypeError, r"fparams\.sgd_step: `grads\['0\.bias'\]` is a NoneType"),
    "sgd_step lr of wrong shape": (ValueError, r"fparams\.sgd_step: the learning rate for '0\.bias'"),
    "adapt non-scalar loss": (ValueError, r"fparams\.adapt: `loss_fn` must return a scalar tensor"),
    "stack_tasks of a list": (TypeError, r"fparams\.stack_tasks: `tensors` must be a dict of tensors"),
    "map_tasks of a non-callable": (TypeError, r"fparams\.map_tasks: `fn` must be a callable"),
    "map_tasks over zero tasks": (ValueError, r"fparams\.map_tasks: the task arguments hold 0 tasks"),
    "meta_value_and_grad non-scalar task output": (
        ValueError,
        r"fparams\.meta_value_and_grad: `task_fn` must return one scalar loss per task.*\(5, 1\)",
    ),
    "partition with a regex string": (ValueError, r"for a regular expression pass re\.compile"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_specific_message(case: str) -> None:
    error, message = EXPECTED[case]
    with pytest.raises(error, match=message):
        CASES[case]()


@pytest.mark.parametrize("strategy", ["vmap", "chunked", "auto"])
def test_batchnorm_sharing_running_stats_over_tasks_is_explained(strategy: str) -> None:
    arch, params, buffers = fparams.split(_bn())
    before = copy.deepcopy(buffers)
    mapped = fparams.map_tasks(
        lambda p, x, y: (arch(p, x) - y).pow(2).mean(),
        strategy=strategy,
        chunk_size=2 if strategy == "chunked" else None,
    )
    with pytest.raises(
        ValueError, match=r"fparams\.exact_norms: a BatchNorm layer in train mode.*stack_tasks"
    ):
        mapped(params, torch.randn(4, 6, 3), torch.randn(4, 6, 1))
    for k in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(buffers[k], before[k])


def _bn_mse(arch: fparams.Architecture) -> Callable[..., Tensor]:
    return lambda p, x, y: (arch(p, x) - y).pow(2).mean()


def test_adapt_on_batchnorm_without_buffers_points_to_buffers_under_a_transform() -> None:
    # Under torch.func.grad the running statistics are captured from outside: adapt explains.
    arch, params, _ = fparams.split(_bn())
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    with pytest.raises(ValueError, match=r"fparams\.adapt: a layer updated a tensor in place.*buffers=b"):
        torch.func.grad(lambda p: _bn_mse(arch)(fparams.adapt(_bn_mse(arch), p, x, y, lr=0.1), x, y))(params)


def test_eager_adapt_on_batchnorm_updates_running_statistics_like_a_plain_step() -> None:
    # With no transform active adapt runs autograd, as a hand-written inner loop
    # does: the layer updates its own running statistics at every step.
    net, ref = _bn(), _bn()
    arch, params, buffers = fparams.split(net)
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    fparams.adapt(_bn_mse(arch), params, x, y, lr=0.1, steps=2)
    p = list(ref.parameters())
    for _ in range(2):
        g = torch.autograd.grad((ref(x) - y).pow(2).mean(), p, create_graph=True)
        fparams.update_module(ref, [-0.1 * gi for gi in g])
    for k, b in ref.named_buffers():
        torch.testing.assert_close(buffers[k], b)
    assert int(buffers["1.num_batches_tracked"]) == 2


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@pytest.mark.parametrize("make", [lambda m: fparams.MAML(m, lr=0.1), lambda m: fparams.MetaSGD(m, lr=0.1)])
def test_learners_forward_attributes_to_the_module_like_learn2learn(make: Callable[[nn.Module], Any]) -> None:
    net = _Named()
    learner = make(net)
    assert learner.features is net.features
    clone = learner.clone()
    assert clone.features is clone.module.features and clone.features is not net.features
    with pytest.raises(AttributeError, match="nothing_here"):
        learner.nothing_here  # noqa: B018
    copy.deepcopy(learner)  # the copy protocol still sees AttributeError for unknown dunders
