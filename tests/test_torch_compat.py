"""_torch_compat: every torch private is probed once, and fparams works without them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch  # --- implicit ---

import fparams._torch_compat as compat

# A torch whose privates moved: hide them while fparams is imported, then use the
# paths that need them (the vmap inner-gradient route, exact_norms' step-out, BatchNorm's
# batch counter, RNN clones, the compile fallback) and compare with the normal numbers.
SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.overrides, torch.nn.modules.batchnorm as bn
    from torch._C import _functorch
    # hidden while fparams imports (torch itself still needs them afterwards)
    hidden = [(_functorch, "_unwrap_batched"), (torch.overrides, "_pop_mode_temporarily"),
              (torch.overrides, "_get_current_function_mode"), (bn, "_BatchNorm")]
    hidden += [(sys, "_getframe")]  # --- implicit --- (exact_norms' batch counter, layer names)
    saved = [(owner, name, getattr(owner, name)) for owner, name in hidden]
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        import torch._dynamo  # torch's own import (fparams makes it on torch 2.3) needs sys._getframe
    if sys.argv[1] == "without":
        for owner, name in hidden:
            delattr(owner, name)
    import fparams
    from fparams import _torch_compat as compat
    for owner, name, value in saved:
        setattr(owner, name, value)
    if sys.argv[1] == "without":
        assert compat.FUNCTORCH is None and compat.current_function_mode() is None
        assert compat.caller_self(0) is compat.UNKNOWN_CALLER  # --- implicit ---
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)).double()
    arch, params, buffers = fparams.split(net)

    def task(p, b, xs, ys):
        mse = lambda q, x, y, buffers: (arch(q, x, buffers=buffers) - y).pow(2).mean()
        fast = fparams.adapt(mse, p, xs, ys, lr=0.1, steps=2, buffers=b)
        return mse(fast, xs, ys, b)

    data = [torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 5, 1, dtype=torch.float64)]
    b = fparams.stack_tasks(buffers, 3)
    value, grads = fparams.meta_value_and_grad(task, strategy="vmap")(params, b, *data)
    rnn = fparams.clone_module(torch.nn.GRU(2, 3))
    out = rnn(torch.ones(4, 1, 2))[0].sum()
    print(repr(float(value)), *(repr(float(g.sum())) for g in grads.values()), repr(float(out)))
    """
)


