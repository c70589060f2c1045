"""fparams/_checks.py: every helper's error branch, with the exact message it shows."""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import pytest
import torch

from fparams import _checks as c
from fparams._errors import FparamsError, public

ERRORS = [
    (lambda: c.check_dict("d", [1]), TypeError,
     "fparams.f: `d` must be a dict of tensors keyed by name; got list. "
     "Use fparams.split(module) to get one."),
    (lambda: c.check_keys("d", {"b": 1, "z": 1}, {"a": 1, "b": 1, "c": 1}), ValueError,
     "fparams.f: `d` does not have the expected keys. Missing key(s): 'a', 'c'. Unexpected key(s): 'z'."),
    (lambda: c.check_keys("d", {"z": 1}, {"a": 1}, missing_ok=True, fix="Fix it."), ValueError,
     "fparams.f: `d` does not have the expected keys. Unexpected key(s): 'z'. Fix it."),
    (lambda: c.check_keys("d", {"z": 1}, {"a": 1}, unexpected_ok=True), ValueError,
     "fparams.f: `d` does not have the expected keys. Missing key(s): 'a'."),
    (lambda: c.check_shapes("u", {"w": 1.0}, {"w": torch.ones(2)}), TypeError,
     "fparams.f: `u['w']` is a float; give a tensor (or leave the key out)."),
    (lambda: c.check_shapes("u", {"w": torch.ones(3)}, {"w": torch.ones(2)}), ValueError,
     "fparams.f: `u['w']` has shape (3,) but the parameter has shape (2,)."),
    (lambda: c.check_hyper("eps", "1"), TypeError,
     "fparams.f: `eps` must be a number or a tensor; got str '1'."),
    (lambda: c.check_hyper("eps", False), TypeError,
     "fparams.f: `eps` must be a number or a tensor; got bool False."),
    (lambda: c.check_hyper("eps", math.nan), ValueError,
     "fparams.f: `eps` must be a finite number >= 0; got nan."),
    (lambda: c.check_hyper("beta", 1.0, high=1.0), ValueError,
     "fparams.f: `beta` must be in [0, 1); got 1.0."),
    (lambda: c.check_hyper("a", 1.5, high=1.0, high_closed=True), ValueError,
     "fparams.f: `a` must be in [0, 1]; got 1.5."),
    (lambda: c.check_lr(None), TypeError,
     "fparams.f: `lr` must be a number, a tensor or a dict of per-parameter rates; got NoneType None."),
    (lambda: c.check_lr(None, optimizer_ok=True), TypeError,
     "fparams.f: `lr` must be a number, a tensor, a dict of per-parameter rates or an fparams.optim "
     "optimizer; got NoneType None."),
    (lambda: c.check_lr(None, optimizer_ok=True, per_step_ok=True), TypeError,
     "fparams.f: `lr` must be a number, a tensor, a dict of per-parameter rates, a list of per-step "
     "rates or an fparams.optim optimizer; got NoneType None."),
    (lambda: c.check_lr(-1), ValueError, "fparams.f: `lr` must be a finite number >= 0; got -1."),
    (lambda: c.check_lr({"w": -0.5}), ValueError,
     "fparams.f: `lr['w']` must be a finite number >= 0; got -0.5."),
    (lambda: c.check_rate_keys({"b": 1, "q": 1}, ["a", "b"], ["a", "b", "c"]), ValueError,
     "fparams.f: `lr` is a dict of per-parameter rates but does not fit the params. Missing key(s): 'a'. "
     "Unexpected key(s): 'q'. Give one rate per parameter that gets a gradient."),
    (lambda: c.check_rate_shapes(torch.ones(3, 1), {"w": torch.ones(3)}), ValueError,
     "fparams.f: the learning rate for 'w' has shape (3, 1), which would change the parameter's shape (3,); "
     "give a scalar or a tensor of the parameter's shape."),
    (lambda: c.check_rate_shapes(torch.ones(4), {"w": torch.ones(3)}), ValueError,  # no broadcast at all
     "fparams.f: the learning rate for 'w' has shape (4,), which would change the parameter's shape (3,); "
     "give a scalar or a tensor of the parameter's shape."),
    (lambda: c.check_flag("amsgrad", 1), TypeError,
     "fparams.f: `amsgrad` must be True or False; got int 1."),
    (lambda: c.check_betas(0.9), TypeError,
     "fparams.f: `betas` must be a pair (beta1, beta2) of numbers or tensors; got float 0.9."),
    (lambda: c.check_betas((0.9, 0.9, 0.9)), ValueError,
     "fparams.f: `betas` must be a pair (beta1, beta2) of numbers or tensors; got 3 values."),
    (lambda: c.check_int("n", 2.0, 1), TypeError, "fparams.f: `n` must be an int; got float 2.0."),
    (lambda: c.check_int("n", "x", 1, none_ok=True), TypeError,
     "fparams.f: `n` must be an int or None; got str 'x'."),
    (lambda: c.check_int("n", 0, 1), ValueError, "fparams.f: `n` must be an int >= 1; got 0."),
    (lambda: c.check_positive("tol", "x"), TypeError, "fparams.f: `tol` must be a number; got str 'x'."),
    (lambda: c.check_positive("tol", 0.0), ValueError,
     "fparams.f: `tol` must be a finite number > 0; got 0.0."),
    (lambda: c.check_positive("tol", math.inf), ValueError,
     "fparams.f: `tol` must be a finite number > 0; got inf."),
    (lambda: c.check_choice("s", 3, ("a", "b")), TypeError,
     "fparams.f: `s` must be one of ('a', 'b'); got int 3."),
    (lambda: c.check_choice("s", "c", ("a", "b")), ValueError,
     "fparams.f: `s` must be one of ('a', 'b'); got 'c'."),
    (lambda: c.check_callable("fn", 3, "fn(x)"), TypeError,
     "fparams.f: `fn` must be a callable fn(x); got int."),
    (lambda: c.check_instance("m", 3, torch.nn.Module, "a torch.nn.Module"), TypeError,
     "fparams.f: `m` must be a torch.nn.Module; got int."),
    (lambda: c.check_state((), torch.Size), TypeError,  # any class: the state's type is named
     "fparams.f: `state` must be the Size that this transform's init() returned; got tuple."),
]  # fmt: skip


@pytest.mark.parametrize("call,error,message", ERRORS, ids=[e[2][:60] for e in ERRORS])
def test_each_check_raises_its_message(call: Callable[[], Any], error: type, message: str) -> None:
    # the checks name no function: the public function they run in adds its name, once
    with pytest.raises(error, match="^" + re.escape(message) + "$") as info:
        public("f")(call)()
    assert isinstance(info.value, FparamsError) and info.value.function == "f"
    with pytest.raises(error, match="^" + re.escape(message.replace("fparams.f: ", "", 1)) + "$"):
        call()


def test_valid_values_pass() -> None:
    c.check_keys("d", {"a": 1}, {"a": 1})
    c.check_hyper("lr", torch.tensor(-1.0))  # tensors are never read
    assert c.check_lr(0.1) is None and c.check_lr({"w": torch.ones(())}) is not None
    c.check_int("n", None, 1, none_ok=True)
    assert c.check_betas([0.5, 0.25]) == (0.5, 0.25)


def test_a_long_value_is_shortened_in_messages() -> None:
    assert c.describe("x" * 100) == "str '" + "x" * 56 + "..."
    assert c.describe(torch.ones(2, 3)) == "a tensor of shape (2, 3)"
