"""Uniform validation at the entry points of the core (issue 16): every bad input ends in a
specific fparams error that names the function, the argument, the offending value and the fix.

Each case is checked against the whole message it must show (``re.escape``), and is one the
old code let through (a negative, NaN or infinite rate, a string flag) or answered with a raw
Python or torch error.
"""

# Wrong types on purpose: the point of every case is an argument of the wrong type or value.
# mypy: disable-error-code="arg-type, list-item, dict-item"

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import nn

import fparams


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


def grads(m: nn.Module) -> List[torch.Tensor]:
    return [torch.ones_like(p) for p in m.parameters()]


def learner() -> fparams.MAML:
    return fparams.MAML(net(), lr=0.1).clone()


X = torch.randn(4, 2)
ARCH, PARAMS, _ = fparams.split(net())

CASES: Dict[str, Callable[[], Any]] = {
    "MAML lr negative": lambda: fparams.MAML(net(), lr=-0.1),
    "MAML lr nan": lambda: fparams.MAML(net(), lr=math.nan),
    "MAML lr inf": lambda: fparams.MAML(net(), lr=math.inf),
    "MAML lr str": lambda: fparams.MAML(net(), lr="0.1"),
    "MAML lr None": lambda: fparams.MAML(net(), lr=None),
    "MAML lr overflows float32": lambda: fparams.MAML(net(), lr=1e39),
    "MAML first_order str": lambda: fparams.MAML(net(), lr=0.1, first_order="False"),
    "MAML allow_unused int": lambda: fparams.MAML(net(), lr=0.1, allow_unused=1),
    "MAML allow_nograd str": lambda: fparams.MAML(net(), lr=0.1, allow_nograd="yes"),
    "MAML.adapt first_order str": lambda: learner().adapt(learner().module(X).sum(), first_order="False"),
    "MAML.adapt loss not a tensor": lambda: learner().adapt(1.0),
    "MAML.adapt loss not scalar": lambda: learner().adapt(torch.ones(3, requires_grad=True)),
    "MAML.clone first_order int": lambda: fparams.MAML(net(), lr=0.1).clone(first_order=0),
    "MetaSGD lr negative": lambda: fparams.MetaSGD(net(), lr=-0.1),
    "MetaSGD lr str": lambda: fparams.MetaSGD(net(), lr="0.1"),
    "MetaSGD lr overflows float32": lambda: fparams.MetaSGD(net(), lr=1e39),
    "MetaSGD first_order str": lambda: fparams.MetaSGD(net(), first_order="False"),
    "MetaSGD lrs a tensor": lambda: fparams.MetaSGD(net(), lrs=torch.ones(3)),
    "MetaSGD lrs wrong shape": lambda: fparams.MetaSGD(net(), lrs=[torch.ones(3)] * 4),
    "MetaSGD lrs a number": lambda: fparams.MetaSGD(net(), lrs=[0.1] * 4),
    "MetaSGD.adapt first_order str": lambda: (
        fparams.MetaSGD(net()).clone().adapt(torch.ones(()), first_order="no")
    ),
    "maml_update lr negative": lambda: fparams.maml_update(net(), -0.1, grads(net())),
    "maml_update lr nan": lambda: fparams.maml_update(net(), math.nan, grads(net())),
    "maml_update lr inf": lambda: fparams.maml_update(net(), math.inf, grads(net())),
    "maml_update lr str": lambda: fparams.maml_update(net(), "0.1", grads(net())),
    "maml_update lr None": lambda: fparams.maml_update(net(), None, grads(net())),
    "maml_update lr overflows float32": lambda: fparams.maml_update(net(), 1e39, grads(net())),
    "maml_update lr tensor of wrong shape": lambda: fparams.maml_update(net(), torch.ones(2), grads(net())),
    "maml_update grads a dict": lambda: fparams.maml_update(net(), 0.1, {"w": torch.ones(1)}),
    "meta_sgd_update lrs entry negative": lambda: fparams.meta_sgd_update(net(), [-0.1] * 4, grads(net())),
    "meta_sgd_update lrs entry str": lambda: fparams.meta_sgd_update(net(), ["0.1"] * 4, grads(net())),
    "meta_sgd_update lrs entry overflows": lambda: fparams.meta_sgd_update(net(), [1e39] * 4, grads(net())),
    "sgd_step lr overflows float32": lambda: fparams.sgd_step(PARAMS, {"0.bias": torch.ones(3)}, 1e39),
    "sgd_step lr dict entry overflows": lambda: fparams.sgd_step(
        PARAMS, {"0.bias": torch.ones(3)}, {"0.bias": 4e38}
    ),
    "sgd_step lr dict of complex tensors": lambda: fparams.sgd_step(
        PARAMS, {"0.bias": torch.ones(3)}, {"0.bias": torch.ones(3, dtype=torch.complex64)}
    ),
    "apply_updates complex into real": lambda: fparams.apply_updates(
        PARAMS, {"0.bias": torch.ones(3, dtype=torch.complex64)}
    ),
    "apply_updates float into integer": lambda: fparams.apply_updates(
        {"n": torch.zeros(3, dtype=torch.int64)}, {"n": torch.ones(3)}
    ),
    "apply_updates a number in params": lambda: fparams.apply_updates({"w": 1.0}, {}),
    "detach requires_grad str": lambda: fparams.detach(PARAMS, requires_grad="yes"),
    "detach a number": lambda: fparams.detach({"w": 1.0}),
    "clone a list": lambda: fparams.clone({"w": [1.0]}),
    "zeros_like a number": lambda: fparams.zeros_like({"w": 3}),
    "map_params not callable": lambda: fparams.map_params(3, PARAMS),
    "map_params a number in rest": lambda: fparams.map_params(torch.add, {"w": torch.ones(1)}, {"w": 1}),
    "detach_module keep_requires_grad str": lambda: fparams.detach_module(net(), keep_requires_grad="no"),
    "clone_module memo a list": lambda: fparams.clone_module(net(), memo=[]),
    "update_module memo a number": lambda: fparams.update_module(net(), [None] * 4, memo=3),
    "arch a list as params": lambda: ARCH([PARAMS["0.weight"]], X),
    "arch a list as buffers": lambda: ARCH(PARAMS, X, buffers=[]),
    "arch an integer tensor in params": lambda: ARCH(
        {**PARAMS, "0.weight": torch.ones(3, 2, dtype=torch.int64)}, X
    ),
    "arch a number in params": lambda: ARCH({**PARAMS, "0.bias": 0.5}, X),
    "arch a param of the wrong shape": lambda: ARCH({**PARAMS, "0.weight": torch.ones(2, 3)}, X),
    "bind a number in params": lambda: ARCH.bind({**PARAMS, "0.bias": 0.5}),
}

