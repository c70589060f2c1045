"""fparams.optim.from_torch / to_torch_state / from_torch_state against torch.optim (float64)."""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Dict, Iterator, List

import pytest
import torch
from torch import Tensor

import fparams
import fparams.optim as optim
from tests.test_optim_torch import (
    CASES,
    _compare,
    _data,
    _loss,
    _net,
    fparams_trajectory,
    torch_trajectory,
)


@pytest.fixture(autouse=True)
def float64_default() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("factory,cls,kw", CASES)
def test_from_torch_gives_the_same_trajectory(
    factory: Callable[..., Any], cls: type, kw: Dict[str, Any]
) -> None:
    net = _net()
    opt = optim.from_torch(cls(net.parameters(), **kw), net)
    assert repr(opt) == repr(factory(**kw))
    _compare(fparams_trajectory(opt, late_from=0), torch_trajectory(cls, kw, late_from=0))


def _torch_steps(net: Any, opt: torch.optim.Optimizer, steps: range) -> None:
    for t in steps:
        x, y = _data(t)
        opt.zero_grad(set_to_none=True)
        _loss(net(x, t >= 3), y).backward()  # type: ignore[no-untyped-call]
        opt.step()


def _fparams_steps(net: Any, opt: Any, params: Dict[str, Tensor], state: Any, steps: range) -> Any:
    for t in steps:
        x, y = _data(t)
        live = {
            k: p.detach().requires_grad_() for k, p in params.items() if t >= 3 or not k.startswith("late")
        }
        loss = _loss(torch.func.functional_call(net, {**params, **live}, (x, t >= 3)), y)
        grads = dict(zip(live, torch.autograd.grad(loss, list(live.values()))))
        updates, state = opt.update(grads, state, params)
        params = fparams.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("factory,cls,kw", CASES)
def test_states_round_trip_through_torch(factory: Callable[..., Any], cls: type, kw: Dict[str, Any]) -> None:
    # torch runs 5 steps (the `late` layer from step 3), fparams takes over from its state, and back
    net = _net()
    torch_opt = cls(net.parameters(), **kw)
    _torch_steps(net, torch_opt, range(5))
    opt = optim.from_torch(torch_opt, net)
    state = optim.from_torch_state(torch_opt, net)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    params, state = _fparams_steps(net, opt, params, state, range(5, 9))
    _torch_steps(net, torch_opt, range(5, 9))
    _compare([params], [dict(net.named_parameters())])
    # back: a fresh torch optimizer loads the fparams state and continues as fparams does
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(params[k])
    fresh = cls(net.parameters(), **kw)
    fresh.load_state_dict(optim.to_torch_state(state, fresh, net))
    params, state = _fparams_steps(net, opt, params, state, range(9, 12))
    _torch_steps(net, fresh, range(9, 12))
    _compare([params], [dict(net.named_parameters())])


def test_param_groups_become_a_multi_transform() -> None:
    net = _net()
    groups: List[Dict[str, Any]] = [
        {"params": [net.l1.weight, net.l2.weight, net.late.weight], "lr": 0.01, "weight_decay": 0.1},
        {"params": [net.l1.bias, net.l2.bias, net.late.bias]},
    ]
    torch_opt = torch.optim.Adam(groups, lr=0.05)
    opt = optim.from_torch(torch_opt, net)
    assert repr(opt).startswith("multi_transform({'group0': adam(lr=0.01")
    ours = fparams_trajectory(opt, late_from=0)
    ref_net = _net()
    ref_groups = [
        {
            "params": [ref_net.l1.weight, ref_net.l2.weight, ref_net.late.weight],
            "lr": 0.01,
            "weight_decay": 0.1,
        },
        {"params": [ref_net.l1.bias, ref_net.l2.bias, ref_net.late.bias]},
    ]
    ref_opt = torch.optim.Adam(ref_groups, lr=0.05)  # type: ignore[arg-type]
    ref = []
    for t in range(len(ours)):
        x, y = _data(t)
        ref_opt.zero_grad(set_to_none=True)
        _loss(ref_net(x, True), y).backward()  # type: ignore[no-untyped-call]
        ref_opt.step()
        ref.append({k: p.detach().clone() for k, p in ref_net.named_parameters()})
    _compare(ours, ref)


def test_params_outside_every_group_are_frozen() -> None:
    net = _net()
    opt = optim.from_torch(torch.optim.SGD(net.l1.parameters(), lr=0.1), net)
    params = {k: p.detach() for k, p in net.named_parameters()}
    updates, _ = opt.update({k: torch.ones_like(p) for k, p in params.items()}, opt.init(params), params)
    assert sorted(updates) == ["l1.bias", "l1.weight"]


def _with(opt: torch.optim.Optimizer, **extra: Any) -> torch.optim.Optimizer:
    opt.param_groups[0].update(extra)
    return opt


@pytest.mark.skipif(
    "decoupled_weight_decay" not in inspect.signature(torch.optim.Adam.__init__).parameters,
    reason=f"torch {torch.__version__}'s torch.optim.Adam has no decoupled_weight_decay",
)
def test_torch_adam_with_decoupled_weight_decay_is_adamw() -> None:
    net = _net()
    opt = optim.from_torch(torch.optim.Adam(net.parameters(), lr=0.1, decoupled_weight_decay=True), net)
    assert repr(opt) == repr(
        optim.adamw(lr=0.1, weight_decay=0)
    )  # torch.optim.Adam's default weight_decay is 0


BAD = [
    (
        lambda net: optim.from_torch("adam", net),  # type: ignore[arg-type]
        TypeError,
        "fparams.optim.from_torch: `optimizer` must be a torch.optim optimizer; got str.",
    ),
    (
        lambda net: optim.from_torch(torch.optim.LBFGS(net.parameters()), net),
        ValueError,
        "fparams.optim.from_torch: `optimizer` is a LBFGS, which fparams.optim has no counterpart for",
    ),
    (
        lambda net: optim.from_torch(torch.optim.SGD([torch.zeros(2, requires_grad=True)]), net),
        ValueError,
        "fparams.optim.from_torch: param group 0 of `optimizer` holds a tensor of shape (2,) that is not a "
        "parameter of `module`",
    ),
    (
        lambda net: (
            optim.from_torch(
                torch.optim.SGD(
                    net.parameters(), lr=0.1, fused=None, nesterov=False, momentum=0.0, dampening=0.0, **{}
                ),
                net,
            )
            and optim.from_torch(torch.optim.RMSprop(net.parameters(), foreach=False), net)
            and optim.from_torch(_with(torch.optim.SGD(net.parameters(), lr=0.1), betas=(0.9, 0.9)), net)
        ),
        ValueError,
        "fparams.optim.from_torch: the param group option betas=(0.9, 0.9) of torch.optim "
        "has no fparams.optim counterpart in sgd",
    ),
    (
        lambda net: optim.from_torch(torch.optim.SGD(net.parameters()), "net"),  # type: ignore[arg-type]
        TypeError,
        "fparams.optim.from_torch: `module` must be an nn.Module; got str.",
    ),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[m[2][:60] for m in BAD])
def test_bad_interop_calls_raise(call: Callable[[Any], Any], error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call(_net())
