"""Every fparams.optim optimizer against torch.optim: 20-step float64 trajectories for each option,
unused parameters (no gradient for the first steps) and per-parameter step counts."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
import fparams.optim as optim

STEPS = 20

#: (fparams factory, torch.optim class, keyword sets; each set is one option)
OPTIMIZERS: List[Tuple[Callable[..., Any], Optional[type], List[Dict[str, Any]]]] = [
    (
        optim.sgd,
        torch.optim.SGD,
        [
            dict(lr=0.1),
            dict(lr=0.1, momentum=0.9, weight_decay=0.1),
            dict(lr=0.1, momentum=0.9, nesterov=True),
            dict(lr=0.1, maximize=True),
        ],
    ),
    (
        optim.adam,
        torch.optim.Adam,
        [dict(lr=0.05), dict(lr=0.05, amsgrad=True, weight_decay=0.1), dict(lr=0.05, maximize=True)],
    ),
    (optim.adamw, torch.optim.AdamW, [dict(lr=0.05), dict(lr=0.05, maximize=True)]),
    (optim.rmsprop, torch.optim.RMSprop, [dict(lr=0.01, centered=True, momentum=0.5), dict(maximize=True)]),
    (
        optim.adagrad,
        torch.optim.Adagrad,
        [
            dict(),
            dict(lr=0.1, lr_decay=0.05),
            dict(weight_decay=0.1),
            dict(initial_accumulator_value=0.5),
            dict(eps=1e-3),
            dict(maximize=True),
        ],
    ),
    (
        optim.adadelta,
        torch.optim.Adadelta,
        [dict(), dict(rho=0.5), dict(weight_decay=0.1), dict(lr=0.5, eps=1e-4), dict(maximize=True)],
    ),
    (
        optim.adamax,
        torch.optim.Adamax,
        [
            dict(),
            dict(lr=0.05, betas=(0.5, 0.9)),
            dict(weight_decay=0.1),
            dict(eps=1e-3),
            dict(maximize=True),
        ],
    ),
    (
        optim.asgd,
        torch.optim.ASGD,
        [
            dict(),
            dict(lr=0.1, lambd=0.01, alpha=0.5),
            dict(t0=5),
            dict(weight_decay=0.1),
            dict(maximize=True),
        ],
    ),
    (
        optim.rprop,
        torch.optim.Rprop,
        [dict(), dict(lr=0.05, etas=(0.3, 1.5)), dict(step_sizes=(1e-3, 0.02)), dict(maximize=True)],
    ),
    (
        optim.nadam,
        torch.optim.NAdam,
        [
            dict(),
            dict(momentum_decay=0.05),
            dict(weight_decay=0.1),
            dict(weight_decay=0.1, decoupled_weight_decay=True),
            dict(betas=(0.8, 0.9), eps=1e-3),
            dict(maximize=True),
        ],
    ),
    (
        optim.radam,
        torch.optim.RAdam,
        [
            dict(),
            dict(betas=(0.8, 0.9)),
            dict(weight_decay=0.1),
            dict(weight_decay=0.1, decoupled_weight_decay=True),
            dict(eps=1e-3),
            dict(maximize=True),
        ],
    ),
    (
        optim.adafactor,
        getattr(torch.optim, "Adafactor", None),  # torch >= 2.5
        [
            dict(),
            dict(lr=0.05),
            dict(beta2_decay=-0.5),
            dict(eps=(1e-20, 1e-2)),
            dict(d=2.0),
            dict(weight_decay=0.1),
            dict(maximize=True),
        ],
    ),
]



def _torch_lacks(cls: Optional[type], kw: Dict[str, Any]) -> Optional[str]:
    """Why this torch has no reference for ``kw``: no such class (Adafactor before torch 2.5), or
    no such option (NAdam's and RAdam's ``maximize`` on torch 2.3)."""
    if cls is None:
        return f"torch {torch.__version__} has no torch.optim counterpart (Adafactor is new in torch 2.5)"
    missing = [k for k in kw if k not in inspect.signature(cls.__init__).parameters]
    if missing:
        return f"torch {torch.__version__}'s torch.optim.{cls.__name__} has no option {', '.join(missing)}"
    return None


def _case(factory: Callable[..., Any], cls: Optional[type], kw: Dict[str, Any]) -> Any:
    lacks = _torch_lacks(cls, kw)
    return pytest.param(
        factory,
        cls,
        kw,
        id=f"{factory.__name__}-" + ",".join(f"{k}={v}" for k, v in kw.items()),
        marks=pytest.mark.skip(reason=lacks) if lacks else (),
    )


CASES = [_case(f, cls, kw) for f, cls, kws in OPTIMIZERS for kw in kws]


@pytest.fixture(autouse=True)
def float64_default() -> Iterator[None]:
    # torch.optim keeps scalars (NAdam's mu_product, ASGD's eta) in the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Net(nn.Module):
    """A small MLP with a branch ``late`` that the loss uses only from step ``late_from`` on."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.late = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(3, 2)

    def forward(self, x: Tensor, use_late: bool) -> Tensor:
        out = self.l2(torch.tanh(self.l1(x)))
        return out + self.late(x) if use_late else out  # type: ignore[no-any-return]


