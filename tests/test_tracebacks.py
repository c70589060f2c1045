"""fparams' own errors are raised with fparams' and torch's frames out of the way."""

from __future__ import annotations

import os
import traceback
import warnings
from typing import Any, List

import pytest
import torch

import fparams
from fparams._errors import FparamsValueError, public

INTERNAL = (os.path.dirname(fparams.__file__), os.path.dirname(torch.__file__))


def _frames(err: BaseException) -> List[traceback.FrameSummary]:
    return traceback.extract_tb(err.__traceback__)


def _bn_task() -> Any:
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    arch, params, _ = fparams.split(net)

    def task(p: Any, x: torch.Tensor) -> torch.Tensor:
        return arch(p, x).pow(2).mean()  # the user's line that makes the mistake

    return task, params


def test_the_shared_statistics_error_shows_the_users_frames_only() -> None:
    task, params = _bn_task()
    with pytest.raises(ValueError, match=r"^fparams\.exact_norms: a BatchNorm layer") as info:
        fparams.map_tasks(task, strategy="vmap")(params, torch.randn(4, 5, 2))
    frames = _frames(info.value)
    internal = [f for f in frames if f.filename.startswith(INTERNAL)]
    # one frame: the public function's raise (hidden by pytest and IPython too)
    assert [f.name for f in internal] == ["call"], [(f.filename, f.name) for f in internal]
    assert frames[-1].name == "task" and "arch(p, x)" in (frames[-1].line or "")
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "no chained error"


def test_an_error_of_adapt_inside_map_tasks_keeps_the_users_call() -> None:
    def task(p: Any, x: torch.Tensor) -> torch.Tensor:
        fast = fparams.adapt(lambda q, x: (q["w"] * x).sum(), p, x, lr=0.1, steps=-1)
        return fast["w"].sum()

    with pytest.raises(ValueError, match=r"^fparams\.adapt: `steps` must be an int >= 0") as info:
        fparams.map_tasks(task, strategy="loop")(
            {"w": torch.ones(2)}, torch.ones(3, 2)
        )
    frames = _frames(info.value)
    assert [f.name for f in frames if f.filename.startswith(INTERNAL)] == ["call"]
    assert frames[-1].name == "task" and "fparams.adapt(" in (frames[-1].line or "")


def test_other_errors_keep_their_full_traceback() -> None:
    def task(p: Any, x: torch.Tensor) -> torch.Tensor:
        return p["w"] @ x  # a shape error: torch's, not fparams'

    with pytest.raises(RuntimeError) as info:
        fparams.map_tasks(task, strategy="loop")({"w": torch.ones(3)}, torch.ones(2, 4))
    assert any(f.filename.startswith(INTERNAL[0]) and f.name == "_loop" for f in _frames(info.value))


def test_full_tracebacks_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def inner() -> None:
        raise FparamsValueError("bad")

    monkeypatch.setenv("FPARAMS_FULL_TRACEBACKS", "1")
    with pytest.raises(ValueError, match="^fparams.x: bad$") as info:
        public("x")(inner)()
    assert any(f.filename.startswith(INTERNAL[0]) for f in _frames(info.value))  # public's frame kept
    monkeypatch.delenv("FPARAMS_FULL_TRACEBACKS")
    wrapped = public("x")(inner)
    assert wrapped is not inner and wrapped.__name__ == "inner"
    with pytest.raises(ValueError, match="^fparams.x: bad$") as info:
        wrapped()
    # inner() lives in tests/, not in fparams or torch: it stays, and ends the traceback
    assert [f.name for f in _frames(info.value)][-1] == "inner"


def test_a_warning_torch_raises_under_exact_norms_does_not_blame_fparams() -> None:
    # vmap's fallback warning for an op without a batching rule, raised in C++: it is
    # reported at the innermost Python frame, which is the one running the op.
    def op(x: torch.Tensor) -> torch.Tensor:
        return torch._weight_norm(x, torch.ones(3, 1), 0)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fparams.map_tasks(lambda p, x: op(x), strategy="vmap")({}, torch.ones(2, 3, 4))
    record = [w for w in record if "performance drop" in str(w.message)]
    if not record:
        pytest.skip("this torch has a batching rule for _weight_norm: no fallback warning")
    for w in record:
        assert not w.filename.startswith(INTERNAL[0]), (w.filename, w.lineno)
        assert w.filename == "<torch op, run under fparams.exact_norms>"
