"""fparams.distributed: 2 gloo processes on loopback against one process.

Ranks are forked from the test process (no second torch import, so a launch
costs well under a second), meet over ``MASTER_ADDR=127.0.0.1`` and a free
port through :func:`fparams.distributed.init_from_env`, and write their
results to files. Every launch has a hard deadline, and the process group a
timeout, so nothing can hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pathlib
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from helpers import assert_dicts_close
from torch import Tensor, nn

import fparams
import fparams.distributed as fd

WORLD = 2
GROUP_TIMEOUT = timedelta(seconds=15)  # a collective waits this long for a silent peer
DEADLINE = 60.0  # seconds for a whole launch, then every rank is killed
TIGHT = {"rtol": 1e-12, "atol": 1e-14}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()) or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed with gloo and the fork start method",
)


# --- launching ranks -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(body: Callable[[int], Any], rank: int, port: int, out: pathlib.Path) -> None:
    code = 0
    try:
        torch.set_num_threads(1)  # no OpenMP pool inherited across fork
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        assert fd.init_from_env(backend="gloo", timeout=GROUP_TIMEOUT)
        result = body(rank)
        fd.shutdown()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    finally:
        os._exit(code)  # never run the test process's exit handlers


class RankFailed(RuntimeError):
    pass


def launch(body: Callable[[int], Any], out: pathlib.Path) -> Tuple[List[Any], float]:
    """Run ``body(rank)`` on every rank; its results, or ``RankFailed`` with every traceback."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    port = _free_port()
    start = time.monotonic()
    procs = [ctx.Process(target=_rank_main, args=(body, r, port, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, DEADLINE - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    errors = {r: (out / f"rank{r}.err").read_text() for r in range(WORLD) if (out / f"rank{r}.err").exists()}
    if hung or errors or any(p.exitcode != 0 for p in procs):
        report = "".join(f"\n--- rank {r}:\n{text}" for r, text in sorted(errors.items()))
        raise RankFailed(
            f"after {elapsed:.1f}s: exit codes {[p.exitcode for p in procs]}, killed at the "
            f"deadline: {hung}{report}"
        )
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], elapsed


# --- the meta-learning problem, identical in every process ---------------------------------------


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def make_tasks(n: int, seed: int) -> Tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 5, 1, generator=g, dtype=torch.float64) for _ in range(4))


