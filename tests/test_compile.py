"""torch.compile of the meta-step, and fparams.compile's fallback to eager."""

from __future__ import annotations

import re
import warnings
from typing import Any, Dict, List

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import (
    assert_dicts_close,
    grads_wrt,
    leaves,
    ref_adapt,
    task_data,
    task_slice,
)


def _params() -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"w1": (1, 4), "b1": (4,), "w2": (4, 1), "b2": (1,)}
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def mlp_loss(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """A 1-4-1 tanh MLP, written as a function so that dynamo traces it quickly."""
    return (torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y).pow(2).mean()


def maml_task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
    return mlp_loss(fparams.adapt(mlp_loss, p, xs, ys, lr=0.1), xq, yq)


@pytest.mark.slow
def test_compiled_second_order_meta_step_matches_eager() -> None:
    torch._dynamo.reset()
    params = _params()
    data = task_data(3, shots=5, features=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fparams.CompileFallbackWarning)  # a fallback would hide the test
        step = fparams.meta_value_and_grad(maml_task, compile=True)
        value, grads = step(params, *data)
        data2 = task_data(3, shots=5, features=1, seed=1)
        value2, grads2 = step(params, *data2)  # same shapes: the compiled graph again
    eager = fparams.meta_value_and_grad(maml_task)
    for v, g, d in [(value, grads, data), (value2, grads2, data2)]:
        ev, eg = eager(params, *d)
        torch.testing.assert_close(v, ev, rtol=1e-12, atol=1e-14)
        assert_dicts_close(g, eg, rtol=1e-12, atol=1e-14)
        # and the second-order reference, by hand
        ref = leaves(params)
        losses = [
            mlp_loss(ref_adapt(mlp_loss, ref, *task_slice(d, i)[:2], lr=0.1), *task_slice(d, i)[2:])
            for i in range(3)
        ]
        want = torch.stack(losses).mean()
        assert_dicts_close(g, grads_wrt(want, ref), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_loop_strategy_compiles_one_task_once() -> None:
    # The loop compiles one task's step and calls it per task: one graph, not one per task.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    params = _params()
    data = task_data(4, shots=5, features=1)

    def with_aux(p: Dict[str, Tensor], *task: Tensor) -> Any:
        loss = maml_task(p, *task)
        return loss, loss.detach() * 2

    with warnings.catch_warnings():
        warnings.simplefilter("error", fparams.CompileFallbackWarning)
        step = fparams.meta_value_and_grad(with_aux, has_aux=True, strategy="loop", compile=True)
        (value, aux), grads = step(params, *data)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    (ev, eaux), eg = fparams.meta_value_and_grad(with_aux, has_aux=True, strategy="loop")(params, *data)
    torch.testing.assert_close(value, ev, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(aux, eaux, rtol=1e-12, atol=1e-14)
    assert aux.shape == (4,)
    assert_dicts_close(grads, eg, rtol=1e-12, atol=1e-14)


# -- the fallback ----------------------------------------------------------------------


def _dynamo_error(text: str) -> Exception:
    import torch._dynamo.exc

    return torch._dynamo.exc.InternalTorchDynamoError(text)


def _failing_compile(calls: List[Any]) -> Any:
    def fake_compile(fn: Any, **kwargs: Any) -> Any:
        def compiled(*args: Any, **kw: Any) -> Any:
            calls.append(kwargs)
            raise _dynamo_error("backend exploded\nsecond line")

        return compiled

    return fake_compile


def _counting_compile(calls: List[Any]) -> Any:
    # A "compiled" function that runs fn itself, so fn's own errors come from inside it.
    def fake_compile(fn: Any, **kwargs: Any) -> Any:
        def compiled(*args: Any, **kw: Any) -> Any:
            calls.append(args)
            return fn(*args, **kw)

        return compiled

    return fake_compile


def test_fallback_warns_once_and_returns_eager_results(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[Any] = []
    monkeypatch.setattr(torch, "compile", _failing_compile(calls))

    def double(x: Tensor) -> Tensor:
        return 2 * x

    f = fparams.compile(double, mode="reduce-overhead")
    assert f.__name__ == "double"
    with pytest.warns(fparams.CompileFallbackWarning) as record:
        out = f(torch.ones(2))
    torch.testing.assert_close(out, torch.full((2,), 2.0))
    assert len(record) == 1
    message = str(record[0].message)
    assert (
        "torch.compile failed on test_fallback_warns_once_and_returns_eager_results.<locals>.double"
        in message
    )
    assert "InternalTorchDynamoError: backend exploded" in message and "second line" not in message
    assert "running it eagerly from now on" in message
    assert calls == [{"mode": "reduce-overhead"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(f(torch.ones(3)), torch.full((3,), 2.0))
    assert len(calls) == 1, "after a failure the compiled function is not tried again"


def test_meta_value_and_grad_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[Any] = []
    monkeypatch.setattr(torch, "compile", _failing_compile(calls))
    params = _params()
    data = task_data(3, shots=5, features=1)
    with pytest.warns(fparams.CompileFallbackWarning, match=r"fparams\.compile: torch\.compile failed on"):
        value, grads = fparams.meta_value_and_grad(maml_task, compile=True)(params, *data)
    want_value, want_grads = fparams.meta_value_and_grad(maml_task)(params, *data)
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    assert_dicts_close(grads, want_grads, rtol=0, atol=0)
    assert len(calls) == 1


def test_a_real_dynamo_failure_falls_back() -> None:
    # fullgraph=True turns the graph break below into an error inside torch.compile
    def breaks(x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x - 1

    torch._dynamo.reset()
    f = fparams.compile(breaks, fullgraph=True)
    with pytest.warns(fparams.CompileFallbackWarning, match=r"torch\.compile failed on .*breaks"):
        out = f(torch.ones(2))
    torch.testing.assert_close(out, torch.full((2,), 2.0))
    torch.testing.assert_close(f(-torch.ones(2)), torch.full((2,), -2.0))


def test_errors_of_the_function_itself_surface_and_compilation_stays_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: List[Any] = []
    monkeypatch.setattr(torch, "compile", _counting_compile(calls))

    def picky(x: Tensor) -> Tensor:
        if x.numel() == 3:
            raise ValueError("user error")
        return x * 2

    f = fparams.compile(picky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CompileFallbackWarning
        with pytest.raises(ValueError, match="^user error$"):
            f(torch.ones(3))
        torch.testing.assert_close(f(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 2, "the call after the user's error still goes through torch.compile"


def test_a_compile_failure_that_eager_repeats_is_the_inputs_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tracing failure caused by the inputs: eager fn fails too, and its error surfaces.
    calls: List[Any] = []

    def fake_compile(fn: Any, **kwargs: Any) -> Any:
        def compiled(x: Tensor) -> Any:
            calls.append(x)
            if x.numel() == 3:
                raise _dynamo_error("RuntimeError when making fake tensor call")
            return fn(x)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)

    def needs_two(x: Tensor) -> Tensor:
        return x @ torch.ones(2)

    f = fparams.compile(needs_two)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError) as info:
            f(torch.ones(3))
        assert not fparams._torch_compat.is_compile_error(info.value), "eager's own error surfaces"
        torch.testing.assert_close(f(torch.ones(2)), torch.tensor(2.0))
    assert len(calls) == 2


def test_a_user_error_under_real_dynamo_leaves_compilation_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bug this guards against: a ValueError raised by the function itself
    # switched compilation off for good, with a misleading warning.
    torch._dynamo.reset()
    real_compile, calls = torch.compile, []

    def spy(fn: Any, **kwargs: Any) -> Any:
        compiled = real_compile(fn, **kwargs)

        def call(*args: Any) -> Any:
            calls.append(args)
            return compiled(*args)

        return call

    monkeypatch.setattr(torch, "compile", spy)

    def g(x: Tensor) -> Tensor:
        if x.shape[0] == 3:
            raise ValueError("user error")
        return x * 2

    f = fparams.compile(g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fparams.CompileFallbackWarning)
        torch.testing.assert_close(f(torch.ones(2)), torch.full((2,), 2.0))
        with pytest.raises(ValueError, match="^user error$"):
            f(torch.ones(3))
        torch.testing.assert_close(f(torch.ones(4)), torch.full((4,), 2.0))
    assert len(calls) == 3, "every call, the one after the user's error too, went through torch.compile"


def test_compile_error_classification() -> None:
    import torch._dynamo.exc

    assert fparams._torch_compat.is_compile_error(_dynamo_error("x"))
    assert fparams._torch_compat.is_compile_error(torch._dynamo.exc.Unsupported("x"))
    assert not fparams._torch_compat.is_compile_error(ValueError("x"))
    assert not fparams._torch_compat.is_compile_error(RuntimeError("shape mismatch"))


def test_the_fallback_warning_names_the_callers_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted, not a fixed stacklevel: through meta_value_and_grad's wrappers too.
    monkeypatch.setattr(torch, "compile", _failing_compile([]))
    params = _params()
    data = task_data(3, shots=5, features=1)
    with pytest.warns(fparams.CompileFallbackWarning) as record:
        fparams.meta_value_and_grad(maml_task, compile=True)(params, *data)
    with pytest.warns(fparams.CompileFallbackWarning) as direct:
        fparams.compile(lambda x: x * 2)(torch.ones(1))
    for w in [*record, *direct]:
        assert w.filename == __file__, w.filename


# -- never run user code twice (issue 16 item 4) -----------------------------------------------


def _fails_on_second_graph() -> Any:
    # a backend that compiles the first graph and fails on the next one
    graphs: List[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        if len(graphs) == 2:
            raise RuntimeError("the second graph does not compile")
        return gm.forward

    return backend


def test_a_failure_after_part_of_the_function_ran_is_not_rerun_eagerly() -> None:
    # Before: the eager fallback ran the whole function again, so the BatchNorm's
    # counter (or an opt.step() inside) moved twice.
    torch._dynamo.reset()
    bn = nn.BatchNorm1d(2)

    def step(x: Tensor) -> Tensor:
        y = bn(x).sin()  # the first graph: runs, and counts the batch
        torch._dynamo.graph_break()
        return y.cos()  # the second graph: fails to compile

    f = fparams.compile(step, backend=_fails_on_second_graph())
    with pytest.raises(fparams.FparamsRuntimeError, match=re.escape(
        "fparams.compile: torch.compile failed on test_a_failure_after_part_of_the_function_ran_is_not_"
        "rerun_eagerly.<locals>.step after part of it had run ("
    )) as info:
        f(torch.randn(4, 2))
    assert "It is not run again eagerly, since that would repeat what already ran" in str(info.value)
    assert int(bn.num_batches_tracked) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls run eagerly, quietly
        f(torch.randn(4, 2))
    assert int(bn.num_batches_tracked) == 2


def test_a_failure_before_anything_ran_still_falls_back() -> None:
    torch._dynamo.reset()
    calls: List[int] = []

    def step(x: Tensor) -> Tensor:
        calls.append(1)
        return x.sin()

    def backend(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("nothing compiles")

    f = fparams.compile(step, backend=backend)
    with pytest.warns(fparams.CompileFallbackWarning, match="running it eagerly from now on"):
        torch.testing.assert_close(f(torch.zeros(2)), torch.zeros(2))
    assert len(calls) == 1  # dynamo's trace ran nothing: the eager call is the only run


def test_compile_needs_a_callable() -> None:
    with pytest.raises(fparams.FparamsTypeError, match=re.escape(
        "fparams.compile: `fn` must be a callable to compile; got int."
    )):
        fparams.compile(3)  # type: ignore[type-var]