def _run(mode: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_fparams_imports_and_computes_the_same_without_torch_privates() -> None:
    with_them = [float(v) for v in _run("with").split()]
    without = [float(v) for v in _run("without").split()]
    # the same maths by another route (torch.func.grad for every inner gradient)
    assert len(without) == len(with_them) == 8
    for a, b in zip(without, with_them):
        assert abs(a - b) <= 1e-12 + 1e-10 * abs(b), (with_them, without)


def test_the_probes_found_this_torchs_privates() -> None:
    # On the torch versions CI runs, every probe succeeds: the fallbacks above are for others.
    assert compat.FUNCTORCH is not None
    assert compat.MODULE_SLOTS
    assert compat.current_function_mode() is None  # no mode active here
    assert compat.caller_frame(0) is sys._getframe()


def test_frames_and_run_op_for_exact_norms() -> None:  # --- implicit ---
    assert compat.caller_self(0) is None  # a function without `self`
    assert compat.calling_module((torch.nn.Module,)) is None
    assert compat.run_op(max, (1, 2), {}) == 2
# --- tasks ---
def test_tasks_work_without_version_counters_and_the_graph_walk(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """fparams._tasks' torch internals (``._version``, autograd's graph walk) turned off: same numbers."""
    import warnings

    import torch

    import fparams

    assert compat.VERSION_COUNTERS and compat.GRAPH_WALK  # found on the torch versions CI runs
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    arch, params, _ = fparams.split(net)
    rate = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)  # captured: the graph walk finds it

    def task(p, x, y):  # type: ignore[no-untyped-def]
        out = torch.renorm(arch(p, x), 2, 0, 1.0)  # no batching rule: "auto" falls back to the loop
        return (out - y).pow(2).mean() * rate

    data = [torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, 5, 1, dtype=torch.float64)]

    def run():  # type: ignore[no-untyped-def]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value, grads = fparams.meta_value_and_grad(task)(fparams.detach(params), *data)
        return [value, *grads.values(), *torch.autograd.grad(value, rate)]

    want = run()
    monkeypatch.setattr(compat, "VERSION_COUNTERS", False)
    monkeypatch.setattr(compat, "GRAPH_WALK", False)
    assert compat.version(torch.zeros(1)) == 0  # every tensor reads 0 without counters
    assert compat.reaches_other_leaves(torch.zeros(1), [])
    for a, b in zip(run(), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_torchs_vmap_texts_are_still_recognised() -> None:
    """Canaries: fparams._tasks recognises these texts of this torch (a rewording fails here)."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.func.vmap(lambda t: torch.renorm(t, 2, 0, 1.0))(torch.ones(2, 3, 4))
    assert [compat.slow_fallback_op(w.message) for w in caught] == ["aten::renorm"]
    try:
        torch.func.vmap(lambda t: torch.rand(1) + t)(torch.ones(2))
    except RuntimeError as err:
        assert compat.is_random_op_error(err)
    try:
        torch.func.vmap(lambda t: t * float(t.sum()))(torch.ones(2, 2))
    except RuntimeError as err:
        assert compat.unbatchable_op(err) == ".item() or data-dependent control flow"
    user = RuntimeError("output with shape [4, 5, 1] doesn't match the broadcast shape [4, 5, 3]")
    assert compat.unbatchable_op(user, [4]) is None  # a user's broadcast error: never a vmap limit
    lacking = RuntimeError("output with shape [2, 5] doesn't match the broadcast shape [3, 2, 5]")
    assert compat.unbatchable_op(lacking, [3]) == "an in-place op whose output has no task dimension"
# --- adapt ---


def test_version_counters_functorch_unwrapping_and_graph_reachability() -> None:
    import torch

    t = torch.zeros(2)
    before = compat.version(t)
    t.add_(1)
    assert compat.version(t) == before + 1
    assert compat.version(object()) == 0  # type: ignore[arg-type] - the fallback where torch has none
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    view = b.view_as(b)
    loss = (a * 2).sum()
    assert compat.reached_by(loss, [a, view], []) == [True, False]
    c = a * 1
    assert compat.reached_by((c * 2).sum(), [a], [c]) == [False]  # nothing below a stop
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append((compat.requires_grad_somewhere(x), compat.unwrapped(x).shape))
        return x

    torch.func.vmap(probe)(torch.ones(3, 2, requires_grad=True))
    assert seen == [(True, torch.Size([3, 2]))]
    assert isinstance(compat.dynamo_frames(), int)
# --- core ---


def test_the_version_counter_probe_found_it() -> None:
    t = compat.torch.zeros(2)
    before = compat.version(t)
    t.add_(1)
    assert compat.VERSION_COUNTERS and compat.version(t) == before + 1
# --- arch ---
def test_ops_without_double_backward_without_the_nodes_private_metadata() -> None:
    # The op's name comes from a NotImplemented node's private `_input_metadata` and torch's error
    # text; where either moves, the op is "an op" and the fparams error is still raised.
    import pytest
    import torch

    from fparams import _kernels

    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.nn.functional.hardsigmoid(x).sum(), x, create_graph=True)
    node, seen = None, [g.grad_fn]
    while seen and node is None:  # the NotImplemented node, by a short walk
        n = seen.pop()
        node = n if "NotImplemented" in n.name() else None
        seen.extend(m for m, _ in n.next_functions if m is not None)
    assert node is not None

    class Moved:  # the node as a torch without `_input_metadata` would show it
        def name(self) -> str:
            return node.name()

        def __call__(self, *args: object) -> None:
            raise RuntimeError("reworded")

    assert compat._node_op(node) == "aten::hardsigmoid_backward"
    assert compat._node_op(Moved()) == "an op"
    from fparams._torch_compat import graph

    real = graph._node_op
    try:
        graph._node_op = lambda n: "an op"  # type: ignore[assignment]
        with pytest.raises(_kernels.FparamsRuntimeError, match="goes through `an op`"):
            _kernels.check_double_backward([g], "fparams")
    finally:
        graph._node_op = real  # type: ignore[assignment]
