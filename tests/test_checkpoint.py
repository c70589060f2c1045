"""fparams.adapt(checkpoint=True): the same meta-gradient as the unrolled loop, with less kept.

Every case computes one meta-gradient twice, with and without checkpointing,
and against the hand-written inner loop (``ref_adapt``) where one applies.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fparams
from fparams._torch_compat import SAVED_HOOKS_UNDER_VMAP
from tests.helpers import assert_dicts_close, grads_wrt, leaves, loss_fn, ref_adapt, task_data

TOL = dict(rtol=1e-10, atol=1e-12)
TASKS = 3


def _mlp(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    arch, params, _ = fparams.split(net)

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    return mse, leaves(params)


def _task_fn(mse: Callable[..., Tensor], checkpoint: bool, **kw: Any) -> Callable[..., Tensor]:
    def task(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        fast = fparams.adapt(mse, p, xs, ys, steps=3, checkpoint=checkpoint, **kw)
        return mse(fast, xq, yq)

    return task


def _meta_grads(
    strategy: str, checkpoint: bool, params: Dict[str, Tensor], mse: Any, **kw: Any
) -> Dict[str, Tensor]:
    data = task_data(TASKS, shots=5, outputs=2, seed=1)
    opts = {"chunk_size": 2} if strategy == "chunked" else {}
    losses = fparams.map_tasks(_task_fn(mse, checkpoint, **kw), strategy=strategy, **opts)(params, *data)
    return grads_wrt(losses.sum(), params)


@pytest.mark.parametrize("strategy", ["vmap", "loop", "chunked"])
def test_every_strategy_matches_the_unrolled_loop_and_the_reference(strategy: str) -> None:
    mse, params = _mlp()
    plain = _meta_grads(strategy, False, params, mse, lr=0.3)
    ckpt = _meta_grads(strategy, True, params, mse, lr=0.3)
    assert_dicts_close(ckpt, plain, **TOL)
    xs, ys, xq, yq = task_data(TASKS, shots=5, outputs=2, seed=1)
    ref = sum(mse(ref_adapt(mse, params, xs[i], ys[i], lr=0.3, steps=3), xq[i], yq[i]) for i in range(TASKS))
    assert_dicts_close(ckpt, grads_wrt(ref, params), **TOL)


@pytest.mark.parametrize(
    "kw",
    [
        {"lr": 0.2, "first_order": True},
        {"lr": 0.2, "filter": "2.*"},
        {"lr": "optim"},
        {"lr": "metasgd"},
    ],
    ids=["first_order", "filter", "adam", "metasgd"],
)
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_options_give_the_same_meta_gradient(kw: Dict[str, Any], strategy: str) -> None:
    mse, params = _mlp(1)
    kw = dict(kw)
    if kw["lr"] == "optim":
        kw["lr"] = fparams.optim.adam(0.05)
    elif kw["lr"] == "metasgd":
        kw["lr"] = {k: torch.full_like(p, 0.1).requires_grad_() for k, p in params.items()}
    both = {**params, **(kw["lr"] if isinstance(kw["lr"], dict) else {})}
    plain = _grads_of_both(strategy, False, params, both, mse, kw)
    ckpt = _grads_of_both(strategy, True, params, both, mse, kw)
    assert_dicts_close(ckpt, plain, **TOL)
    if "lr" in kw and isinstance(kw["lr"], dict):  # the learned rates receive meta-gradients
        assert all(ckpt[k].abs().sum() > 0 for k in kw["lr"])


def _grads_of_both(
    strategy: str,
    checkpoint: bool,
    params: Dict[str, Tensor],
    both: Dict[str, Tensor],
    mse: Any,
    kw: Dict[str, Any],
) -> Dict[str, Tensor]:
    data = task_data(TASKS, shots=5, outputs=2, seed=2)
    losses = fparams.map_tasks(_task_fn(mse, checkpoint, **kw), strategy=strategy)(params, *data)
    return grads_wrt(losses.sum(), both)


def test_a_learned_scalar_rate_gets_the_same_meta_gradient() -> None:
    mse, params = _mlp(2)
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    xs, ys, xq, yq = (t[0] for t in task_data(1, outputs=2, seed=3))
    found = []
    for checkpoint in (False, True):
        fast = fparams.adapt(mse, params, xs, ys, lr=lr, steps=4, checkpoint=checkpoint)
        found.append(grads_wrt(mse(fast, xq, yq), {"lr": lr, **params}))
    assert_dicts_close(found[1], found[0], **TOL)


def test_meta_value_and_grad_with_checkpointed_inner_loops() -> None:
    mse, params = _mlp(3)
    data = task_data(4, shots=5, outputs=2, seed=4)
    results = [
        fparams.meta_value_and_grad(_task_fn(mse, checkpoint, lr=0.3), strategy=strategy)(
            fparams.detach(params), *data
        )
        for checkpoint in (False, True)
        for strategy in ("vmap", "loop")
    ]
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], **TOL)
        assert_dicts_close(grads, results[0][1], **TOL)


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.bn(self.l1(x))))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_buffers_are_updated_once_per_step_and_the_gradient_is_the_same(strategy: str) -> None:
    torch.manual_seed(0)
    arch, params, buffers = fparams.split(_BNNet().double())
    params = leaves(params)
    data = task_data(TASKS, shots=6, outputs=2, seed=5)

    def task(checkpoint: bool) -> Callable[..., Any]:
        def run(p: Dict[str, Tensor], b: Dict[str, Tensor], *data: Tensor) -> Any:
            xs, ys, xq, yq = data

            def mse(q: Dict[str, Tensor], x: Tensor, y: Tensor, buffers: Dict[str, Tensor]) -> Tensor:
                return loss_fn(arch(q, x, buffers=buffers), y)

            fast = fparams.adapt(mse, p, xs, ys, lr=0.2, steps=3, buffers=b, checkpoint=checkpoint)
            return mse(fast, xq, yq, b), b

        return run

    found = []
    for checkpoint in (False, True):
        stacked = fparams.stack_tasks(buffers, TASKS)
        losses, new_buffers = fparams.map_tasks(task(checkpoint), strategy=strategy)(params, stacked, *data)
        grads = grads_wrt(losses.sum(), params)  # the recomputation runs here
        found.append((grads, {k: v.detach().clone() for k, v in new_buffers.items()}))
    assert_dicts_close(found[1][0], found[0][0], **TOL)
    assert_dicts_close(found[1][1], found[0][1], **TOL)
    assert int(found[1][1]["bn.num_batches_tracked"][0]) == 4  # 3 inner steps and the query


def test_dropout_replays_the_same_draws_when_recomputed() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 2)).double()
    arch, params, _ = fparams.split(net)
    params = leaves(params)
    data = task_data(TASKS, shots=5, outputs=2, seed=6)

    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(arch(p, x), y)

    found = []
    for checkpoint in (False, True):
        torch.manual_seed(7)
        mapped = fparams.map_tasks(_task_fn(mse, checkpoint, lr=0.2), strategy="loop")
        found.append(grads_wrt(mapped(params, *data).sum(), params))
    assert_dicts_close(found[1], found[0], **TOL)


def test_gradcheck_through_checkpointed_steps() -> None:
    mse, params = _mlp(4)
    xs, ys, xq, yq = (t[0] for t in task_data(1, shots=4, outputs=2, seed=8))
    names = list(params)

    def objective(*values: Tensor) -> Tensor:
        p = dict(zip(names, values))
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.3, steps=2, checkpoint=True), xq, yq)

    assert torch.autograd.gradcheck(objective, tuple(params.values()))
    assert torch.autograd.gradgradcheck(objective, tuple(params.values()))


def test_without_a_graph_to_keep_it_changes_nothing() -> None:
    mse, params = _mlp(5)
    xs, ys = (t[0] for t in task_data(1, outputs=2, seed=9)[:2])
    with torch.no_grad():
        plain = fparams.adapt(mse, params, xs, ys, lr=0.3, steps=2)
        ckpt = fparams.adapt(mse, params, xs, ys, lr=0.3, steps=2, checkpoint=True)
    assert_dicts_close(ckpt, plain, **TOL)


def test_under_an_outer_torch_func_grad_it_raises_and_says_what_works() -> None:
    mse, params = _mlp(6)
    xs, ys, xq, yq = (t[0] for t in task_data(1, outputs=2, seed=10))

    def objective(p: Dict[str, Tensor]) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.3, checkpoint=True), xq, yq)

    message = r"fparams.adapt: checkpoint=True cannot run under a torch.func transform"
    with pytest.raises(RuntimeError, match=message):
        torch.func.grad(objective)(fparams.detach(params))
    with pytest.raises(RuntimeError, match=r"meta_value_and_grad"):
        torch.func.grad(objective)(fparams.detach(params))


def test_detached_params_get_results_without_a_graph() -> None:
    # no param requires grad: no meta-gradient to bound, so the step is left as it is
    mse, params = _mlp(7)
    xs, ys = (t[0] for t in task_data(1, outputs=2, seed=11)[:2])
    fast = fparams.adapt(mse, fparams.detach(params), xs, ys, lr=0.3, steps=2, checkpoint=True)
    assert not any(t.requires_grad for t in fast.values())


def test_checkpoint_must_be_a_bool() -> None:
    mse, params = _mlp(8)
    xs, ys = (t[0] for t in task_data(1, outputs=2, seed=12)[:2])
    message = r"^fparams\.adapt: `checkpoint` must be True or False; got str 'yes'\.$"
    with pytest.raises(TypeError, match=message):
        fparams.adapt(mse, params, xs, ys, lr=0.3, checkpoint="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_the_compiled_steps_eager_fallback_runs_checkpointed(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # compile_fallback's eager call of one task's step takes plain autograd, as the uncompiled step
    def failing_compile(fn: Any, **kw: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            raise torch._dynamo.exc.Unsupported("no compiler in this test")

        return call

    monkeypatch.setattr(torch, "compile", failing_compile)
    mse, params = _mlp(9)
    data = task_data(TASKS, shots=5, outputs=2, seed=13)
    task = _task_fn(mse, True, lr=0.3)
    with pytest.warns(fparams.CompileFallbackWarning):
        step = fparams.meta_value_and_grad(task, strategy=strategy, compile=True)
        value, grads = step(fparams.detach(params), *data)
    want_value, want = fparams.meta_value_and_grad(_task_fn(mse, False, lr=0.3), strategy=strategy)(
        fparams.detach(params), *data
    )
    torch.testing.assert_close(value, want_value, **TOL)
    assert_dicts_close(grads, want, **TOL)


@pytest.mark.slow  # torch.compile: tens of seconds
def test_under_torch_compile_the_step_is_traced_as_it_is() -> None:
    mse, params = _mlp(10)
    data = task_data(TASKS, shots=5, outputs=2, seed=1)  # _meta_grads' data
    compiled = torch.compile(lambda p: fparams.map_tasks(_task_fn(mse, True, lr=0.3))(p, *data).sum())
    got = grads_wrt(compiled(params), params)
    want = _meta_grads("vmap", False, params, mse, lr=0.3)
    assert_dicts_close(got, want, rtol=1e-8, atol=1e-10)
    # and nothing is left switched off: checkpointing works eagerly afterwards
    assert_dicts_close(_meta_grads("vmap", True, params, mse, lr=0.3), want, **TOL)


def test_where_torch_refuses_hooks_under_vmap_the_steps_run_unrecomputed_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch 2.3 switches saved-tensor hooks off under every functorch transform
    monkeypatch.setattr(fparams._torch_compat, "SAVED_HOOKS_UNDER_VMAP", False)
    mse, params = _mlp(11)
    with pytest.warns(UserWarning, match=r"refuses autograd.s saved-tensor hooks under vmap"):
        got = _meta_grads("vmap", True, params, mse, lr=0.3)
    assert_dicts_close(got, _meta_grads("vmap", False, params, mse, lr=0.3), **TOL)


# -- in-place changes between the step and the backward pass (issue 16 item 1) ---------------


def _inplace_case(route: str, what: str) -> Tuple[Tensor, Any, Dict[str, Tensor]]:
    """A checkpointed meta-loss whose support data or param is then changed in place."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    arch, params, _ = fparams.split(net)
    mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()  # noqa: E731
    xs, ys = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 4, 1, dtype=torch.float64)
    xq = xs.clone()  # the query set is another tensor: only the inner steps read xs

    def task(p: Dict[str, Tensor], x: Tensor, y: Tensor, q: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, x, y, lr=0.1, steps=2, checkpoint=True), q, y)

    strategy = "loop" if route == "autograd" else "vmap"
    loss = fparams.map_tasks(task, strategy=strategy)(params, xs, ys, xq).sum()
    return loss, xs if what == "support" else params["0.weight"], params