EXPECTED: Dict[str, Tuple[type, str]] = {
    "MAML lr negative": (
        fparams.FparamsValueError,
        "fparams.MAML: `lr` must be a finite number >= 0; got -0.1.",
    ),
    "MAML lr nan": (
        fparams.FparamsValueError,
        "fparams.MAML: `lr` must be a finite number >= 0; got nan.",
    ),
    "MAML lr inf": (
        fparams.FparamsValueError,
        "fparams.MAML: `lr` must be a finite number >= 0; got inf.",
    ),
    "MAML lr str": (
        fparams.FparamsTypeError,
        "fparams.MAML: `lr` must be a number, a tensor or an fparams.optim optimizer; got str "
        "'0.1'.",
    ),
    "MAML lr None": (
        fparams.FparamsTypeError,
        "fparams.MAML: `lr` must be a number, a tensor or an fparams.optim optimizer; got "
        "NoneType None.",
    ),
    "MAML lr overflows float32": (
        fparams.FparamsValueError,
        "fparams.MAML: `lr` is 1e+39, which overflows torch.float32, the dtype of parameter "
        "'0.weight' (largest finite value 3.403e+38); give a rate that fits the parameters' "
        "dtype.",
    ),
    "MAML first_order str": (
        fparams.FparamsTypeError,
        "fparams.MAML: `first_order` must be True or False; got str 'False'.",
    ),
    "MAML allow_unused int": (
        fparams.FparamsTypeError,
        "fparams.MAML: `allow_unused` must be True or False; got int 1.",
    ),
    "MAML allow_nograd str": (
        fparams.FparamsTypeError,
        "fparams.MAML: `allow_nograd` must be True or False; got str 'yes'.",
    ),
    "MAML.adapt first_order str": (
        fparams.FparamsTypeError,
        "fparams.MAML.adapt: `first_order` must be True or False; got str 'False'.",
    ),
    "MAML.adapt loss not a tensor": (
        fparams.FparamsTypeError,
        "fparams.MAML.adapt: `loss` must be a scalar tensor; got float 1.0.",
    ),
    "MAML.adapt loss not scalar": (
        fparams.FparamsValueError,
        "fparams.MAML.adapt: `loss` must be a scalar tensor; got shape (3,). Reduce it first "
        "(loss.mean() or loss.sum()).",
    ),
    "MAML.clone first_order int": (
        fparams.FparamsTypeError,
        "fparams.MAML.clone: `first_order` must be True or False; got int 0.",
    ),
    "MetaSGD lr negative": (
        fparams.FparamsValueError,
        "fparams.MetaSGD: `lr` must be a finite number >= 0; got -0.1.",
    ),
    "MetaSGD lr str": (
        fparams.FparamsTypeError,
        "fparams.MetaSGD: `lr` must be a number or a tensor; got str '0.1'.",
    ),
    "MetaSGD lr overflows float32": (
        fparams.FparamsValueError,
        "fparams.MetaSGD: `lr` is 1e+39, which overflows torch.float32, the dtype of parameter "
        "'0.weight' (largest finite value 3.403e+38); give a rate that fits the parameters' "
        "dtype.",
    ),
    "MetaSGD first_order str": (
        fparams.FparamsTypeError,
        "fparams.MetaSGD: `first_order` must be True or False; got str 'False'.",
    ),
    "MetaSGD lrs a tensor": (
        fparams.FparamsTypeError,
        "fparams.MetaSGD: `lrs` must be a list with one rate tensor per tensor of "
        "model.parameters(); got a tensor of shape (3,).",
    ),
    "MetaSGD lrs wrong shape": (
        fparams.FparamsValueError,
        "fparams.MetaSGD: `lrs[0]` (for parameter '0.weight') must be a tensor of the "
        "parameter's shape (3, 2); got shape (3,).",
    ),
    "MetaSGD lrs a number": (
        fparams.FparamsTypeError,
        "fparams.MetaSGD: `lrs[0]` (for parameter '0.weight') must be a tensor of the "
        "parameter's shape (3, 2); got float 0.1.",
    ),
    "MetaSGD.adapt first_order str": (
        fparams.FparamsTypeError,
        "fparams.MetaSGD.adapt: `first_order` must be True or False; got str 'no'.",
    ),
    "maml_update lr negative": (
        fparams.FparamsValueError,
        "fparams.maml_update: `lr` must be a finite number >= 0; got -0.1.",
    ),
    "maml_update lr nan": (
        fparams.FparamsValueError,
        "fparams.maml_update: `lr` must be a finite number >= 0; got nan.",
    ),
    "maml_update lr inf": (
        fparams.FparamsValueError,
        "fparams.maml_update: `lr` must be a finite number >= 0; got inf.",
    ),
    "maml_update lr str": (
        fparams.FparamsTypeError,
        "fparams.maml_update: `lr` must be a number or a tensor; got str '0.1'.",
    ),
    "maml_update lr None": (
        fparams.FparamsTypeError,
        "fparams.maml_update: `lr` must be a number or a tensor; got NoneType None.",
    ),
    "maml_update lr overflows float32": (
        fparams.FparamsValueError,
        "fparams.maml_update: `lr` is 1e+39, which overflows torch.float32, the dtype of "
        "parameter '0.weight' (largest finite value 3.403e+38); give a rate that fits the "
        "parameters' dtype.",
    ),
    "maml_update lr tensor of wrong shape": (
        fparams.FparamsValueError,
        "fparams.maml_update: the learning rate for '0.bias' has shape (2,), which would change "
        "the parameter's shape (3,); give a scalar or a tensor of the parameter's shape.",
    ),
    "maml_update grads a dict": (
        fparams.FparamsTypeError,
        "fparams.maml_update: `grads` must be a list with one entry per tensor of "
        "model.parameters(); got dict {'w': tensor([1.])}.",
    ),
    "meta_sgd_update lrs entry negative": (
        fparams.FparamsValueError,
        "fparams.meta_sgd_update: `lrs[0]` must be a finite number >= 0; got -0.1.",
    ),
    "meta_sgd_update lrs entry str": (
        fparams.FparamsTypeError,
        "fparams.meta_sgd_update: `lrs[0]` must be a number or a tensor; got str '0.1'.",
    ),
    "meta_sgd_update lrs entry overflows": (
        fparams.FparamsValueError,
        "fparams.meta_sgd_update: `lrs[0]` is 1e+39, which overflows torch.float32, the dtype of "
        "parameter '0.weight' (largest finite value 3.403e+38); give a rate that fits the "
        "parameters' dtype.",
    ),
    "sgd_step lr overflows float32": (
        fparams.FparamsValueError,
        "fparams.sgd_step: `lr` is 1e+39, which overflows torch.float32, the dtype of parameter "
        "'0.bias' (largest finite value 3.403e+38); give a rate that fits the parameters' dtype.",
    ),
    "sgd_step lr dict entry overflows": (
        fparams.FparamsValueError,
        "fparams.sgd_step: `lr['0.bias']` is 4e+38, which overflows torch.float32, the dtype of "
        "parameter '0.bias' (largest finite value 3.403e+38); give a rate that fits the "
        "parameters' dtype.",
    ),
    "sgd_step lr dict of complex tensors": (
        fparams.FparamsTypeError,
        "fparams.sgd_step: `lr['0.bias']` has dtype torch.complex64, which cannot be cast to its "
        "parameter's dtype torch.float32; parameters keep their dtype, so give values of a dtype "
        "of the same kind.",
    ),
    "apply_updates complex into real": (
        fparams.FparamsTypeError,
        "fparams.apply_updates: `updates['0.bias']` has dtype torch.complex64, which cannot be "
        "cast to its parameter's dtype torch.float32; parameters keep their dtype, so give "
        "values of a dtype of the same kind.",
    ),
    "apply_updates float into integer": (
        fparams.FparamsTypeError,
        "fparams.apply_updates: `updates['n']` has dtype torch.float32, which cannot be cast to "
        "its parameter's dtype torch.int64; parameters keep their dtype, so give values of a "
        "dtype of the same kind.",
    ),
    "apply_updates a number in params": (
        fparams.FparamsTypeError,
        "fparams.apply_updates: `params['w']` is float 1.0; every value must be a tensor. Use "
        "fparams.split(module) to get the dicts.",
    ),
    "detach requires_grad str": (
        fparams.FparamsTypeError,
        "fparams.detach: `requires_grad` must be True or False; got str 'yes'.",
    ),
    "detach a number": (
        fparams.FparamsTypeError,
        "fparams.detach: `tensors['w']` is float 1.0; every value must be a tensor. Use "
        "fparams.split(module) to get the dicts.",
    ),
    "clone a list": (
        fparams.FparamsTypeError,
        "fparams.clone: `tensors['w']` is list [1.0]; every value must be a tensor. Use "
        "fparams.split(module) to get the dicts.",
    ),
    "zeros_like a number": (
        fparams.FparamsTypeError,
        "fparams.zeros_like: `tensors['w']` is int 3; every value must be a tensor. Use "
        "fparams.split(module) to get the dicts.",
    ),
    "map_params not callable": (
        fparams.FparamsTypeError,
        "fparams.map_params: `fn` must be a function of one tensor per dict; got int.",
    ),
    "map_params a number in rest": (
        fparams.FparamsTypeError,
        "fparams.map_params: `rest[0]['w']` is int 1; every value must be a tensor. Use "
        "fparams.split(module) to get the dicts.",
    ),
    "detach_module keep_requires_grad str": (
        fparams.FparamsTypeError,
        "fparams.detach_module: `keep_requires_grad` must be True or False; got str 'no'.",
    ),
    "clone_module memo a list": (
        fparams.FparamsTypeError,
        "fparams.clone_module: `memo` must be None or a dict shared between calls (start with "
        "{}); got list [].",
    ),
    "update_module memo a number": (
        fparams.FparamsTypeError,
        "fparams.update_module: `memo` must be None or a dict shared between calls (start with "
        "{}); got int 3.",
    ),
    "arch a list as params": (
        fparams.FparamsTypeError,
        "fparams.Architecture: `params` must be a dict of tensors keyed by name; got list. Use "
        "fparams.split(module) to get one.",
    ),
    "arch a list as buffers": (
        fparams.FparamsTypeError,
        "fparams.Architecture: `buffers` must be a dict of tensors keyed by name; got list. Use "
        "fparams.split(module) to get one.",
    ),
    "arch an integer tensor in params": (
        fparams.FparamsTypeError,
        "fparams.Architecture: `params['0.weight']` is a tensor of dtype torch.int64; parameters "
        "must be floating point (or complex) tensors. Convert it (`.float()`), or pass it as a "
        "buffer.",
    ),
    "arch a number in params": (
        fparams.FparamsTypeError,
        "fparams.Architecture: `params['0.bias']` is float 0.5; every value must be a tensor. "
        "Use fparams.split(module) to get the dicts.",
    ),
    "arch a param of the wrong shape": (
        fparams.FparamsValueError,
        "fparams.Architecture: `params['0.weight']` has shape (2, 3) but the module's parameter "
        "has shape (3, 2), and the call failed (torch's error is chained above). Give each "
        "parameter its module's shape.",
    ),
    "bind a number in params": (
        fparams.FparamsTypeError,
        "fparams.Architecture.bind: `params['0.bias']` is float 0.5; every value must be a "
        "tensor. Use fparams.split(module) to get the dicts.",
    ),
}


