"""map_tasks and meta_value_and_grad: every strategy against a per-task autograd loop."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from tests.helpers import (
    assert_dicts_close,
    assert_module_untouched,
    grads_of,
    grads_wrt,
    leaves,
    loss_fn,
    module_snapshot,
    ref_adapt,
    task_data,
    task_slice,
)

T = 5  # tasks; chunks of 2 leave a remainder, chunks of 5 do not
TOL = dict(rtol=1e-9, atol=1e-11)
STRATEGIES: List[Tuple[str, Optional[int]]] = [
    ("vmap", None),
    ("loop", None),
    ("chunked", 2),
    ("chunked", 5),
    ("chunked", 7),
    ("auto", None),
    ("auto", 3),
]
IDS = [s if c is None else f"{s}-{c}" for s, c in STRATEGIES]


def _net(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    hidden = {
        "mlp": [nn.Tanh()],
        "batchnorm": [nn.BatchNorm1d(6), nn.ReLU()],
        "dropout": [nn.Tanh(), nn.Dropout(0.5)],
    }[kind]
    return nn.Sequential(nn.Linear(3, 6), *hidden, nn.Linear(6, 1)).double()


def _maml_task(arch: fparams.Architecture, steps: int = 2, lr: float = 0.1) -> Any:
    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, lr=lr, steps=steps), xq, yq)

    return task


def _reference(net: nn.Module, params: Dict[str, Tensor], data: List[Tensor], steps: int = 2) -> Tensor:
    """Per-task losses, the inner loop by hand; BN (if any) on a private copy of the buffers."""
    buffers = {k: b.clone() for k, b in net.named_buffers()}

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(net, {**p, **buffers}, (x,)), y)

    losses = []
    for i in range(T):
        xs, ys, xq, yq = task_slice(data, i)
        losses.append(mse(ref_adapt(mse, params, xs, ys, lr=0.1, steps=steps), xq, yq))
    return torch.stack(losses)


@pytest.mark.parametrize("kind", ["mlp", "batchnorm"])
@pytest.mark.parametrize(("strategy", "chunk_size"), STRATEGIES, ids=IDS)
def test_backward_and_func_grad_match_the_loop(kind: str, strategy: str, chunk_size: Optional[int]) -> None:
    net = _net(kind)
    arch, params, _ = fparams.split(net)
    data = task_data(T, shots=6)
    snap = module_snapshot(net)
    want_losses = _reference(net, leaves(params), data)
    ref_params = leaves(params)
    want = grads_wrt(_reference(net, ref_params, data).mean(), ref_params)
    task = _maml_task(arch)
    opts = dict(strategy=strategy, chunk_size=chunk_size, batch_stats=kind == "batchnorm")

    # .backward() into the module's Parameters
    losses = fparams.map_tasks(task, **opts)(params, *data)
    assert losses.shape == (T,)
    torch.testing.assert_close(losses, want_losses, **TOL)
    losses.mean().backward()
    backward = grads_of(net)
    assert_dicts_close(backward, want, **TOL)

    # torch.func.grad of the whole meta-objective, pure
    value, grads = fparams.meta_value_and_grad(task, **opts)(fparams.detach(params), *data)
    torch.testing.assert_close(value, want_losses.mean(), **TOL)
    assert_dicts_close(grads, want, **TOL)
    assert_dicts_close(grads, backward, **TOL)
    assert_module_untouched(net, snap)  # BN's running statistics too


def test_strategies_agree_with_each_other_to_float64_rounding() -> None:
    # Not bitwise: vmap runs batched kernels and the loop per-task ones, which sum in
    # other orders; in float64 that differs by rounding only.
    net = _net("mlp")
    arch, params, _ = fparams.split(net)
    data = task_data(T, shots=6)
    task = _maml_task(arch, steps=3)
    results = [
        fparams.meta_value_and_grad(task, strategy=s, chunk_size=c)(params, *data) for s, c in STRATEGIES
    ]
    for value, grads in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=1e-14)
        assert_dicts_close(grads, results[0][1], rtol=1e-12, atol=1e-14)


def test_has_aux_returns_the_stacked_aux() -> None:
    net = _net("mlp")
    arch, params, _ = fparams.split(net)
    data = task_data(T, shots=6)
    task = _maml_task(arch)

    def with_aux(p: Dict[str, Tensor], *d: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        loss = task(p, *d)
        return loss, {"double": 2 * loss}

    (value, aux), grads = fparams.meta_value_and_grad(with_aux, has_aux=True)(params, *data)
    _, plain = fparams.meta_value_and_grad(task)(params, *data)
    assert_dicts_close(grads, plain, **TOL)
    torch.testing.assert_close(aux["double"], 2 * fparams.map_tasks(task)(params, *data).detach(), **TOL)
    with pytest.raises(ValueError, match=r"has_aux=True needs task_fn to return \(loss, aux\)"):
        fparams.meta_value_and_grad(task, has_aux=True)(params, *data)


@pytest.mark.parametrize(("strategy", "chunk_size"), STRATEGIES, ids=IDS)
def test_pytree_task_args_and_outputs(strategy: str, chunk_size: Optional[int]) -> None:
    net = _net("mlp")
    arch, params, _ = fparams.split(net)
    xs, ys, xq, yq = task_data(T, shots=6)
    scale = torch.linspace(0.5, 1.5, T, dtype=torch.float64)

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    def task(
        p: Dict[str, Tensor], support: Dict[str, Tensor], query: Tuple[Tensor, Tensor], s: Tensor
    ) -> Any:
        fast = fparams.adapt(mse, p, support["x"], support["y"], lr=0.1)
        pred = arch(fast, query[0])
        return {"loss": s * loss_fn(pred, query[1]), "pred": pred}, [fast["0.bias"]]

    mapped = fparams.map_tasks(task, strategy=strategy, chunk_size=chunk_size)
    out, (bias,) = mapped(params, {"x": xs, "y": ys}, (xq, yq), scale)
    ref = leaves(params)
    for i in range(T):
        fast = ref_adapt(mse, ref, xs[i], ys[i], lr=0.1)
        pred = arch(fast, xq[i])
        torch.testing.assert_close(out["pred"][i], pred, **TOL)
        torch.testing.assert_close(out["loss"][i], scale[i] * loss_fn(pred, yq[i]), **TOL)
        torch.testing.assert_close(bias[i], fast["0.bias"], **TOL)
    assert out["pred"].shape == (T, 6, 1) and bias.shape == (T, 6)


def _dropout_task(arch: fparams.Architecture) -> Any:
    def task(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        return arch(p, x)

    return task


def test_dropout_randomness() -> None:
    net = _net("dropout")
    arch, params, _ = fparams.split(net)
    x = torch.randn(1, 20, 3, dtype=torch.float64).expand(T, 20, 3)  # the same input for every task
    task = _maml_task(arch)
    data = [x, torch.zeros(T, 20, 1, dtype=torch.float64), x, torch.zeros(T, 20, 1, dtype=torch.float64)]
    torch.manual_seed(0)
    different = fparams.map_tasks(_dropout_task(arch), randomness="different")(params, x)
    assert not torch.allclose(different[0], different[1])
    same = fparams.map_tasks(_dropout_task(arch), randomness="same")(params, x)
    for i in range(1, T):
        torch.testing.assert_close(same[i], same[0], rtol=0, atol=0)
    # through the inner loop and the outer gradient as well
    value, grads = fparams.meta_value_and_grad(task, randomness="different")(params, *data)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads.values())
    # eval mode: no randomness, so every strategy agrees exactly
    net.eval()
    got = fparams.map_tasks(_dropout_task(arch))(params, x)
    torch.testing.assert_close(got, net(x[0]).expand(T, 20, 1), **TOL)
    net.train()
    # our message, a ValueError about the `randomness` argument (tests/test_tasks_fallback.py checks it)
    with pytest.raises(ValueError, match=r"randomness='different'"):
        fparams.map_tasks(task, randomness="error")(params, *data)
    with pytest.raises(ValueError, match=r"randomness='different'"):
        fparams.map_tasks(task)(params, *data)  # "error" is the default


# -- BatchNorm state over tasks ---------------------------------------------------


def _buffer_task(arch: fparams.Architecture) -> Any:
    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor, buffers: Dict[str, Tensor]) -> Tensor:
        return loss_fn(arch(p, x, buffers=buffers), y)

    def task(
        p: Dict[str, Tensor], b: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
    ) -> Any:
        b = fparams.clone(b)
        fast = fparams.adapt(mse, p, xs, ys, lr=0.1, steps=2, buffers=b)
        return mse(fast, xq, yq, buffers=b), b

    return task


@pytest.mark.parametrize(("strategy", "chunk_size"), STRATEGIES, ids=IDS)
def test_per_task_running_statistics(strategy: str, chunk_size: Optional[int]) -> None:
    net = _net("batchnorm")
    with torch.no_grad():  # start from non-trivial statistics
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    arch, params, buffers = fparams.split(net)
    data = task_data(T, shots=6)
    snap = module_snapshot(net)
    losses, new = fparams.map_tasks(_buffer_task(arch), strategy=strategy, chunk_size=chunk_size)(
        params, fparams.stack_tasks(buffers, T), *data
    )
    losses.mean().backward()

    # reference: native BatchNorm, one private copy of the buffers per task
    ref_params = leaves(params)
    ref_losses, ref_buffers = [], []
    for i in range(T):
        own = {k: b.clone() for k, b in buffers.items()}

        def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor, own: Dict[str, Tensor] = own) -> Tensor:
            return loss_fn(torch.func.functional_call(net, {**p, **own}, (x,)), y)

        xs, ys, xq, yq = task_slice(data, i)
        ref_losses.append(mse(ref_adapt(mse, ref_params, xs, ys, lr=0.1, steps=2), xq, yq))
        ref_buffers.append(own)
    want = torch.stack(ref_losses)
    torch.testing.assert_close(losses, want, **TOL)
    assert_dicts_close(grads_of(net), grads_wrt(want.mean(), ref_params), **TOL)
    stacked = {k: torch.stack([b[k] for b in ref_buffers]) for k in buffers}
    assert_dicts_close(new, stacked, **TOL)
    assert new["1.num_batches_tracked"].tolist() == [3] * T  # two inner steps and the query
    assert not torch.allclose(new["1.running_mean"][0], new["1.running_mean"][1])
    assert_module_untouched(net, snap)


@pytest.mark.parametrize(("strategy", "chunk_size"), STRATEGIES, ids=IDS)
def test_shared_running_statistics_raise_a_clear_error(strategy: str, chunk_size: Optional[int]) -> None:
    net = _net("batchnorm")
    arch, params, _ = fparams.split(net)
    snap = module_snapshot(net)
    mapped = fparams.map_tasks(_maml_task(arch), strategy=strategy, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"updates running statistics that are shared across tasks") as err:
        mapped(params, *task_data(T, shots=6))
    assert "fparams.stack_tasks(buffers, num_tasks)" in str(err.value)
    assert "batch_stats=True" in str(err.value)
    if strategy == "loop":
        # The loop sees the sharing when a second task updates the statistics;
        # it restores what the first task changed (so only _version differs).
        state = net.state_dict(keep_vars=True)
        for k, s in snap.items():
            torch.testing.assert_close(state[k].detach(), s.value, rtol=0, atol=0)
    else:  # vmap rejects the update before anything changes
        assert_module_untouched(net, snap)


def test_one_task_in_a_loop_updates_shared_statistics_as_plain_pytorch_does() -> None:
    # With one task nothing is shared: the loop behaves like the hand-written loop.
    net, ref = _net("batchnorm"), _net("batchnorm")
    ref.load_state_dict(net.state_dict())
    arch, params, buffers = fparams.split(net)
    data = task_data(1, shots=6)
    fparams.map_tasks(_maml_task(arch), strategy="loop")(params, *data)
    xs, ys, xq, yq = (d[0] for d in data)
    learner = fparams.clone_module(ref)  # shares ref's buffers, as learn2learn's clone does
    for _ in range(2):
        g = torch.autograd.grad(loss_fn(learner(xs), ys), list(learner.parameters()), create_graph=True)
        fparams.update_module(learner, [-0.1 * gi for gi in g])
    loss_fn(learner(xq), yq)
    for k, b in ref.named_buffers():
        torch.testing.assert_close(buffers[k], b)
    assert int(buffers["1.num_batches_tracked"]) == 3  # two inner steps and the query


def test_stack_tasks() -> None:
    src = {"a": torch.arange(3.0, requires_grad=True), "n": torch.tensor(4)}
    out = fparams.stack_tasks(src, 2)
    assert out["a"].shape == (2, 3) and out["n"].tolist() == [4, 4]
    assert not out["a"].requires_grad
    out["a"][0, 0] = 9.0  # private copies: neither the source nor the other task changes
    assert float(src["a"][0].detach()) == 0.0 and float(out["a"][1, 0]) == 0.0
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"^fparams\.stack_tasks: `num_tasks` must be an int >= 1; got"):
            fparams.stack_tasks(src, bad)
    for wrong in (1.5, True):
        with pytest.raises(TypeError, match=r"^fparams\.stack_tasks: `num_tasks` must be an int; got "):
            fparams.stack_tasks(src, wrong)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^fparams\.stack_tasks: `tensors` must be a dict of tensors"):
        fparams.stack_tasks([torch.ones(1)], 2)  # type: ignore[arg-type]


# -- argument errors ---------------------------------------------------------------

ARG_ERRORS = [
    (
        dict(strategy="vectorize"),
        r"`strategy` must be one of \('auto', 'vmap', 'loop', 'chunked'\); got 'vectorize'",
    ),
    (
        dict(randomness="random"),
        r"`randomness` must be one of \('error', 'different', 'same'\); got 'random'",
    ),
    (dict(strategy="chunked"), r"strategy='chunked' needs `chunk_size`"),
    (dict(strategy="chunked", chunk_size=0), r"`chunk_size` must be an int >= 1; got 0\.$"),
    (dict(chunk_size=-2), r"`chunk_size` must be an int >= 1; got -2\.$"),
    (dict(strategy="vmap", chunk_size=2), r"`chunk_size` only applies to strategy='chunked' or 'auto'"),
    (dict(strategy="loop", chunk_size=2), r"got strategy='loop' with chunk_size=2"),
]


TYPE_ERRORS = [
    (dict(chunk_size=1.5), r"`chunk_size` must be an int or None; got float 1\.5\.$"),
    (dict(chunk_size=True), r"`chunk_size` must be an int or None; got bool True\.$"),
    (dict(strategy=None), r"`strategy` must be one of \('auto', 'vmap', 'loop', 'chunked'\); got NoneType"),
    (dict(randomness=1), r"`randomness` must be one of \('error', 'different', 'same'\); got int 1\.$"),
]


@pytest.mark.parametrize(("kwargs", "message"), TYPE_ERRORS)
def test_options_of_a_wrong_type(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message) as err:
        fparams.map_tasks(lambda p, x: x, **kwargs)
    assert str(err.value).startswith("fparams.map_tasks: ")
    with pytest.raises(TypeError, match=message):
        fparams.meta_value_and_grad(lambda p, x: x, **kwargs)


def test_fn_must_be_callable() -> None:
    message = r"^fparams\.map_tasks: `fn` must be a callable fn\(params, \*task\); got int\.$"
    with pytest.raises(TypeError, match=message):
        fparams.map_tasks(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), ARG_ERRORS)
def test_bad_options(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        fparams.map_tasks(lambda p, x: x, **kwargs)
    assert str(err.value).startswith("fparams.map_tasks: ")
    with pytest.raises(ValueError, match=message):
        fparams.meta_value_and_grad(lambda p, x: x, **kwargs)


CALL_ERRORS = [
    (
        (torch.ones(3, 2), torch.ones(4, 2)),
        r"disagree on the number of tasks \(dim 0\): task_batches\[0\]: 3, task_batches\[1\]: 4",
    ),
    (({"x": torch.ones(3, 2), "y": torch.ones(2)},), r"task_batches\[0\]\['y'\]: 2"),
    ((torch.ones(3, 2), torch.tensor(1.0)), r"task_batches\[1\] is a 0-dim tensor"),
    (({"lr": 0.1},), r"no task argument holds a tensor"),
]


@pytest.mark.parametrize(("strategy", "chunk_size"), [("vmap", None), ("loop", None), ("chunked", 2)])
@pytest.mark.parametrize(("batches", "message"), CALL_ERRORS)
def test_bad_task_batches(
    batches: Tuple[Any, ...], message: str, strategy: str, chunk_size: Optional[int]
) -> None:
    mapped = fparams.map_tasks(lambda p, *a: p, strategy=strategy, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=message) as err:
        mapped(torch.ones(()), *batches)
    assert str(err.value).startswith("fparams.map_tasks: ")


def test_no_task_batches() -> None:
    with pytest.raises(
        TypeError, match=r"fparams\.map_tasks: call the mapped function as f\(params, \*task_batches\)"
    ):
        fparams.map_tasks(lambda p: p)(torch.ones(()))


def test_differently_structured_outputs_per_task() -> None:
    def task(p: Tensor, x: Tensor) -> Dict[str, Tensor]:
        return {"pos": x} if float(x.sum()) > 0 else {"neg": x}

    with pytest.raises(ValueError, match=r"fparams\.map_tasks: the function returned differently structured"):
        fparams.map_tasks(task, strategy="loop")(torch.ones(()), torch.tensor([[1.0], [-1.0]]))


@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop", "chunked"])
def test_a_single_task(strategy: str) -> None:
    net = _net("mlp")
    arch, params, _ = fparams.split(net)
    data = [t[:1] for t in task_data(T, shots=6)]
    step = fparams.meta_value_and_grad(
        _maml_task(arch), strategy=strategy, chunk_size=4 if strategy == "chunked" else None
    )
    value, grads = step(params, *data)
    ref = leaves(params)
    fast = ref_adapt(lambda p, x, y: loss_fn(arch(p, x), y), ref, data[0][0], data[1][0], lr=0.1, steps=2)
    want = loss_fn(arch(fast, data[2][0]), data[3][0])
    torch.testing.assert_close(value, want, **TOL)
    assert_dicts_close(grads, grads_wrt(want, ref), **TOL)
