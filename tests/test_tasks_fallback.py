"""map_tasks where vmap cannot run: the loop instead, clear errors; tasks of different sizes."""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import RecurrentNet, assert_dicts_close, leaves

#: How the fallback names a GRU's op: torch 2.3 fails on reading ``.data`` before its batching rule.
GRU_OP = r"vmap cannot run (aten::gru\.input|an op that reads \.data \(a recurrent layer's fused kernel\))"

TOL = dict(rtol=1e-10, atol=1e-12)


def _seq_data(n: int = 3, seed: int = 0) -> List[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, 6, 2, 4, generator=g, dtype=torch.float64),  # tasks, time, batch, features
        torch.randn(n, 2, 2, generator=g, dtype=torch.float64),
    ]


def _maml(arch: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    def task(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, x, y, lr=0.1, steps=2), x, y)

    return task


def _loop_reference(task: Callable[..., Tensor], params: Dict[str, Tensor], data: List[Tensor]) -> Tensor:
    return torch.stack([task(params, *(d[i] for d in data)) for i in range(data[0].size(0))])


def _check_equal_to_loop(
    task: Callable[..., Tensor], params: Dict[str, Tensor], data: List[Tensor], mapped: Any = None, **kw: Any
) -> None:
    p, ref = leaves(params), leaves(params)
    got = (mapped or fparams.map_tasks(task, **kw))(p, *data)
    want = _loop_reference(task, ref, data)
    torch.testing.assert_close(got, want, **TOL)
    assert_dicts_close(
        dict(zip(p, torch.autograd.grad(got.sum(), list(p.values())))),
        dict(zip(ref, torch.autograd.grad(want.sum(), list(ref.values())))),
        **TOL,
    )


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_auto_loops_over_recurrent_models_from_the_start(cell: type) -> None:
    torch.manual_seed(0)
    arch, params, _ = fparams.split(RecurrentNet(cell, num_layers=1).double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided up front: no fallback, no warning
        _check_equal_to_loop(_maml(arch), params, _seq_data())


def test_auto_loops_over_spectral_norm_in_train_mode() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.utils.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 1)).double()
    twin = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    data = [
        torch.randn(3, 5, 3, generator=g, dtype=torch.float64),
        torch.randn(3, 5, 1, generator=g, dtype=torch.float64),
    ]
    arch, params, _ = fparams.split(net)
    got = fparams.map_tasks(_maml(arch))(params, *data)
    arch2, params2, _ = fparams.split(twin)
    want = fparams.map_tasks(_maml(arch2), strategy="loop")(params2, *data)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(
        net[0].weight_u, twin[0].weight_u, **TOL
    )  # the power iteration ran as in the loop


def test_auto_falls_back_over_parametrized_spectral_norm() -> None:
    """torch.nn.utils.parametrizations.spectral_norm: found by the fallback, with the loop's buffers."""
    torch.manual_seed(0)
    sn = nn.utils.parametrizations.spectral_norm
    net = nn.Sequential(sn(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 1)).double()
    twin = copy.deepcopy(net)
    g = torch.Generator().manual_seed(1)
    data = [
        torch.randn(3, 5, 3, generator=g, dtype=torch.float64),
        torch.randn(3, 5, 1, generator=g, dtype=torch.float64),
    ]
    arch, params, _ = fparams.split(net)
    with pytest.warns(fparams.VmapFallbackWarning, match=r"aten::div.out"):
        got = fparams.map_tasks(_maml(arch))(params, *data)
    arch2, params2, _ = fparams.split(twin)
    want = fparams.map_tasks(_maml(arch2), strategy="loop")(params2, *data)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(net.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, **TOL)