@pytest.mark.parametrize("what, label", [("support", "loss_fn's argument 0 (args[0])"),
                                         ("param", "params['0.weight']")])
@pytest.mark.parametrize("route", ["autograd", "vmap"])
def test_an_input_changed_in_place_before_backward_raises(route: str, what: str, label: str) -> None:
    # Before: the recomputed steps read the changed tensor, a meta-gradient 82% off, silently.
    if route == "vmap" and not SAVED_HOOKS_UNDER_VMAP:
        _check_unrecomputed_steps_under_vmap(what)
        return
    loss, changed, _ = _inplace_case(route, what)
    with torch.no_grad():
        changed.add_(1.0)  # a data loader refilling its buffer / an optimizer step
    with pytest.raises(fparams.FparamsRuntimeError, match=re.escape(
        f"fparams.adapt: {label}, an input of an inner step run with checkpoint=True, was changed in "
        f"place after the step ran"
    )) as info:
        loss.backward()
    assert "pass checkpoint=False (torch then raises its own in-place error)" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_an_unchanged_input_still_gives_the_gradient() -> None:
    loss, changed, _ = _inplace_case("autograd", "param")
    loss.backward()  # nothing changed: no error
    assert changed.grad is not None


def _check_unrecomputed_steps_under_vmap(what: str) -> None:
    """torch 2.3: checkpoint=True does not recompute under vmap, so torch's own autograd answers.

    It raises its in-place error where a saved tensor was changed, or it saved a copy
    (vmap's batched views) and the meta-gradient is that of the forward that ran: exact.
    """
    loss, changed, params = _inplace_case("vmap", what)
    want_loss, _, want_params = _inplace_case("vmap", what)
    want = torch.autograd.grad(want_loss, list(want_params.values()))
    with torch.no_grad():
        changed.add_(1.0)
    try:
        got = torch.autograd.grad(loss, list(params.values()))
    except RuntimeError as err:
        assert "modified by an inplace operation" in str(err)
        return
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- buffers an architecture reads from its module (not passed as buffers=) ------------------


