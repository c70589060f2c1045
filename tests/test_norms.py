"""exact_norms: decomposed normalization layers equal the native ones, and stay exact under vmap.

The regression test at the bottom shows that raw torch.func (vmap over tasks
of a grad-based inner step) gives wrong second-order meta-gradients through
native batch_norm / layer_norm, while fparams.map_tasks is exact.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import (
    assert_dicts_close,
    autograd_ops,
    finite_diff_grad,
    grads_wrt,
    leaves,
    loss_fn,
    ref_adapt,
    rel_err,
    task_data,
    task_slice,
)

TOL = dict(rtol=1e-10, atol=1e-12)

# name -> (module factory, input shape)
HAS_RMS_NORM = hasattr(torch.nn.functional, "rms_norm")  # torch >= 2.4
NORMS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "bn1d": (lambda: nn.BatchNorm1d(4), (8, 4)),
    "bn1d-3d": (lambda: nn.BatchNorm1d(4, momentum=0.3), (5, 4, 3)),
    "bn1d-momentum-none": (lambda: nn.BatchNorm1d(4, momentum=None), (8, 4)),
    "bn1d-no-affine": (lambda: nn.BatchNorm1d(4, affine=False), (8, 4)),
    "bn1d-untracked": (lambda: nn.BatchNorm1d(4, track_running_stats=False), (8, 4)),
    "bn2d": (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5)),
    "ln": (lambda: nn.LayerNorm(5), (3, 4, 5)),
    "ln-2d-shape": (lambda: nn.LayerNorm((4, 5), eps=1e-3), (3, 4, 5)),
    "ln-no-bias": (lambda: nn.LayerNorm(5, bias=False), (3, 5)),
    "ln-no-affine": (lambda: nn.LayerNorm(5, elementwise_affine=False), (3, 5)),
    "gn": (lambda: nn.GroupNorm(2, 4), (3, 4, 5)),
    "gn-2d-input": (lambda: nn.GroupNorm(2, 6), (3, 6)),
    "gn-4d-no-affine": (lambda: nn.GroupNorm(3, 6, affine=False), (2, 6, 3, 3)),
    "in1d": (lambda: nn.InstanceNorm1d(4), (3, 4, 6)),
    "in1d-tracked": (lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True), (3, 4, 6)),
    "in2d-tracked": (lambda: nn.InstanceNorm2d(3, track_running_stats=True, momentum=0.4), (2, 3, 4, 4)),
}
if HAS_RMS_NORM:
    NORMS["rms"] = (lambda: nn.RMSNorm(5), (3, 5))
    NORMS["rms-eps-2d"] = (lambda: nn.RMSNorm((2, 5), eps=1e-3), (3, 2, 5))


def _randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name == "running_var":
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
            elif name == "running_mean":
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))


def _state(module: nn.Module) -> Dict[str, Tensor]:
    return {k: b.clone() for k, b in module.named_buffers()}


def _pair(name: str) -> Tuple[nn.Module, nn.Module, Tuple[int, ...]]:
    """Two identical float64 copies of the layer ``name`` (randomised), and its input shape."""
    make, shape = NORMS[name]
    torch.manual_seed(0)
    native = make().double()
    _randomise(native)
    return native, copy.deepcopy(native), shape


@pytest.mark.parametrize("name", sorted(NORMS))
def test_decomposition_equals_native(name: str) -> None:
    native, mine, shape = _pair(name)
    g = torch.Generator().manual_seed(4)
    # three train calls (running statistics move), then two eval calls
    for mode in ("train", "train", "train", "eval", "eval"):
        native.train(mode == "train")
        mine.train(mode == "train")
        x = (2 + 3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
        want = native(x)
        with fparams.exact_norms(always=True):  # decompose although no vmap runs
            got = mine(x)
        assert not any("Norm" in op for op in autograd_ops(got)), f"native kernel ran: {autograd_ops(got)}"
        torch.testing.assert_close(got, want, **TOL)
        assert_dicts_close(_state(mine), _state(native), **TOL)
        # first and second derivatives wrt the input and the affine parameters
        wrt = {"x": x, **dict(mine.named_parameters())}
        ref_wrt = {"x": x, **dict(native.named_parameters())}
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        gx = grads_wrt((got * w).sum(), wrt, retain_graph=True)
        rx = grads_wrt((want * w).sum(), ref_wrt, retain_graph=True)
        assert_dicts_close(gx, rx, **TOL)
        got_gg = torch.autograd.grad((got * w).pow(2).sum(), x, create_graph=True)[0].pow(2).sum()
        want_gg = torch.autograd.grad((want * w).pow(2).sum(), x, create_graph=True)[0].pow(2).sum()
        assert_dicts_close(grads_wrt(got_gg, wrt), grads_wrt(want_gg, ref_wrt), rtol=1e-9, atol=1e-10)
    if isinstance(native, nn.modules.batchnorm._BatchNorm) and native.track_running_stats:
        assert int(mine.num_batches_tracked) == 3


@pytest.mark.parametrize("name", sorted(NORMS))
def test_without_vmap_torch_kernels_run_with_the_same_results(name: str) -> None:
    native, mine, shape = _pair(name)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    want = native(x)
    with fparams.exact_norms():
        got = mine(x)
    assert autograd_ops(got) == autograd_ops(want)  # torch's own graph, not the decomposition
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert_dicts_close(_state(mine), _state(native), rtol=0, atol=0)


@pytest.mark.parametrize("always", [False, True], ids=["kernel", "decomposed"])
@pytest.mark.parametrize("name", ["bn1d", "bn2d", "in1d-tracked"])
def test_batch_stats_normalize_with_the_batch_and_leave_buffers_alone(name: str, always: bool) -> None:
    make, shape = NORMS[name]
    torch.manual_seed(0)
    module = make().double()
    _randomise(module)
    before = _state(module)
    x = 1 + torch.randn(shape, dtype=torch.float64)
    want = copy.deepcopy(module).train()(x)  # train mode: batch statistics
    for training in (True, False):
        module.train(training)
        with fparams.exact_norms(batch_stats=True, always=always):
            got = module(x)
        torch.testing.assert_close(got, want, **TOL)
        assert_dicts_close(_state(module), before, rtol=0, atol=0)


def test_other_functions_and_counters_are_left_alone() -> None:
    with fparams.exact_norms(batch_stats=True):
        y = torch.nn.functional.softmax(torch.zeros(3), 0)
        steps = torch.tensor(0)  # a 0-dim integer tensor, like num_batches_tracked
        steps.add_(1)
        steps += 1
    torch.testing.assert_close(y, torch.full((3,), 1 / 3))
    assert int(steps) == 2, "exact_norms swallowed an add_ that is not BatchNorm's"
    bn = nn.BatchNorm1d(2)
    bn(torch.randn(4, 2))  # outside the block: native, and it counts
    assert int(bn.num_batches_tracked) == 1


def test_user_counters_count_inside_map_tasks() -> None:
    bn = nn.BatchNorm1d(3).double()
    arch, params, _ = fparams.split(bn)
    calls = torch.tensor(0)

    def task(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        calls.add_(1)
        return arch(p, x)

    fparams.map_tasks(task, strategy="loop", batch_stats=True)(
        params, torch.randn(3, 4, 3, dtype=torch.float64)
    )
    assert int(calls) == 3
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_momentum_none_with_batch_stats(strategy: str) -> None:
    # BatchNorm divides by num_batches_tracked, which batch_stats leaves at 0
    bn = nn.BatchNorm1d(3, momentum=None).double()
    arch, params, _ = fparams.split(bn)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = fparams.map_tasks(arch, strategy=strategy, batch_stats=True)(params, x)
    torch.testing.assert_close(got, torch.stack([copy.deepcopy(bn)(xi) for xi in x]), **TOL)
    assert int(bn.num_batches_tracked) == 0 and float(bn.running_mean.abs().sum()) == 0.0


# -- the regression test: raw torch.func is wrong, fparams is exact -------------------
#
# torch's vmap batching rules for the native batch_norm / layer_norm backward give
# wrong second-order gradients (closest upstream report:
# https://github.com/pytorch/functorch/issues/534). The raw-torch tests below are
# strict xfails: the day torch fixes it they pass, pytest reports XPASS(strict) as a
# failure, and the reason says what to do.

TORCH_FIXED = (
    "torch's vmap {op} double backward is wrong (functorch#534). If this XPASSes, torch fixed "
    "it: exact_norms may no longer be needed for {op}; check, then drop this xfail."
)
T = 3
REGRESSION_NORMS = ["batch_norm", "layer_norm", "instance_norm", "group_norm", "rms_norm"]
WRONG_IN_TORCH = ["batch_norm", "layer_norm", "instance_norm"]  # instance_norm runs batch_norm's kernel


def _norm_param(norm: str) -> Any:
    no_rms = pytest.mark.skipif(not HAS_RMS_NORM, reason="this torch has no rms_norm")
    marks = [no_rms] if norm == "rms_norm" else []
    return pytest.param(norm, marks=marks, id=norm)


def _regression_net(norm: str) -> nn.Module:
    torch.manual_seed(0)
    layer = {
        "batch_norm": lambda: nn.BatchNorm1d(8, track_running_stats=False),
        "layer_norm": lambda: nn.LayerNorm(8),
        "group_norm": lambda: nn.GroupNorm(2, 8),
        "rms_norm": lambda: nn.RMSNorm(8),
        "instance_norm": lambda: nn.Sequential(
            nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2, affine=True), nn.Flatten()
        ),
    }[norm]()
    return nn.Sequential(nn.Linear(3, 8), layer, nn.ReLU(), nn.Linear(8, 1)).double()


def _one_step_task(net: nn.Module) -> Callable[..., Tensor]:
    """One grad-based inner step, written with torch.func only."""

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(net, p, (x,)), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        g = torch.func.grad(mse)(p, xs, ys)
        return mse({k: p[k] - 0.1 * g[k] for k in p}, xq, yq)

    return task


def _meta_grads(norm: str, fparams_too: bool = True) -> Dict[str, Dict[str, Tensor]]:
    net = _regression_net(norm)
    params = dict(net.named_parameters())
    data = task_data(T, shots=6)
    task = _one_step_task(net)

    def loop(p: Dict[str, Tensor]) -> Tensor:
        return torch.stack([task(p, *task_slice(data, i)) for i in range(T)]).mean()

    def raw(p: Dict[str, Tensor]) -> Tensor:
        return torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(p, *data).mean()

    out = {"fd": finite_diff_grad(loop, params)} if fparams_too else {}
    for label, objective in [("loop", loop), ("raw", raw)]:
        p = leaves(params)
        out[label] = grads_wrt(objective(p), p)
    for strategy, chunk in [("vmap", None), ("loop", None), ("chunked", 2), ("auto", None)] * fparams_too:
        p = leaves(params)
        value = fparams.map_tasks(task, strategy=strategy, chunk_size=chunk)(p, *data).mean()
        out[f"fparams-{strategy}"] = grads_wrt(value, p)
        _, out[f"fparams-func-{strategy}"] = fparams.meta_value_and_grad(
            task, strategy=strategy, chunk_size=chunk
        )(params, *data)
    return out


@pytest.mark.parametrize("norm", [_norm_param(n) for n in REGRESSION_NORMS])
def test_fparams_meta_gradients_are_exact_through_every_norm(norm: str) -> None:
    grads = _meta_grads(norm)
    # the references agree: finite differences and the per-task loop
    assert rel_err(grads["loop"], grads["fd"]) < 1e-7
    for label, g in grads.items():
        if label.startswith("fparams"):
            assert rel_err(g, grads["loop"]) < 1e-8, label
            assert rel_err(g, grads["fd"]) < 1e-7, label


def _still_wrong(norm: str) -> Any:
    mark = pytest.mark.xfail(strict=True, raises=AssertionError, reason=TORCH_FIXED.format(op=norm))
    return pytest.param(norm, marks=mark, id=norm)


@pytest.mark.parametrize(
    "norm", [_still_wrong(n) if n in WRONG_IN_TORCH else _norm_param(n) for n in REGRESSION_NORMS]
)
def test_raw_torch_func_meta_gradients(norm: str) -> None:
    # Measured with torch 2.13 on this net, for the xfails: 2.4e-2 (batch_norm), 8.7e-3
    # (layer_norm), 3.0e-2 (instance_norm). group_norm and rms_norm decompose into plain ops.
    grads = _meta_grads(norm, fparams_too=False)
    assert rel_err(grads["raw"], grads["loop"]) < 1e-8


# -- group / instance norm through map_tasks, every strategy --------------------------


def _conv_net(norm: str) -> nn.Module:
    torch.manual_seed(0)
    layer = {
        "group": lambda: nn.GroupNorm(2, 4),
        "instance": lambda: nn.InstanceNorm1d(4, affine=True),
        "instance-tracked": lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
    }[norm]()
    return nn.Sequential(nn.Conv1d(2, 4, 3), layer, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4, 1)).double()


STRATEGIES: List[Tuple[str, Optional[int]]] = [("vmap", None), ("loop", None), ("chunked", 2), ("auto", None)]


@pytest.mark.parametrize(("strategy", "chunk_size"), STRATEGIES)
@pytest.mark.parametrize("norm", ["group", "instance", "instance-tracked"])
def test_group_and_instance_norm_are_exact_over_tasks(
    norm: str, strategy: str, chunk_size: Optional[int]
) -> None:
    net = _conv_net(norm)
    arch, params, buffers = fparams.split(net)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(T, 5, *s, generator=g, dtype=torch.float64) for s in [(2, 6), (1,), (2, 6), (1,)]]

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.1, steps=2), xq, yq)

    def ref_mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(net, {**p, **_copy(buffers)}, (x,)), y)

    ref_p = leaves(params)
    want = torch.stack(
        [ref_mse(ref_adapt(ref_mse, ref_p, xs, ys, lr=0.1, steps=2), xq, yq) for xs, ys, xq, yq in zip(*data)]
    )
    batch_stats = norm == "instance-tracked"  # tracked stats in train mode would be shared across tasks
    value, grads = fparams.meta_value_and_grad(
        task, strategy=strategy, chunk_size=chunk_size, batch_stats=batch_stats
    )(params, *data)
    torch.testing.assert_close(value, want.mean(), **TOL)
    assert_dicts_close(grads, grads_wrt(want.mean(), ref_p), **TOL)


def _copy(buffers: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k: b.clone() for k, b in buffers.items()}


def _per_task_bn(
    momentum: Optional[float],
) -> Tuple[Callable[..., Any], Dict[str, Tensor], Dict[str, Tensor]]:
    bn = nn.BatchNorm1d(3, momentum=momentum).double()
    arch, params, buffers = fparams.split(bn)

    def task(p: Dict[str, Tensor], b: Dict[str, Tensor], x: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        b = fparams.clone(b)
        return arch(p, x, buffers=b), b

    return task, params, buffers


def test_momentum_none_with_per_task_statistics() -> None:
    task, params, buffers = _per_task_bn(None)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    _, new = fparams.map_tasks(task, strategy="loop")(params, fparams.stack_tasks(buffers, 2), x)
    for i in range(2):  # a fresh layer's first batch: the cumulative average is the batch's statistics
        torch.testing.assert_close(new["running_mean"][i], x[i].mean(0), **TOL)
    with pytest.raises(ValueError, match=r"momentum=None .* cannot differ per task under vmap") as err:
        fparams.map_tasks(task, strategy="vmap")(params, fparams.stack_tasks(buffers, 2), x)
    assert "strategy='loop'" in str(err.value) and "batch_stats=True" in str(err.value)