def _data(step: int) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(
        6, 2, generator=g, dtype=torch.float64
    )


def _net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def torch_trajectory(cls: type, kw: Dict[str, Any], late_from: int) -> List[Dict[str, Tensor]]:
    net = _net()
    opt = cls(net.parameters(), **kw)
    out = []
    for t in range(STEPS):
        x, y = _data(t)
        opt.zero_grad(set_to_none=True)
        _loss(net(x, t >= late_from), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
        out.append({k: p.detach().clone() for k, p in net.named_parameters()})
    return out


def fparams_trajectory(
    opt: optim.GradientTransformation, late_from: int, params: Optional[Dict[str, Tensor]] = None
) -> List[Dict[str, Tensor]]:
    net = _net()
    start = dict(net.named_parameters())
    params = {k: p.detach() for k, p in start.items()} if params is None else params
    state = opt.init(params)
    out = []
    for t in range(STEPS):
        x, y = _data(t)
        used = {k: p for k, p in params.items() if t >= late_from or not k.startswith("late")}
        live = {k: p.detach().requires_grad_() for k, p in used.items()}
        loss = _loss(torch.func.functional_call(net, {**params, **live}, (x, t >= late_from)), y)
        grads = dict(zip(live, torch.autograd.grad(loss, list(live.values()))))
        updates, state = opt.update(grads, state, params)
        assert set(updates) == set(grads)
        params = fparams.apply_updates(params, updates)
        out.append(dict(params))
    return out


def _compare(ours: List[Dict[str, Tensor]], ref: List[Dict[str, Tensor]]) -> None:
    for t, (a, b) in enumerate(zip(ours, ref)):
        for k in b:
            torch.testing.assert_close(
                a[k],
                b[k],
                rtol=0,
                atol=1e-12,
                msg=lambda m, k=k, t=t: f"step {t} {k}: {m}",  # type: ignore[misc]
            )


@pytest.mark.parametrize("factory,cls,kw", CASES)
def test_a_20_step_trajectory_equals_torch_optim(
    factory: Callable[..., Any], cls: type, kw: Dict[str, Any]
) -> None:
    _compare(fparams_trajectory(factory(**kw), late_from=0), torch_trajectory(cls, kw, late_from=0))


@pytest.mark.parametrize("factory,cls,kw", CASES)
def test_a_param_without_gradients_is_left_alone_as_in_torch(
    factory: Callable[..., Any], cls: type, kw: Dict[str, Any]
) -> None:
    # the `late` layer gets no gradient for 7 steps: torch skips it (p.grad is None), so weight decay and
    # momentum leave it alone, and its own step count starts at its first gradient (bias correction)
    ours, ref = fparams_trajectory(factory(**kw), late_from=7), torch_trajectory(cls, kw, late_from=7)
    _compare(ours, ref)
    start = dict(_net().named_parameters())
    for t in range(7):
        torch.testing.assert_close(ours[t]["late.weight"], start["late.weight"].detach(), rtol=0, atol=0)


def test_the_step_counts_are_kept_per_parameter() -> None:
    opt = optim.adam(0.1)
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    state = opt.init(params)
    for t in range(3):
        grads = {"a": torch.ones(2)} if t < 2 else {"a": torch.ones(2), "b": torch.ones(2)}
        _, state = opt.update(grads, state, params)
    assert {k: int(v) for k, v in state.adam.step.items()} == {"a": 3, "b": 1}


# -- reprs, fixed state fields, bad hyperparameters ------------------------------------------------

import re  # noqa: E402

REPRS = [
    (optim.adagrad(), "adagrad(lr=0.01, eps=1e-10)"),
    (
        optim.adagrad(0.1, lr_decay=0.01, maximize=True),
        "adagrad(lr=0.1, lr_decay=0.01, eps=1e-10, maximize=True)",
    ),
    (optim.adadelta(), "adadelta(lr=1.0, rho=0.9, eps=1e-06)"),
    (optim.adamax(), "adamax(lr=0.002, betas=(0.9, 0.999), eps=1e-08)"),
    (optim.asgd(), "asgd(lr=0.01, lambd=0.0001, alpha=0.75, t0=1000000.0)"),
    (optim.rprop(), "rprop(lr=0.01, etas=(0.5, 1.2), step_sizes=(1e-06, 50))"),
    (
        optim.nadam(decoupled_weight_decay=True, weight_decay=0.1),
        "nadam(lr=0.002, betas=(0.9, 0.999), eps=1e-08, momentum_decay=0.004, weight_decay=0.1, "
        "decoupled_weight_decay=True)",
    ),
    (optim.radam(), "radam(lr=0.001, betas=(0.9, 0.999), eps=1e-08)"),
    (optim.adafactor(), "adafactor(lr=0.01, beta2_decay=-0.8, eps=(None, 0.001), d=1.0)"),
    (optim.adam(lr=[0.1, 0.01]), "adam(lr=(0.1, 0.01), betas=(0.9, 0.999), eps=1e-08)"),
    (
        optim.chain(optim.clip_grad_norm(1.0), optim.clip_grad_value(0.5)),
        "chain(clip_grad_norm(max_norm=1.0), clip_grad_value(clip_value=0.5))",
    ),
]


@pytest.mark.parametrize("opt,text", REPRS, ids=[t for _, t in REPRS])
def test_every_optimizer_prints_as_its_call_on_one_line(opt: Any, text: str) -> None:
    assert repr(opt) == text and "\n" not in repr(opt)


@pytest.mark.parametrize(
    "factory,kws", [(f, kws) for f, _, kws in OPTIMIZERS], ids=[f.__name__ for f, _, _ in OPTIMIZERS]
)
def test_state_fields_do_not_depend_on_the_hyperparameters(
    factory: Callable[..., Any], kws: List[Dict[str, Any]]
) -> None:
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    states = [factory(**kw).init(params) for kw in kws]
    assert len({type(s) for s in states}) == 1
    assert len({tuple(type(f).__name__ for f in s) for s in states}) == 1


BAD_HYPER = [
    (
        lambda: optim.adagrad(lr_decay=-1.0),
        ValueError,
        "fparams.optim.adagrad: `lr_decay` must be a finite number >= 0; got -1.0.",
    ),
    (
        lambda: optim.adagrad(initial_accumulator_value="1"),  # type: ignore[arg-type]
        TypeError,
        "fparams.optim.adagrad: `initial_accumulator_value` must be a number or a tensor",
    ),
    (
        lambda: optim.adadelta(rho=1.5),
        ValueError,
        "fparams.optim.adadelta: `rho` must be in [0, 1]; got 1.5.",
    ),
    (
        lambda: optim.adamax(betas=(0.9,)),  # type: ignore[arg-type]
        ValueError,
        "fparams.optim.adamax: `betas` must be a pair (beta1, beta2)",
    ),
    (
        lambda: optim.asgd(lambd=-0.1),
        ValueError,
        "fparams.optim.asgd: `lambd` must be a finite number >= 0; got -0.1.",
    ),
    (
        lambda: optim.asgd(lr={"w": 0.1}),  # type: ignore[arg-type]
        TypeError,
        "fparams.optim.asgd: `lr` must be a number, a tensor or a schedule here",
    ),
    (
        lambda: optim.rprop(etas=(1.5, 1.2)),
        ValueError,
        "fparams.optim.rprop: `etas` must satisfy 0 < etas[0] < 1 < etas[1]; got (1.5, 1.2).",
    ),
    (
        lambda: optim.rprop(step_sizes=1e-6),  # type: ignore[arg-type]
        TypeError,
        "fparams.optim.rprop: `step_sizes` must be a pair of numbers or tensors; got 1e-06.",
    ),
    (
        lambda: optim.rprop(lr=[0.1]),
        TypeError,
        "fparams.optim.rprop: `lr` of rprop is its initial step size: a number or a tensor; got list.",
    ),
    (
        lambda: optim.nadam(decoupled_weight_decay="yes"),  # type: ignore[arg-type]
        TypeError,
        "fparams.optim.nadam: `decoupled_weight_decay` must be True or False",
    ),
    (
        lambda: optim.radam(eps=float("nan")),
        ValueError,
        "fparams.optim.radam: `eps` must be a finite number >= 0; got nan.",
    ),
    (
        lambda: optim.adafactor(beta2_decay=0.5),
        ValueError,
        "fparams.optim.adafactor: `beta2_decay` must be a number <= 0; got 0.5.",
    ),
    (
        lambda: optim.adafactor(eps=1e-3),  # type: ignore[arg-type]
        TypeError,
        "fparams.optim.adafactor: `eps` must be a pair (eps1 or None, eps2); got 0.001.",
    ),
    (
        lambda: optim.adafactor(d=0.5),
        ValueError,
        "fparams.optim.adafactor: `d` (the clipping threshold) must be >= 1; got 0.5.",
    ),
    (
        lambda: optim.adam(maximize=1),  # type: ignore[arg-type]
        TypeError,
        "fparams.optim.adam: `maximize` must be True or False; got int 1.",
    ),
    (
        lambda: optim.clip_grad_norm(-1.0),
        ValueError,
        "fparams.optim.clip_grad_norm: `max_norm` must be a finite number >= 0; got -1.0.",
    ),
    (
        lambda: optim.clip_grad_norm(1.0, norm_type=0),
        ValueError,
        "fparams.optim.clip_grad_norm: `norm_type` must be a number > 0 or float('inf'); got 0.",
    ),
    (
        lambda: optim.clip_grad_value(-1.0),
        ValueError,
        "fparams.optim.clip_grad_value: `clip_value` must be >= 0; got -1.0.",
    ),
    (
        lambda: optim.map_grads(3),  # type: ignore[arg-type]
        TypeError,
        "fparams.optim.map_grads: `fn` must be a callable fn(grads) -> grads; got int.",
    ),
    (
        lambda: optim.multi_transform({}, {}),
        TypeError,
        "fparams.optim.multi_transform: `transforms` must be a non-empty dict",
    ),
    (
        lambda: optim.partition(3, optim.sgd(), optim.sgd()),
        TypeError,
        "fparams.optim.partition: `filter` must be a glob string",
    ),
]


@pytest.mark.parametrize(
    "call,error,message", BAD_HYPER, ids=[m[2].split(":")[0] + m[2][-20:] for m in BAD_HYPER]
)
def test_bad_hyperparameters_of_the_new_optimizers_raise(
    call: Callable[[], Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_map_grads_sees_the_gradients_by_name() -> None:
    seen = []

    def clip_w(grads: Dict[str, Tensor]) -> Dict[str, Tensor]:
        seen.append(sorted(grads))
        return {k: (g.clamp(-0.1, 0.1) if k == "w" else g) for k, g in grads.items()}

    opt = optim.chain(optim.map_grads(clip_w), optim.sgd(1.0))
    params = {"w": torch.zeros(2), "b": torch.zeros(2)}
    updates, _ = opt.update({"w": torch.ones(2), "b": torch.ones(2)}, opt.init(params), params)
    assert seen == [["b", "w"]]
    torch.testing.assert_close(updates["w"], torch.full((2,), -0.1))
    torch.testing.assert_close(updates["b"], torch.full((2,), -1.0))


def test_update_does_not_validate_hyperparameters_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 19 item 9: checks run once, when the optimizer is built; an inner step runs none of the
    # hyperparameter/state checks (only the cheap shape/dtype check of the gradients, check_grads)
    import sys

    opts = [factory(**kw) for factory, _, kws in OPTIMIZERS for kw in kws[:1]]
    params = {"w": torch.ones(3, 2), "b": torch.ones(2)}
    states = [opt.init(params) for opt in opts]

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a check ran inside update()")

    for module in [m for name, m in list(sys.modules.items()) if name.startswith("fparams")]:
        for name in [n for n in vars(module) if n.startswith("check_") and n != "check_grads"]:
            monkeypatch.setattr(module, name, forbidden)
    for opt, state in zip(opts, states):
        for _ in range(2):
            _, state = opt.update({k: torch.ones_like(p) for k, p in params.items()}, state, params)