def _bn_meta_loss(
    train: bool, checkpoint: bool, query: bool = True
) -> Tuple[Tensor, nn.Module, Dict[str, Tensor]]:
    """A meta-loss through 3 steps on a BatchNorm net whose statistics stay in the module.

    ``query=False``: the loss reads only the adapted params (only the steps read the buffers).
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    net.train(train)
    arch, params, _ = fparams.split(net)
    mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()  # noqa: E731
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    fast = fparams.adapt(mse, params, x, y, lr=0.1, steps=3, checkpoint=checkpoint)
    loss = mse(fast, x, y) if query else sum(t.pow(2).sum() for t in fast.values())
    return loss, net, params


def test_running_statistics_the_steps_update_are_not_updated_again_by_the_recomputation() -> None:
    # Before: the recomputation ran each train-mode step again on the module's own BatchNorm,
    # so after backward num_batches_tracked was 7 instead of 4 and the running statistics moved.
    plain, plain_net, plain_params = _bn_meta_loss(train=True, checkpoint=False)
    want = torch.autograd.grad(plain, list(plain_params.values()))
    loss, net, params = _bn_meta_loss(train=True, checkpoint=True)
    got = torch.autograd.grad(loss, list(params.values()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for (name, t), (_, w) in zip(net.named_buffers(), plain_net.named_buffers()):
        torch.testing.assert_close(t, w, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert int(net.get_buffer("1.num_batches_tracked")) == 4  # three steps and the query pass


def test_a_module_buffer_changed_in_place_before_backward_raises() -> None:
    loss, net, _ = _bn_meta_loss(train=False, checkpoint=True, query=False)
    with torch.no_grad():
        net.get_buffer("1.running_var").add_(0.5)
    with pytest.raises(fparams.FparamsRuntimeError, match=re.escape(
        "fparams.adapt: the module's buffer '1.running_var' (read from the module, not passed as "
        "buffers=), an input of an inner step run with checkpoint=True, was changed in place after "
        "the step ran (its version went from"
    )):
        loss.backward()


def test_running_statistics_moved_by_a_train_mode_forward_before_backward_raise() -> None:
    # torch's BatchNorm updates its running statistics without bumping their version counters,
    # so torch itself does not notice; fparams compares the values the step read.
    loss, net, _ = _bn_meta_loss(train=False, checkpoint=True)
    net.train()
    net(torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(fparams.FparamsRuntimeError, match=re.escape(
        "fparams.adapt: the module's buffer '1.running_mean' (read from the module, not passed as "
        "buffers=), an input of an inner step run with checkpoint=True, was changed in place after "
        "the step ran (its values differ from those the step read)"
    )):
        loss.backward()


def test_the_put_back_statistics_leave_other_graphs_valid() -> None:
    # Found in review: setting the statistics back bumped their versions, so another task's pass
    # that saved them (train-mode BatchNorm saves its running statistics) failed torch's check.
    def two_tasks(checkpoint: bool) -> Tuple[Tuple[Tensor, ...], nn.Module]:
        a, net, params = _bn_meta_loss(True, checkpoint)
        arch = fparams.split(net)[0]
        mse = lambda p, x, y: (arch(p, x) - y).pow(2).mean()  # noqa: E731
        x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
        second = mse(fparams.adapt(mse, params, x, y, lr=0.1, steps=2, checkpoint=checkpoint), x, y)
        total = a + second
        first = torch.autograd.grad(total, list(params.values()), retain_graph=True)
        again = torch.autograd.grad(total, list(params.values()))  # the recomputation runs again
        return first + again, net

    want, plain_net = two_tasks(False)
    got, net = two_tasks(True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    for (name, t), (_, w) in zip(net.named_buffers(), plain_net.named_buffers()):
        torch.testing.assert_close(t, w, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


class PerStepNorm(nn.Module):
    """MAML++'s per-step BatchNorm (step i normalizes with bns[i]) and a branch only the query runs."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(2, 4), nn.Linear(4, 1)
        self.bns = nn.ModuleList(nn.BatchNorm1d(4) for _ in range(3))
        self.aux = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

    def forward(self, x: Tensor, step: int = 0, query: bool = False) -> Tensor:
        h = torch.tanh(self.bns[step](self.body(x)))
        return self.head(h) + (self.aux(h) if query else 0)


@pytest.mark.parametrize("train", [True, False])
def test_buffers_a_step_does_not_compute_with_are_not_watched(train: bool) -> None:
    # Found in review: every module buffer was watched, so the later steps' (and the query's)
    # legitimate updates of other layers' statistics raised a false error.
    def run(checkpoint: bool) -> List[Tensor]:
        torch.manual_seed(0)
        net = PerStepNorm().double().train(train)
        arch, params, _ = fparams.split(net)
        x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
        mse = lambda p, x, y, i: (arch(p, x, step=i) - y).pow(2).mean()  # noqa: E731
        batches = [(x, y, i) for i in range(3)]
        fast = fparams.adapt(mse, params, lr=0.1, steps=3, checkpoint=checkpoint, batches=batches)
        loss = (arch(fast, x, step=2, query=True) - y).pow(2).mean()  # in train mode: moves aux's stats
        return list(torch.autograd.grad(loss, list(params.values()), allow_unused=True))

    for g, w in zip(run(True), run(False)):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
