"""map_tasks / meta_value_and_grad: what "auto" learns (kept on the callable), which errors may
move it to the loop, torch's slow vmap fallback, and batch statistics in the per-task loop."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import assert_dicts_close, leaves

TOL = dict(rtol=1e-10, atol=1e-12)
Params = Dict[str, Tensor]


def _mse_task(arch: Callable[..., Tensor], steps: int = 1) -> Callable[..., Tensor]:
    def mse(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    def task(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, x, y, lr=0.1, steps=steps), x, y)

    return task


def _reference(
    task: Callable[..., Tensor], params: Params, per_task: List[Tuple[Tensor, ...]]
) -> Tuple[Tensor, Params]:
    """The losses of a plain per-task loop and the gradient of their sum (plain autograd)."""
    ref = leaves(params)
    losses = torch.stack([task(ref, *args) for args in per_task])
    return losses, dict(zip(ref, torch.autograd.grad(losses.sum(), list(ref.values()))))


# -- issue 16 item 5: a user's own error never demotes ------------------------------------------


def test_a_users_broadcast_error_reaches_them_unchanged_and_never_demotes() -> None:
    torch.manual_seed(0)
    arch, params, _ = fparams.split(nn.Linear(3, 1).double())

    def task(p: Params, x: Tensor, y: Tensor) -> Tensor:
        out = arch(p, x)
        out.add_(y)  # the user's in-place op: y must have out's shape
        return out.pow(2).mean()

    x = torch.randn(4, 5, 3, dtype=torch.float64)
    mapped = fparams.map_tasks(task)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fparams.VmapFallbackWarning)  # no demotion, no warning
        with pytest.raises(RuntimeError, match=r"doesn't match the broadcast shape") as err:
            mapped(params, x, torch.randn(4, 5, 3, dtype=torch.float64))  # wrong: (5, 3), not (5, 1)
        assert not isinstance(err.value, fparams.FparamsError)  # torch's own error, unchanged
        assert mapped.demoted is None
        y = torch.randn(4, 5, 1, dtype=torch.float64)
        got = mapped(leaves(params), x, y)  # the correct call still runs vmap
    assert mapped.demoted is None
    want, _ = _reference(task, params, [(x[i], y[i]) for i in range(4)])
    torch.testing.assert_close(got, want, **TOL)


# -- issue 17 item 2: "auto" never takes torch's slow per-example fallback -------------------------


class Renormed(nn.Module):
    """torch.renorm has no batching rule in torch 2.13: vmap runs it per example (slowly)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.renorm(torch.tanh(self.a(x)), 2, 0, 1.0))


def _renorm_case() -> Tuple[Callable[..., Tensor], Params, List[Tensor]]:
    torch.manual_seed(0)
    arch, params, _ = fparams.split(Renormed().double())
    g = torch.Generator().manual_seed(1)
    data = [
        torch.randn(4, 5, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 5, 1, generator=g, dtype=torch.float64),
    ]
    return _mse_task(arch), params, data


