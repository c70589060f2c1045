"""Param groups (partition / multi_transform), gradient clipping and per-step hyperparameters
(schedules), each against torch.optim and torch.nn.utils in float64."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import torch
from torch import Tensor

import fparams.optim as optim
from tests.test_optim_torch import STEPS, _compare, _data, _loss, _net, fparams_trajectory

F64 = torch.float64


@pytest.fixture(autouse=True)
def float64_default() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


def torch_run(
    make: Callable[[Any], torch.optim.Optimizer],
    before_step: Optional[Callable[[Any, Any, int], None]] = None,
) -> List[Dict[str, Tensor]]:
    net = _net()
    opt = make(net)
    out = []
    for t in range(STEPS):
        x, y = _data(t)
        opt.zero_grad(set_to_none=True)
        _loss(net(x, True), y).backward()  # type: ignore[no-untyped-call]
        if before_step is not None:
            before_step(net, opt, t)
        opt.step()
        out.append({k: p.detach().clone() for k, p in net.named_parameters()})
    return out


def test_partition_equals_torch_param_groups() -> None:
    def make(net: Any) -> torch.optim.Optimizer:
        biases = [p for k, p in net.named_parameters() if k.endswith("bias")]
        weights = [p for k, p in net.named_parameters() if not k.endswith("bias")]
        groups = [{"params": weights, "weight_decay": 0.1}, {"params": biases, "lr": 0.05}]
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    opt = optim.partition(
        "*.bias", optim.sgd(0.05, momentum=0.9), optim.sgd(0.1, momentum=0.9, weight_decay=0.1)
    )
    _compare(fparams_trajectory(opt, late_from=0), torch_run(make))


def test_multi_transform_with_a_dict_of_labels_equals_torch_param_groups() -> None:
    names = [k for k, _ in _net().named_parameters()]
    labels = {k: ("adam" if k.startswith("l1") else "rms") for k in names}

    def make(net: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for k, p in net.named_parameters() if k.startswith("l1")], lr=0.05)

    def make_rms(net: Any) -> torch.optim.Optimizer:
        return torch.optim.RMSprop([p for k, p in net.named_parameters() if not k.startswith("l1")], lr=0.01)

    class Both(torch.optim.Optimizer):  # two torch optimizers stepped together
        def __init__(self, net: Any) -> None:
            self.a, self.b = make(net), make_rms(net)
            self.param_groups = self.a.param_groups + self.b.param_groups

        def zero_grad(self, set_to_none: bool = True) -> None:
            self.a.zero_grad(set_to_none), self.b.zero_grad(set_to_none)

        def step(self, closure: Any = None) -> None:  # type: ignore[override]
            self.a.step(), self.b.step()

    opt = optim.multi_transform({"adam": optim.adam(0.05), "rms": optim.rmsprop(0.01)}, labels)
    _compare(fparams_trajectory(opt, late_from=0), torch_run(Both))
    assert repr(opt).startswith("multi_transform({'adam': adam(lr=0.05")


def test_a_label_without_a_transformation_raises() -> None:
    opt = optim.multi_transform({"a": optim.sgd(0.1)}, lambda name: "b")
    with pytest.raises(
        optim.FparamsValueError if hasattr(optim, "FparamsValueError") else ValueError,
        match=re.escape(
            "fparams.optim.multi_transform: parameter 'w' has the label 'b', which "
            "has no transformation; the labels are ['a']. Give every parameter "
            "one of them."
        ),
    ):
        opt.init({"w": torch.ones(1)})


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_equals_torch(norm_type: float) -> None:
    def clip(net: Any, opt: Any, t: int) -> None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05, norm_type=norm_type)

    opt = optim.chain(optim.clip_grad_norm(0.05, norm_type=norm_type), optim.sgd(0.5, momentum=0.5))
    _compare(
        fparams_trajectory(opt, late_from=0),
        torch_run(lambda n: torch.optim.SGD(n.parameters(), 0.5, 0.5), clip),
    )


def test_clip_grad_value_equals_torch() -> None:
    def clip(net: Any, opt: Any, t: int) -> None:
        torch.nn.utils.clip_grad_value_(net.parameters(), 0.02)

    opt = optim.chain(optim.clip_grad_value(0.02), optim.adam(0.05))
    _compare(
        fparams_trajectory(opt, late_from=0),
        torch_run(lambda n: torch.optim.Adam(n.parameters(), 0.05), clip),
    )


LRS = [0.05 * 0.9**t for t in range(STEPS)]
BETA1 = [0.5 + 0.02 * t for t in range(STEPS)]


def _set(**per_step: List[Any]) -> Callable[[Any, Any, int], None]:
    def hook(net: Any, opt: Any, t: int) -> None:
        for group in opt.param_groups:
            for k, values in per_step.items():
                group[k] = values[t] if k != "betas" else (values[t], group["betas"][1])

    return hook


def test_a_per_step_lr_and_beta_equal_torch_with_changed_param_groups() -> None:
    ref = torch_run(lambda n: torch.optim.Adam(n.parameters()), _set(lr=LRS, betas=BETA1))
    _compare(fparams_trajectory(optim.adam(lr=LRS, betas=(BETA1, 0.999)), late_from=0), ref)


def test_a_callable_schedule_equals_torch() -> None:
    ref = torch_run(lambda n: torch.optim.Adagrad(n.parameters()), _set(lr=LRS))
    opt = optim.adagrad(lr=lambda step: 0.05 * 0.9 ** step.double())
    _compare(fparams_trajectory(opt, late_from=0), ref)


def test_a_learned_schedule_gets_meta_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)

    def final(w: Tensor, lr0: Tensor, lr1: Tensor, lr2: Tensor, m: Tensor) -> Tensor:
        opt = optim.sgd(lr=[lr0, lr1, lr2], momentum=[m, m * 0.5, m])
        params = {"w": w}
        state = opt.init(params)
        for _ in range(4):  # the 4th step reuses the last value
            (grad,) = torch.autograd.grad(
                ((x @ params["w"] - y) ** 2).mean(), [params["w"]], create_graph=True
            )
            updates, state = opt.update({"w": grad}, state, params)
            params = {"w": params["w"] + updates["w"]}
        return ((x @ params["w"] - y) ** 2).mean()

    inputs = [torch.randn(3, generator=g).requires_grad_()] + [
        torch.tensor(v, requires_grad=True) for v in (0.1, 0.05, 0.02, 0.8)
    ]
    assert torch.autograd.gradcheck(final, inputs)


def test_a_bad_schedule_raises_naming_the_step() -> None:
    with pytest.raises(
        ValueError, match=re.escape("fparams.optim.adam: `lr[1]` must be a finite number >= 0; got -1")
    ):
        optim.adam(lr=[0.1, -1.0])
    with pytest.raises(
        TypeError, match=re.escape("fparams.optim.adam: `lr` as a schedule must be a non-empty list")
    ):
        optim.adam(lr=[])