def test_every_case_has_its_message() -> None:
    assert sorted(CASES) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_a_specific_fparams_error(name: str) -> None:
    kind, message = EXPECTED[name]
    with pytest.raises(kind, match="^" + re.escape(message) + "$"):
        CASES[name]()


# -- fparams.distributed: every entry point names itself (no process group in this process) ----

_NO_GROUP = (
    "the default process group is not initialised. Launch the script with `torchrun "
    "--nproc_per_node=N script.py` and call fparams.distributed.init_from_env() (or "
    "torch.distributed.init_process_group(...)) first."
)
DISTRIBUTED: Dict[str, Callable[[], Any]] = {
    "all_reduce_grads": lambda: fparams.distributed.all_reduce_grads({"w": torch.ones(1)}),
    "all_reduce_buffers": lambda: fparams.distributed.all_reduce_buffers({"w": torch.ones(1)}),
    "broadcast_params": lambda: fparams.distributed.broadcast_params({"w": torch.ones(1)}),
    "broadcast_buffers": lambda: fparams.distributed.broadcast_buffers({"w": torch.ones(1)}),
}


@pytest.mark.parametrize("name", sorted(DISTRIBUTED))
def test_the_distributed_collectives_name_themselves(name: str) -> None:
    message = f"fparams.distributed.{name}: {_NO_GROUP}"
    with pytest.raises(fparams.FparamsRuntimeError, match="^" + re.escape(message) + "$"):
        DISTRIBUTED[name]()