def test_auto_takes_the_loop_where_vmap_would_run_torchs_slow_fallback() -> None:
    task, params, data = _renorm_case()
    mapped = fparams.map_tasks(task)
    p = leaves(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = mapped(p, *data)
    ours = [w for w in caught if issubclass(w.category, fparams.VmapFallbackWarning)]
    assert len(ours) == 1 and "aten::renorm" in str(ours[0].message)
    assert "runs task with the loop" in str(ours[0].message)
    assert not any("performance drop" in str(w.message) for w in caught)  # torch's slow path never ran
    assert mapped.demoted is not None and "aten::renorm" in mapped.demoted
    want, want_grads = _reference(task, params, [(data[0][i], data[1][i]) for i in range(4)])
    torch.testing.assert_close(got, want, **TOL)
    assert_dicts_close(dict(zip(p, torch.autograd.grad(got.sum(), list(p.values())))), want_grads, **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: this callable loops from now on
        mapped(params, *data)


def test_meta_value_and_grad_auto_avoids_the_slow_fallback_too() -> None:
    task, params, data = _renorm_case()
    step = fparams.meta_value_and_grad(task)
    with pytest.warns(fparams.VmapFallbackWarning, match=r"aten::renorm"):
        value, grads = step(fparams.detach(params), *data)
    assert step.demoted is not None
    want, want_grads = _reference(task, params, [(data[0][i], data[1][i]) for i in range(4)])
    torch.testing.assert_close(value, want.mean(), **TOL)
    assert_dicts_close(grads, {k: g / 4 for k, g in want_grads.items()}, **TOL)


@pytest.mark.parametrize("kw", [{"strategy": "vmap"}, {"strategy": "chunked", "chunk_size": 2}])
def test_explicit_vmap_runs_the_slow_fallback_but_names_the_op_and_the_loop(kw: Dict[str, Any]) -> None:
    task, params, data = _renorm_case()
    mapped = fparams.map_tasks(task, **kw)
    with pytest.warns(
        fparams.VmapFallbackWarning, match=r"aten::renorm through torch's slow .* strategy='loop'"
    ):
        got = mapped(params, *data)
    assert mapped.demoted is None  # an explicit strategy is never changed
    want, _ = _reference(task, params, [(data[0][i], data[1][i]) for i in range(4)])
    torch.testing.assert_close(got, want, **TOL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped(params, *data)
    assert not [w for w in caught if issubclass(w.category, fparams.VmapFallbackWarning)]  # said once


def test_auto_with_chunks_avoids_the_slow_fallback_too() -> None:
    task, params, data = _renorm_case()
    mapped = fparams.map_tasks(task, chunk_size=2)
    with pytest.warns(fparams.VmapFallbackWarning, match=r"aten::renorm"):
        got = mapped(params, *data)
    assert mapped.demoted is not None
    want, _ = _reference(task, params, [(data[0][i], data[1][i]) for i in range(4)])
    torch.testing.assert_close(got, want, **TOL)


# -- issue 16 item 3: batch_stats and the shared-statistics guard hold for every task -------------


class Guarded(nn.Module):
    """The common guard: BatchNorm only where the batch has more than one row."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        h = self.bn(h) if h.shape[0] > 1 else h
        return self.b(torch.tanh(h))


def _batch_stats_twin(net: Guarded) -> Guarded:
    """The same model, normalizing with batch statistics only (no running statistics at all)."""
    twin = copy.deepcopy(net)
    twin.bn.track_running_stats = False
    twin.bn.running_mean = twin.bn.running_var = twin.bn.num_batches_tracked = None
    return twin.train()


def _ragged(shots: Tuple[int, ...] = (1, 5, 5)) -> List[Tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(n, 3, generator=g, dtype=torch.float64),
            torch.randn(n, 1, generator=g, dtype=torch.float64),
        )
        for n in shots
    ]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_stats_hold_for_tasks_after_one_that_ran_no_normalization(train: bool) -> None:
    torch.manual_seed(0)
    net = Guarded().double().train(train)
    twin = _batch_stats_twin(net)
    arch, params, buffers = fparams.split(net)
    before = {k: v.clone() for k, v in buffers.items()}
    tasks = _ragged()
    got = fparams.map_tasks(_mse_task(arch), batch_stats=True)(leaves(params), tasks=tasks)
    ref_arch, ref_params, _ = fparams.split(twin)
    want, want_grads = _reference(_mse_task(ref_arch), ref_params, tasks)
    torch.testing.assert_close(got, want, **TOL)
    assert_dicts_close(buffers, before, rtol=0, atol=0)  # batch_stats: running statistics untouched
    step = fparams.meta_value_and_grad(_mse_task(arch), batch_stats=True)
    value, grads = step(fparams.detach(params), tasks=tasks)
    torch.testing.assert_close(value, want.mean(), **TOL)
    assert_dicts_close(grads, {k: g / 3 for k, g in want_grads.items()}, **TOL)
    assert_dicts_close(buffers, before, rtol=0, atol=0)


def test_the_loop_keeps_batch_stats_after_a_task_without_normalization() -> None:
    """Stacked tasks, strategy='loop', a data-dependent guard that skips BatchNorm in task 0."""
    torch.manual_seed(0)
    net = Guarded().double().train()
    twin = _batch_stats_twin(net)
    arch, params, buffers = fparams.split(net)
    before = {k: v.clone() for k, v in buffers.items()}
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    ys = torch.randn(3, 5, 1, generator=g, dtype=torch.float64)

    def make(a: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def task(p: Params, x: Tensor, y: Tensor, skip: Tensor) -> Tensor:
            return _mse_task(a)(p, x[:1] if bool(skip) else x, y[:1] if bool(skip) else y)

        return task

    skip = torch.tensor([True, False, False])
    got = fparams.map_tasks(make(arch), strategy="loop", batch_stats=True)(params, xs, ys, skip)
    ref_arch, ref_params, _ = fparams.split(twin)
    want, _ = _reference(make(ref_arch), ref_params, [(xs[i], ys[i], skip[i]) for i in range(3)])
    torch.testing.assert_close(got, want, **TOL)
    assert_dicts_close(buffers, before, rtol=0, atol=0)


def test_the_shared_statistics_guard_holds_after_a_task_without_normalization() -> None:
    torch.manual_seed(0)
    arch, params, buffers = fparams.split(Guarded().double().train())
    before = {k: v.clone() for k, v in buffers.items()}
    message = r"updates running statistics that are shared across tasks"
    with pytest.raises(ValueError, match=message):
        fparams.map_tasks(_mse_task(arch))(params, tasks=_ragged())
    assert_dicts_close(buffers, before, rtol=0, atol=0)  # rolled back, as the loop does
    with pytest.raises(ValueError, match=message):
        fparams.meta_value_and_grad(_mse_task(arch))(fparams.detach(params), tasks=_ragged())
    assert_dicts_close(buffers, before, rtol=0, atol=0)


# -- the callable: inspect and reset -------------------------------------------------------------


def test_the_callables_show_their_strategy_and_what_auto_learned() -> None:
    fn = lambda p, x: (p["w"] * x).sum()  # noqa: E731
    mapped = fparams.map_tasks(fn, strategy="loop")
    assert (mapped.strategy, mapped.demoted) == ("loop", None)
    assert repr(mapped) == "map_tasks(<lambda>, strategy='loop', demoted=None)"
    for compile in (False, True):
        step = fparams.meta_value_and_grad(fn, compile=compile)
        assert (step.strategy, step.demoted) == ("auto", None)  # type: ignore[attr-defined]
        step.reset()  # type: ignore[attr-defined]
    mapped.reset()
    assert not hasattr(fparams._tasks, "_VMAP_FAILED") and not hasattr(fparams._tasks, "_VMAP_RAN")


def test_no_module_level_table_remembers_functions() -> None:
    import fparams._tasks.fallback as fallback
    import fparams._tasks.map as map_mod
    import fparams._tasks.plan as plan_mod

    for module in (fallback, map_mod, plan_mod):
        tables = [n for n, v in vars(module).items() if isinstance(v, (dict, set)) and not n.startswith("__")]
        assert tables == [], (module.__name__, tables)


def test_vmap_sizes_cover_every_chunk() -> None:
    from fparams._tasks.plan import vmap_sizes

    assert vmap_sizes("vmap", 5, None) == (5,)
    assert vmap_sizes("chunked", 5, 2) == (2, 1)
    assert vmap_sizes("chunked", 4, 2) == (2,)
    assert vmap_sizes("chunked", 3, 8) == (3, 3)


# -- "auto" from the shapes: compute-bound models loop (issue 17 item 2) ------------------------


@pytest.mark.parametrize(
    "out, randomness, calls",
    [(1024, "error", 3), (512, "error", 1), (1024, "different", 1)],
    ids=["1.05M-params-loop", "0.52M-params-vmap", "random-draws-stay-vmap"],
)
def test_auto_loops_over_the_tasks_of_a_model_with_a_million_parameters(
    out: int, randomness: str, calls: int
) -> None:
    # ConvNeXt with 2M params ran 2.2x slower under vmap than in the loop, on tiny tasks
    # (benchmarks/bench_convnext.py), and "auto" chose vmap from the data's size alone.
    arch, params, _ = fparams.split(nn.Linear(1024, out))
    seen: List[int] = []

    def task(p: Params, x: Tensor) -> Tensor:
        seen.append(1)  # once under vmap, once per task in the loop
        return arch(p, x).sum()

    fparams.map_tasks(task, randomness=randomness)(params, torch.randn(3, 2, 1024))  # type: ignore[arg-type]
    assert len(seen) == calls


def test_choose_strategy_thresholds() -> None:
    from fparams._tasks import LOOP_FROM_NUMEL, LOOP_FROM_PARAMS, choose_strategy

    assert choose_strategy(8, LOOP_FROM_NUMEL - 1, LOOP_FROM_PARAMS - 1) == "vmap"
    assert choose_strategy(8, LOOP_FROM_NUMEL, 0) == "loop"
    assert choose_strategy(8, 0, LOOP_FROM_PARAMS) == "loop"
    assert choose_strategy(1, 0, 0) == "loop"