def _renamed_gru() -> Tuple[Callable[..., Tensor], Dict[str, Tensor]]:
    """A GRU whose parameters the caller holds under other names: not recognisable up front."""
    torch.manual_seed(0)
    net = RecurrentNet(nn.GRU, num_layers=1).double()
    arch, params, _ = fparams.split(net)
    names = {f"p{i}": k for i, k in enumerate(params)}

    def run(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        return arch({k: p[short] for short, k in names.items()}, x)

    return run, {short: params[k] for short, k in names.items()}


def test_auto_falls_back_to_the_loop_once_and_the_callable_remembers() -> None:
    arch, params = _renamed_gru()
    task = _maml(arch)
    data = _seq_data()
    mapped = fparams.map_tasks(task)
    assert mapped.strategy == "auto" and mapped.demoted is None
    with pytest.warns(fparams.VmapFallbackWarning, match=GRU_OP + r", so strategy='auto' runs task"):
        _check_equal_to_loop(task, params, data, mapped=mapped)
    assert mapped.demoted is not None and re.fullmatch(GRU_OP[len("vmap cannot run ") :], mapped.demoted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered by this callable: straight to the loop
        _check_equal_to_loop(task, params, data, mapped=mapped)
    with pytest.warns(fparams.VmapFallbackWarning):  # nothing module-level: a new callable learns anew
        fparams.map_tasks(task)(params, *data)
    mapped.reset()
    assert mapped.demoted is None
    with pytest.warns(fparams.VmapFallbackWarning):  # reset: vmap is tried again
        mapped(params, *data)
    step = fparams.meta_value_and_grad(task)
    with pytest.warns(fparams.VmapFallbackWarning):
        step(fparams.detach(params), *data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(fparams.detach(params), *data)
    assert step.demoted == mapped.demoted


def test_the_fallback_warning_points_at_the_callers_line() -> None:
    arch, params = _renamed_gru()
    with pytest.warns(fparams.VmapFallbackWarning) as record:
        fparams.map_tasks(_maml(arch))(params, *_seq_data())
    assert record[0].filename == __file__


def test_meta_value_and_grad_falls_back_and_explains_too() -> None:
    arch, params = _renamed_gru()
    data = _seq_data()
    task = _maml(arch)
    with pytest.warns(fparams.VmapFallbackWarning, match=r"vmap cannot run"):  # the op depends on the route
        value, grads = fparams.meta_value_and_grad(task)(fparams.detach(params), *data)
    want_value, want_grads = fparams.meta_value_and_grad(task, strategy="loop")(fparams.detach(params), *data)
    torch.testing.assert_close(value, want_value, **TOL)
    assert_dicts_close(grads, want_grads, **TOL)
    with pytest.raises(RuntimeError, match=r"vmap cannot run .* strategy='vmap' fails .* strategy='loop'"):
        fparams.meta_value_and_grad(task, strategy="vmap")(fparams.detach(params), *data)


def test_fallback_under_an_outer_torch_func_grad() -> None:
    arch, params = _renamed_gru()
    task, data = _maml(arch), _seq_data()
    with pytest.warns(fparams.VmapFallbackWarning):
        got = torch.func.grad(lambda p: fparams.map_tasks(task)(p, *data).sum())(params)
    want = torch.func.grad(lambda p: fparams.map_tasks(task, strategy="loop")(p, *data).sum())(params)
    assert_dicts_close(got, want, **TOL)


def test_explicit_vmap_names_the_op_and_the_loop() -> None:
    arch, params = _renamed_gru()
    for strategy, kw in (("vmap", {}), ("chunked", {"chunk_size": 2})):
        with pytest.raises(
            RuntimeError,
            match=GRU_OP + rf", so strategy='{strategy}' fails .* strategy='loop'",
        ):
            fparams.map_tasks(_maml(arch), strategy=strategy, **kw)(params, *_seq_data())


def test_data_dependent_control_flow_falls_back() -> None:
    torch.manual_seed(0)
    arch, params, _ = fparams.split(nn.Linear(4, 1).double())

    def task(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = arch(p, x)
        return (out - y).pow(2).mean() if float(x.sum()) > 0 else out.abs().mean()

    g = torch.Generator().manual_seed(2)
    data = [
        torch.randn(4, 5, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 5, 1, generator=g, dtype=torch.float64),
    ]
    with pytest.warns(fparams.VmapFallbackWarning, match=r"data-dependent control flow"):
        _check_equal_to_loop(task, params, data)


def test_fallback_restores_task_arguments_that_vmap_changed() -> None:
    """vmap updates per-task BatchNorm statistics before the GRU fails: the loop starts from the old ones."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).double()
    rnn_arch, rnn_params = _renamed_gru()
    bn_arch, bn_params, bn_buffers = fparams.split(bn)
    params = {**{f"bn.{k}": v for k, v in bn_params.items()}, **rnn_params}

    def task(p: Dict[str, Tensor], x: Tensor, y: Tensor, b: Dict[str, Tensor]) -> Tensor:
        t, n, f = x.shape
        h = bn_arch({k: p[f"bn.{k}"] for k in bn_params}, x.reshape(t * n, f), buffers=b).reshape(t, n, f)
        return (rnn_arch({k: v for k, v in p.items() if not k.startswith("bn.")}, h) - y).pow(2).mean()

    data = _seq_data()
    ours, ref = fparams.stack_tasks(bn_buffers, 3), fparams.stack_tasks(bn_buffers, 3)
    with pytest.warns(fparams.VmapFallbackWarning):
        got = fparams.map_tasks(task)(params, *data, ours)
    want = fparams.map_tasks(task, strategy="loop")(params, *data, ref)
    torch.testing.assert_close(got, want, **TOL)
    assert_dicts_close(ours, ref, rtol=0, atol=0)  # updated once, as by the loop alone
    assert int(ours["num_batches_tracked"][0]) == 1


def test_a_later_failure_falls_back_only_where_nothing_changed() -> None:
    torch.manual_seed(0)
    bn_arch, bn_params, bn_buffers = fparams.split(nn.BatchNorm1d(4).double())
    rnn_arch, rnn_params = _renamed_gru()
    params = {**{f"bn.{k}": v for k, v in bn_params.items()}, **rnn_params}
    mode = {"gru": False, "bn": True}

    def task(p: Dict[str, Tensor], x: Tensor, y: Tensor, b: Dict[str, Tensor]) -> Tensor:
        t, n, f = x.shape
        if mode["bn"]:
            x = bn_arch({k: p[f"bn.{k}"] for k in bn_params}, x.reshape(t * n, f), buffers=b).reshape(t, n, f)
        if not mode["gru"]:
            return x.pow(2).mean()
        return (rnn_arch({k: v for k, v in p.items() if not k.startswith("bn.")}, x) - y).pow(2).mean()

    data = _seq_data()
    mapped = fparams.map_tasks(task)
    mapped(params, *data, fparams.stack_tasks(bn_buffers, 3))  # vmap runs it
    mode["gru"] = True
    with pytest.raises(
        RuntimeError, match=GRU_OP + r", and before it failed it had changed"
    ):
        mapped(params, *data, fparams.stack_tasks(bn_buffers, 3))
    assert mapped.demoted is None  # refused, not demoted
    mode["bn"] = False  # nothing changes before the GRU now: the loop takes over
    with pytest.warns(fparams.VmapFallbackWarning):
        got = mapped(params, *data, fparams.stack_tasks(bn_buffers, 3))
    want = fparams.map_tasks(task, strategy="loop")(params, *data, fparams.stack_tasks(bn_buffers, 3))
    torch.testing.assert_close(got, want, **TOL)


def test_random_ops_name_the_randomness_options() -> None:
    torch.manual_seed(0)
    arch, params, _ = fparams.split(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double())

    def task(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        return arch(p, x).mean()

    x = torch.randn(3, 5, 4, dtype=torch.float64)
    message = (
        r"random op .* randomness='error' .* map_tasks\(\.\.\., randomness='different'\) "
        r".* randomness='same'\).*strategy='loop' runs the tasks one by one"
    )
    for kw in ({}, {"strategy": "vmap"}):
        with pytest.raises(ValueError, match=message):
            fparams.map_tasks(task, **kw)(params, x)
    with pytest.raises(ValueError, match=message):
        fparams.meta_value_and_grad(task)(params, x)


# -- tasks of different sizes ----------------------------------------------------------


def _ragged(seed: int = 0) -> List[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return [(r(n, 3), r(n, 1), r(n + 2, 3), r(n + 2, 1)) for n in (1, 5, 3)]


def _sine_setup() -> Tuple[fparams.Architecture, Dict[str, Tensor]]:
    torch.manual_seed(0)
    arch, params, _ = fparams.split(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double())
    return arch, params


def test_a_list_of_per_task_tuples_equals_the_per_task_loop() -> None:
    arch, params = _sine_setup()

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.1, steps=2), xq, yq)

    tasks = _ragged()
    p, ref = leaves(params), leaves(params)
    got = fparams.map_tasks(task)(p, tasks=tasks)
    want = torch.stack([task(ref, *t) for t in tasks])
    torch.testing.assert_close(got, want, **TOL)
    g_got = torch.autograd.grad(got.mean(), list(p.values()))
    g_want = torch.autograd.grad(want.mean(), list(ref.values()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **TOL)


def test_padded_tasks_with_a_masked_loss_equal_the_per_task_loop() -> None:
    arch, params = _sine_setup()

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    def masked(p: Dict[str, Tensor], x: Tensor, y: Tensor, m: Tensor) -> Tensor:
        return ((arch(p, x) - y).pow(2).sum(-1) * m).sum() / m.sum()

    def task(
        p: Dict[str, Tensor], xs: Tensor, ys: Tensor, ms: Tensor, xq: Tensor, yq: Tensor, mq: Tensor
    ) -> Tensor:
        return masked(fparams.adapt(masked, p, xs, ys, ms, lr=0.1, steps=2), xq, yq, mq)

    tasks = _ragged()
    xs, ms = fparams.pad_tasks([t[0] for t in tasks])
    ys, _ = fparams.pad_tasks([t[1] for t in tasks], value=7.0)  # any finite value: masked out
    xq, mq = fparams.pad_tasks([t[2] for t in tasks])
    yq, _ = fparams.pad_tasks([t[3] for t in tasks])
    assert ms.sum(1).tolist() == [1, 5, 3] and xs.shape == (3, 5, 3)
    p, ref = leaves(params), leaves(params)
    got = fparams.map_tasks(task, strategy="vmap")(p, xs, ys, ms, xq, yq, mq)

    def plain(q: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, q, xs, ys, lr=0.1, steps=2), xq, yq)

    want = torch.stack([plain(ref, *t) for t in tasks])
    torch.testing.assert_close(got, want, **TOL)
    g_got = torch.autograd.grad(got.mean(), list(p.values()))
    g_want = torch.autograd.grad(want.mean(), list(ref.values()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **TOL)


def test_pad_tasks_values() -> None:
    batch, mask = fparams.pad_tasks(
        [torch.arange(2.0).reshape(2, 1), torch.arange(3.0).reshape(3, 1)], value=-1.0
    )
    assert batch.squeeze(-1).tolist() == [[0.0, 1.0, -1.0], [0.0, 1.0, 2.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_task_list_and_pad_errors() -> None:
    arch, params = _sine_setup()
    f = fparams.map_tasks(lambda p, x: arch(p, x).sum())
    x = torch.randn(2, 3, dtype=torch.float64)
    cases: List[Tuple[Callable[[], Any], type, str]] = [
        (
            lambda: f(params, x, tasks=[(x,)]),
            TypeError,
            r"fparams.map_tasks: pass the tasks either as batches",
        ),
        (lambda: f(params, tasks=(x,)), TypeError, r"`tasks\[0\]` must be a tuple of that task's arguments"),
        (
            lambda: f(params, tasks=x),
            TypeError,
            r"`tasks` must be a list with one tuple of arguments per task",
        ),
        (lambda: f(params, tasks=[]), ValueError, r"`tasks` is empty"),
        (
            lambda: fparams.map_tasks(lambda p, x: x.sum(), strategy="vmap")(params, tasks=[(x,)]),
            ValueError,
            r"runs with the loop, .* got strategy='vmap'",
        ),
        (
            lambda: f(params, [x, torch.randn(3, 3)]),
            ValueError,
            r"disagree on the number of tasks .* tasks=\[\(xs0, ys0\)",
        ),
        (lambda: fparams.pad_tasks(x), TypeError, r"fparams.pad_tasks: `tensors` must be a list"),
        (lambda: fparams.pad_tasks([]), ValueError, r"fparams.pad_tasks: `tensors` is empty"),
        (lambda: fparams.pad_tasks([x, 1.0]), TypeError, r"`tensors\[1\]` is a float, not a tensor"),
        (lambda: fparams.pad_tasks([torch.tensor(1.0)]), ValueError, r"`tensors\[0\]` is 0-dim"),
        (
            lambda: fparams.pad_tasks([x, torch.randn(2, 4, dtype=torch.float64)]),
            ValueError,
            r"differ only in their number of rows .* tensors\[1\]: \(2, 4\)",
        ),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