def task_loss(arch: fparams.Architecture) -> Callable[..., Tensor]:
    def mse(p: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (arch(p, x) - y).pow(2).mean()

    def loss(p: Dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return mse(fparams.adapt(mse, p, xs, ys, lr=0.1, steps=2), xq, yq)

    return loss


def backward_share(net: nn.Module, tasks: Tuple[Tensor, ...], rank: int, world: int) -> int:
    """Mean task loss over this rank's share, backward into ``net``; the share's size."""
    arch, params, _ = fparams.split(net)
    share = fd.shard_tasks(tasks[0].shape[0], rank=rank, world_size=world)
    if share.stop > share.start:
        fparams.map_tasks(task_loss(arch))(params, *(t[share] for t in tasks)).mean().backward()
    return share.stop - share.start


def grads_of(net: nn.Module) -> Dict[str, Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


def adam_run(net: nn.Module, rank: int, world: int, sync: bool) -> Dict[str, Tensor]:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        n = backward_share(net, make_tasks(5, seed=10 + step), rank, world)
        if sync:
            fd.all_reduce_grads(net, weight=n)
        opt.step()
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def numeric_body(rank: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    net = make_net(0)
    arch, params, _ = fparams.split(net)
    step = fparams.meta_value_and_grad(task_loss(arch))
    for n in (4, 5):  # the functional style: dicts in, dicts out
        share = fd.shard_tasks(n)
        _, grads = step(params, *(t[share] for t in make_tasks(n, seed=n)))
        out[f"dict{n}"] = fd.all_reduce_grads(grads, weight=share.stop - share.start)
    for n in (5, 1):  # .backward() into the module; with 1 task, rank 1 has none
        net.zero_grad(set_to_none=True)
        fd.all_reduce_grads(net, weight=backward_share(net, make_tasks(n, seed=n), rank, WORLD))
        out[f"module{n}"] = grads_of(net)
    started = make_net(100 + rank)  # different on each rank until the broadcast
    fd.broadcast_params(started)
    out["start"] = {k: p.detach().clone() for k, p in started.named_parameters()}
    out["adam"] = adam_run(started, rank, WORLD, sync=True)
    bn = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        bn.running_mean.fill_(rank + 1.0)
        bn.num_batches_tracked.fill_(rank + 3)
    out["bn_dict"] = fd.all_reduce_buffers(dict(bn.named_buffers()), weight=rank + 1)
    out["bn_bcast"] = fd.broadcast_buffers(dict(bn.named_buffers()), src=1)
    fd.all_reduce_buffers(bn, weight=rank + 1)
    out["bn_module"] = {k: b.clone() for k, b in bn.named_buffers()}
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> List[Dict[str, Any]]:
    single_process_grads(4)  # torch.func's first call is slow: pay it once, the forked ranks inherit it
    results, _ = launch(numeric_body, tmp_path_factory.mktemp("numeric"))
    return results


def single_process_grads(n: int) -> Dict[str, Tensor]:
    net = make_net(0)
    backward_share(net, make_tasks(n, seed=n), rank=0, world=1)
    return grads_of(net)


# --- two ranks against one process ---------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 5], ids=["even-4-tasks", "uneven-5-tasks"])
def test_averaged_dict_grads_equal_one_process_over_the_whole_batch(ranks: List[Any], n: int) -> None:
    expected = single_process_grads(n)
    for r in range(WORLD):
        assert_dicts_close(ranks[r][f"dict{n}"], expected, **TIGHT)


@pytest.mark.parametrize("n", [5, 1], ids=["uneven-5-tasks", "1-task-rank-1-empty"])
def test_averaged_module_grads_equal_one_process_over_the_whole_batch(ranks: List[Any], n: int) -> None:
    expected = single_process_grads(n)
    for r in range(WORLD):
        assert_dicts_close(ranks[r][f"module{n}"], expected, **TIGHT)


def test_broadcast_params_gives_every_rank_rank_0s_start(ranks: List[Any]) -> None:
    expected = {k: p.detach() for k, p in make_net(100).named_parameters()}
    for r in range(WORLD):
        assert_dicts_close(ranks[r]["start"], expected, rtol=0, atol=0)


def test_five_adam_steps_identical_on_both_ranks_and_equal_one_process(ranks: List[Any]) -> None:
    for k in ranks[0]["adam"]:
        assert torch.equal(ranks[0]["adam"][k], ranks[1]["adam"][k]), k
    expected = adam_run(make_net(100), rank=0, world=1, sync=False)
    assert_dicts_close(ranks[0]["adam"], expected, rtol=1e-10, atol=1e-12)


def test_buffers_average_weighted_or_come_from_src(ranks: List[Any]) -> None:
    # rank 0 holds 1.0 with weight 1, rank 1 holds 2.0 with weight 2: (1 + 4) / 3.
    for r in range(WORLD):
        for got in (ranks[r]["bn_dict"], ranks[r]["bn_module"]):
            torch.testing.assert_close(got["running_mean"], torch.full((3,), 5 / 3, dtype=torch.float64))
            torch.testing.assert_close(got["running_var"], torch.ones(3, dtype=torch.float64))
            assert int(got["num_batches_tracked"]) == 4  # the largest over ranks
        assert ranks[r]["bn_bcast"]["running_mean"].tolist() == [2.0, 2.0, 2.0]
        assert int(ranks[r]["bn_bcast"]["num_batches_tracked"]) == 4


# --- failures end the run, with the error, in bounded time ----------------------------------------


def raising_body(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 failed on purpose")
    grads = {"w": torch.ones(3, dtype=torch.float64)}
    fd.all_reduce_grads(grads)  # rank 1 never joins: rank 0 must fail, not hang


def test_a_rank_that_raises_fails_the_run_with_its_error_in_bounded_time(tmp_path: pathlib.Path) -> None:
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 failed on purpose") as info:
        launch(raising_body, tmp_path)
    assert time.monotonic() - start < DEADLINE
    assert "killed at the deadline: []" in str(info.value)  # rank 0 ended on its own
    assert "--- rank 0:" in str(info.value)  # with an error of its own


def mismatched_body(rank: int) -> None:
    fd.all_reduce_grads({"w": torch.ones(2 + rank)})


def test_ranks_with_different_tensors_get_a_clear_error_not_a_hang(tmp_path: pathlib.Path) -> None:
    with pytest.raises(RankFailed) as info:
        launch(mismatched_body, tmp_path)
    text = str(info.value)
    assert text.count("the ranks passed different tensors") == WORLD, text
    assert "killed at the deadline: []" in text


# --- one process: shares, and every error branch ---------------------------------------------------


@pytest.mark.parametrize(
    "n, world, sizes",
    [(4, 2, [2, 2]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]), (1, 2, [1, 0]), (0, 2, [0, 0]), (3, 1, [3])],
)
def test_shard_tasks_is_contiguous_and_as_even_as_possible(n: int, world: int, sizes: List[int]) -> None:
    shares = [fd.shard_tasks(n, rank=r, world_size=world) for r in range(world)]
    assert [s.stop - s.start for s in shares] == sizes
    assert [i for s in shares for i in range(n)[s]] == list(range(n))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_tasks": -1, "rank": 0, "world_size": 2}, r"`num_tasks` must be an int >= 0; got -1"),
        ({"num_tasks": 4, "rank": 0}, r"pass both `rank` and `world_size`, or neither"),
        ({"num_tasks": 4, "rank": 2, "world_size": 2}, r"`rank` must be below `world_size`"),
        ({"num_tasks": 4, "rank": 0, "world_size": 0}, r"`world_size` must be an int >= 1"),
    ],
)
def test_shard_tasks_bad_arguments(kwargs: Dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fd.shard_tasks(**kwargs)


def test_shard_tasks_wrong_type() -> None:
    message = r"^fparams\.distributed\.shard_tasks: `num_tasks` must be an int; got float 2\.0\.$"
    with pytest.raises(TypeError, match=message):
        fd.shard_tasks(2.0, rank=0, world_size=2)  # type: ignore[arg-type]


COLLECTIVES = [
    lambda: fd.all_reduce_grads({"w": torch.ones(1)}),
    lambda: fd.all_reduce_buffers({"b": torch.ones(1)}),
    lambda: fd.broadcast_params({"w": torch.ones(1)}),
    lambda: fd.broadcast_buffers({"b": torch.ones(1)}),
    lambda: fd.shard_tasks(4),
]


@pytest.mark.parametrize("call", COLLECTIVES, ids=["grads", "buffers", "params", "bcast_buffers", "shard"])
def test_without_a_process_group_the_error_names_the_fix(call: Callable[[], Any]) -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"not initialised.*torchrun.*init_process_group"):
        call()


def test_outside_torchrun_init_does_nothing_and_main_process_is_true(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert fd.init_from_env() is False
    assert not dist.is_initialized()
    assert fd.is_main_process()
    fd.shutdown()  # a no-op


def test_init_from_env_with_partial_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match=r"found \['RANK'.*but not \[.*'MASTER_PORT'\]"):
        fd.init_from_env()


def test_init_from_env_timeout_must_be_a_timedelta() -> None:
    with pytest.raises(
        TypeError, match=r"`timeout` must be a datetime.timedelta, e.g. timedelta\(seconds=60\)"
    ):
        fd.init_from_env(timeout=30)  # type: ignore[arg-type]


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_rank")
@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: fd.all_reduce_grads({"w": torch.ones(1)}, weight=-1),
            ValueError,
            r"finite and >= 0.*got -1",
        ),
        (
            lambda: fd.all_reduce_grads({"w": torch.ones(1)}, weight="3"),
            TypeError,
            r"`weight` must be a number",
        ),
        (lambda: fd.all_reduce_grads({"w": torch.ones(1)}, weight=True), TypeError, r"got bool"),
        (
            lambda: fd.all_reduce_grads({"w": torch.ones(1)}, weight=0),
            ValueError,
            r"every rank passed weight=0",
        ),
        (
            lambda: fd.all_reduce_grads({"w": 1.0}),
            TypeError,
            r"must map names to tensors; not tensors: \['w'\]",
        ),
        (lambda: fd.all_reduce_grads(torch.ones(2)), TypeError, r"got Tensor"),
        (lambda: fd.all_reduce_grads([torch.ones(1), 2]), TypeError, r"not tensors at positions \['1'\]"),
        (lambda: fd.all_reduce_grads({"w": torch.ones(2).to_sparse()}), TypeError, r"sparse: \['w'\]"),
        (lambda: fd.broadcast_params({"w": torch.ones(1)}, src=1), ValueError, r"`src` must be a rank below"),
    ],
    ids=["negative", "string", "bool", "all-zero", "not-tensor", "tensor", "list", "sparse", "src"],
)
def test_bad_arguments_with_a_process_group(call: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.usefixtures("one_rank")
def test_dict_forms_are_pure_and_module_forms_work_in_place() -> None:
    net = nn.Linear(2, 1)
    net.weight.grad = torch.full_like(net.weight, 2.0)  # bias has no .grad on any rank: stays None
    before = net.weight.grad
    grads = {"w": torch.ones(2), "b": torch.ones(1)}
    out = fd.all_reduce_grads(grads, weight=2)
    assert out is not None and list(out) == ["w", "b"]  # the caller's order, not sorted
    assert out["w"] is not grads["w"] and grads["w"].tolist() == [1.0, 1.0]
    assert list(fd.all_reduce_buffers({"z": torch.ones(1), "a": torch.ones(1)}) or {}) == ["z", "a"]
    assert fd.all_reduce_grads(net, weight=2) is None
    assert net.weight.grad is before and net.weight.grad.eq(2).all() and net.bias.grad is None
    params = dict(net.named_parameters())
    fresh = fd.broadcast_params(params)
    assert fresh is not None and fresh["weight"] is not params["weight"] and fresh["weight"].requires_grad
    assert fd.broadcast_params(net.parameters()) is None
    assert fd.is_main_process()


def test_doc_examples_run() -> None:
    import doctest

    assert not dist.is_initialized()
    result = doctest.testmod(fd, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# --- the demo: its sharded meta-gradient, and the command under torchrun ---------------------------


def demo_training(rank: int, world: int) -> Dict[str, Any]:
    from fparams import demo

    model = demo.make_model(0)
    arch, params, _ = fparams.split(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    meta_grad = demo.make_meta_grad(arch, lr=0.01, steps=1)
    if world > 1:
        meta_grad = demo.shard_meta_grad(meta_grad)
    generator = torch.Generator().manual_seed(0)
    losses = [demo.meta_step(meta_grad, params, optimizer, demo.sample_tasks(generator, 5)) for _ in range(3)]
    return {"losses": losses, "params": {k: p.detach().clone() for k, p in params.items()}}


def test_demo_sharded_meta_grad_trains_like_one_process(tmp_path: pathlib.Path) -> None:
    ranks, _ = launch(lambda rank: demo_training(rank, WORLD), tmp_path)  # 5 tasks: 3 + 2
    expected = demo_training(0, 1)
    for k in expected["params"]:
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k
    assert_dicts_close(ranks[0]["params"], expected["params"], rtol=1e-5, atol=1e-6)
    assert ranks[0]["losses"] == pytest.approx(expected["losses"], rel=1e-5)


@pytest.mark.slow  # three fresh interpreters, each importing torch
def test_demo_under_torchrun_with_two_processes_reports_once(tmp_path: pathlib.Path) -> None:
    # The numbers equal one process's: test_demo_sharded_meta_grad_trains_like_one_process checks
    # that on the functions the command runs, without a second (slow) run of the command here.
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--tee=3"]
    torchrun += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "fparams.demo"]
    args = ["--iterations", "2", "--tasks", "3", "--out", str(tmp_path / "plot.png")]
    proc = subprocess.run(torchrun + args, capture_output=True, text=True, timeout=150)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "[default1]:" not in output, output[-4000:]  # rank 1: no progress bar, no report
    assert output.count("held-out MSE over") == 1 and "data-parallel over 2 processes" in output
    assert "[default0]:meta-training" in output  # rank 0's progress bar
    assert (tmp_path / "plot.png").exists()
