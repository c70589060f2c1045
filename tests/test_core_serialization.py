"""MAML and MetaSGD objects save and load as experiments save them (issue 16): pickle,
torch.save / torch.load, copy.deepcopy, with and without an optimizer and its state; a learner
whose tensors are inside the autograd graph is refused by deepcopy with an fparams error."""

from __future__ import annotations

import copy
import io
import pickle
import re
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from fparams.optim import GradientTransformation


def _init(params: Dict[str, Tensor]) -> Any:
    return {k: torch.zeros_like(p) for k, p in params.items()}


def _update(
    grads: Dict[str, Tensor], state: Any, params: Optional[Dict[str, Tensor]] = None
) -> Tuple[Dict[str, Tensor], Any]:
    momentum = {k: 0.9 * state[k] + g for k, g in grads.items()}
    return {k: -0.1 * m for k, m in momentum.items()}, momentum


#: A picklable optimizer (module-level functions): what MAML must carry through a save.
MOMENTUM = GradientTransformation(_init, _update)  # type: ignore[arg-type]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))


def _torch_roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # a whole object: not a weights-only file


ROUNDTRIPS: Dict[str, Callable[[Any], Any]] = {
    "pickle": lambda o: pickle.loads(pickle.dumps(o)),
    "torch.save": _torch_roundtrip,
    "deepcopy": copy.deepcopy,
}

MAKERS: Dict[str, Callable[[], Any]] = {
    "MAML": lambda: fparams.MAML(_net(), lr=0.1),
    "MAML tensor lr": lambda: fparams.MAML(_net(), lr=torch.tensor(0.1)),
    "MAML optimizer": lambda: fparams.MAML(_net(), lr=MOMENTUM),
    "MetaSGD": lambda: fparams.MetaSGD(_net(), lr=0.1),
}


def _meta_grads(learner_of: Any, x: Tensor, y: Tensor) -> Dict[str, Tensor]:
    learner = learner_of.clone()
    learner.adapt((learner(x) - y).pow(2).mean())
    learner.adapt((learner(x) - y).pow(2).mean())
    (learner(x) - y).pow(2).mean().backward()
    return {k: p.grad.clone() for k, p in learner_of.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("how", sorted(ROUNDTRIPS))
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_a_saved_learner_loads_and_trains_exactly_as_the_original(kind: str, how: str) -> None:
    original = MAKERS[kind]()
    loaded = ROUNDTRIPS[how](original)
    assert type(loaded) is type(original) and repr(loaded) == repr(original)
    x, y = torch.randn(6, 2), torch.randn(6, 1)
    want, got = _meta_grads(original, x, y), _meta_grads(loaded, x, y)
    assert sorted(want) == sorted(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_the_optimizer_state_of_a_learner_travels_with_it() -> None:
    maml = fparams.MAML(_net(), lr=MOMENTUM)
    x = torch.randn(6, 2)
    maml.adapt(maml(x).pow(2).mean(), first_order=True)  # the learner itself now holds a state
    fparams.detach_module(maml.module)
    loaded = pickle.loads(pickle.dumps(maml))
    assert loaded._opt_state is not None
    for k in maml._opt_state:
        torch.testing.assert_close(loaded._opt_state[k], maml._opt_state[k])


@pytest.mark.parametrize("kind", ["MAML", "MetaSGD"])
def test_deepcopy_of_a_graph_attached_clone_is_refused_with_the_fix(kind: str) -> None:
    learner = MAKERS[kind]().clone()
    message = (
        f"fparams.{kind}.__deepcopy__: this {kind} holds parameters inside the autograd graph (a "
        f"clone() or an adapted learner: '0.weight', '0.bias', '2.weight' ...), and torch deep-copies "
        f"only graph leaves. Deep-copy the {kind} that holds the meta-parameters and clone() the copy, "
        f"or call fparams.detach_module(learner.module) first (which cuts the graph)."
    )
    with pytest.raises(fparams.FparamsRuntimeError, match="^" + re.escape(message) + "$"):
        copy.deepcopy(learner)


def test_a_detached_clone_deep_copies() -> None:
    learner = fparams.MAML(_net(), lr=0.1).clone()
    fparams.detach_module(learner.module)
    twin = copy.deepcopy(learner)
    for (k, a), (_, b) in zip(learner.named_parameters(), twin.named_parameters()):
        assert a is not b and torch.equal(a, b), k


def test_the_state_dict_loads_with_torch_loads_default_weights_only() -> None:
    maml = fparams.MAML(_net(), lr=0.1)
    buf = io.BytesIO()
    torch.save(maml.state_dict(), buf)
    buf.seek(0)
    fresh = fparams.MAML(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)), lr=0.1)
    fresh.load_state_dict(torch.load(buf))
    for (k, a), (_, b) in zip(maml.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), k


def test_an_architecture_pickles_and_takes_its_modules_lock_after_loading() -> None:
    arch, params, _ = fparams.split(_net())
    loaded = pickle.loads(pickle.dumps(arch))
    x = torch.randn(3, 2)
    torch.testing.assert_close(loaded(dict(loaded.module.named_parameters()), x), arch(params, x))
    twin, _, _ = fparams.split(loaded.module)
    assert twin._lock is loaded._lock and loaded._lock is not arch._lock
