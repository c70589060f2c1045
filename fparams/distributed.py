"""Meta-batches across processes with ``torch.distributed``.

Launch one process per device with ``torchrun``. Every rank holds the whole
meta-model and draws the same meta-batch (the same seed on every rank), maps
fparams over its own contiguous share of the tasks (:func:`shard_tasks`), and
averages the meta-gradients with :func:`all_reduce_grads`, weighted by its
number of tasks, so that every rank ends up with the single-process mean over
the whole meta-batch. With the same gradients and the same optimizer the
parameters stay identical on every rank; :func:`broadcast_params` once at the
start makes them identical to begin with.

Nothing here is home-made: the collectives are ``torch.distributed``'s
``all_reduce``, ``all_gather`` and ``broadcast`` on the default process group
(or the ``group`` given), gloo on CPU and NCCL on GPU. Tensors stay on the
rank's device.

Dicts in, dicts out. Given a dict (``grads`` from
:func:`fparams.meta_value_and_grad`, ``params`` or ``buffers`` from
:func:`fparams.split`) a helper returns a new dict and leaves its input
untouched. Given an ``nn.Module`` or an iterable of tensors
(``module.parameters()``) it changes them in place (the parameters' ``.grad``,
or the parameters and buffers themselves), as ``torch.optim`` and
DistributedDataParallel do.

Why not DistributedDataParallel: it does not compose with ``torch.func``.
Checked with torch 2.13, two gloo ranks, ``fparams.split(DDP(net))``: with
:func:`fparams.meta_value_and_grad` (``torch.func.grad``) no gradient reaches
``.grad``, so DDP never synchronises and each rank silently keeps its own
gradient; with :func:`fparams.map_tasks` and ``.backward()`` the first step is
right but the second fails in DDP's forward (``_rebuild_buckets`` on the
storage-less tensors of a ``torch.func`` transform: "Cannot access data pointer
of Tensor that doesn't have storage"). DDP also averages ranks with equal
weights, which is wrong for a meta-batch that does not divide evenly. Use
:func:`all_reduce_grads` after the backward pass instead.

Example, a script started with ``torchrun --nproc_per_node=2 train.py``::

    import torch, fparams, fparams.distributed as fd

    fd.init_from_env()                     # gloo on CPU, NCCL on GPU
    net = make_net()
    fd.broadcast_params(net)               # every rank starts from rank 0's weights
    arch, params, _ = fparams.split(net)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for batch in meta_batches:             # the same tasks on every rank
        share = fd.shard_tasks(len(batch[0]))
        loss = fparams.map_tasks(task_loss)(params, *(t[share] for t in batch)).mean()
        opt.zero_grad()
        loss.backward()
        fd.all_reduce_grads(net, weight=share.stop - share.start)
        opt.step()
    fd.shutdown()
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Dict, Iterable, Mapping, Optional, Union, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _collectives as col
from ._errors import FparamsRuntimeError, FparamsTypeError, FparamsValueError, public

__all__ = [
    "all_reduce_buffers",
    "all_reduce_grads",
    "broadcast_buffers",
    "broadcast_params",
    "init_from_env",
    "is_main_process",
    "shard_tasks",
    "shutdown",
]








@public("distributed.init_from_env")
def init_from_env(*, backend: Optional[str] = None, timeout: Optional[timedelta] = None) -> bool:
    """Initialise the default process group from the variables ``torchrun`` sets.

    Returns ``True`` in a distributed run (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` are set, or a process group already
    exists) and ``False`` in a plain ``python`` run, where it does nothing, so
    one script serves both.

    Args:
        backend: ``"nccl"`` when CUDA is available, else ``"gloo"``. With NCCL
            each process drives one GPU, ``LOCAL_RANK``: this calls
            ``torch.cuda.set_device(LOCAL_RANK)``; put the rank's tensors on
            ``torch.device("cuda", LOCAL_RANK)``.
        timeout: how long a collective waits for the other ranks before it
            raises (``datetime.timedelta``); torch's default otherwise (30
            minutes for gloo, 10 for NCCL). When a rank dies, ``torchrun``
            stops the others at once; the timeout bounds the wait where
            nothing does.

    Examples:
        >>> import fparams.distributed as fd
        >>> fd.init_from_env()  # run with plain `python`: no torchrun variables
        False
    """
    if timeout is not None and not isinstance(timeout, timedelta):
        raise FparamsTypeError(
            f"`timeout` must be a datetime.timedelta, e.g. timedelta(seconds=60); "
            f"got {type(timeout).__name__}."
        )
    if col._initialized():
        return True
    present = [v for v in col._ENV if v in os.environ]
    if not present:
        return False
    missing = [v for v in col._ENV if v not in os.environ]
    if missing:
        raise FparamsRuntimeError(
            f"found {present} in the environment but not {missing}. torchrun sets all of "
            f"them; when launching processes yourself, set every one."
        )
    if not dist.is_available():
        raise FparamsRuntimeError(
            "torchrun variables are set, but this build of torch has no distributed."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: Dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if "nccl" in backend:
        kwargs["device_id"] = col._cuda_device()
    dist.init_process_group(backend=backend, **kwargs)
    return True




def shutdown() -> None:
    """Destroy the default process group, if there is one (else do nothing).

    Examples:
        >>> import fparams.distributed as fd
        >>> fd.shutdown()
    """
    if col._initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """``True`` on global rank 0, and in a run without a process group.

    Use it to print progress, write files and save checkpoints once.

    Examples:
        >>> import fparams.distributed as fd
        >>> fd.is_main_process()
        True
    """
    return not col._initialized() or dist.get_rank() == 0




@public("distributed.shard_tasks")
def shard_tasks(num_tasks: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> slice:
    """This rank's contiguous share of a meta-batch of ``num_tasks`` tasks.

    Shares differ by at most one task; the first ``num_tasks % world_size``
    ranks take one more. With fewer tasks than ranks the last ranks get an
    empty slice: they pass ``weight=0`` to :func:`all_reduce_grads` (their
    ``.grad`` may stay ``None``; a dict of zeros,
    ``fparams.zeros_like(params)``, in the functional style) and still call it.

    Args:
        num_tasks: the tasks in the meta-batch (the same on every rank).
        rank: this process's rank; give it with ``world_size`` or leave both
            out for the default process group's.
        world_size: the number of processes; given with ``rank``.

    Examples:
        >>> import fparams.distributed as fd
        >>> [fd.shard_tasks(5, rank=r, world_size=2) for r in range(2)]
        [slice(0, 3, None), slice(3, 5, None)]
    """
    num_tasks = col._check_int("num_tasks", num_tasks, 0)
    if (rank is None) != (world_size is None):
        raise FparamsValueError(
            f"pass both `rank` and `world_size`, or neither to use the process group's; "
            f"got rank={rank!r}, world_size={world_size!r}."
        )
    if rank is None or world_size is None:
        if not col._initialized():
            raise FparamsRuntimeError(
                f"no `rank` / `world_size` given and the default process group is not "
                f"initialised. {col._HINT} Or pass rank= and world_size=."
            )
        rank, world_size = dist.get_rank(), dist.get_world_size()
    world_size = col._check_int("world_size", world_size, 1)
    rank = col._check_int("rank", rank, 0)
    if rank >= world_size:
        raise FparamsValueError(
            f"`rank` must be below `world_size`; got rank={rank}, world_size={world_size}."
        )
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
























@overload
def all_reduce_grads(
    grads: Mapping[str, Tensor], weight: Optional[float] = None, *, group: Any = None
) -> Dict[str, Tensor]: ...


@overload
def all_reduce_grads(
    grads: Union[nn.Module, Iterable[Tensor]], weight: Optional[float] = None, *, group: Any = None
) -> None: ...


@public("distributed.all_reduce_grads")
def all_reduce_grads(
    grads: Union[Mapping[str, Tensor], nn.Module, Iterable[Tensor]],
    weight: Optional[float] = None,
    *,
    group: Any = None,
) -> Optional[Dict[str, Tensor]]:
    """Average meta-gradients across ranks, weighted by each rank's share.

    Every rank gets ``sum_r weight_r * grads_r / sum_r weight_r``. When each
    rank's gradient is that of its *mean* task loss and ``weight`` is its
    number of tasks (``share.stop - share.start`` from :func:`shard_tasks`),
    this is exactly the gradient of the mean loss over the whole meta-batch,
    as one process would compute it, also when the tasks do not divide
    evenly. ``weight=None`` weighs every rank equally.

    Args:
        grads: a dict of gradients (from :func:`fparams.meta_value_and_grad`
            or ``torch.func.grad``): a new dict of averaged, detached tensors
            is returned. Or a module / an iterable of parameters: the
            ``.grad`` of every parameter that requires grad is averaged in
            place (a rank without a ``.grad`` contributes zeros; a parameter
            that has none on any rank keeps ``None``), and ``None`` is
            returned. Call it on every rank, after the backward pass and
            before the optimizer step.
        weight: this rank's weight, a number >= 0 (its task count).
        group: the process group; the default one when ``None``.

    Raises:
        RuntimeError: no process group is initialised.
        ValueError: the ranks passed different names, shapes or dtypes, or
            every rank passed ``weight=0``.

    Examples:
        >>> import torch, torch.distributed as dist, fparams.distributed as fd
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> fd.all_reduce_grads({"w": torch.tensor([1.0, 2.0])}, weight=3)
        {'w': tensor([1., 2.])}
        >>> dist.destroy_process_group()
    """
    col._require_group()
    w = col._weight(weight)
    in_place, entries = col._entries("grads", grads, "grads")
    if not in_place:
        col._check_dense(entries)
        weights, _ = col._agree(entries, w, False, group)
        with torch.no_grad():
            summed = col._weighted_sum([t for _, t in entries], col._scale(weights, w), group)
        return col._in_order(grads, {k: t for (k, _), t in zip(entries, summed)})

    col._reduce_param_grads(entries, w, group)
    return None


@overload
def all_reduce_buffers(
    buffers: Mapping[str, Tensor], weight: Optional[float] = None, *, group: Any = None
) -> Dict[str, Tensor]: ...


@overload
def all_reduce_buffers(
    buffers: Union[nn.Module, Iterable[Tensor]], weight: Optional[float] = None, *, group: Any = None
) -> None: ...


@public("distributed.all_reduce_buffers")
def all_reduce_buffers(
    buffers: Union[Mapping[str, Tensor], nn.Module, Iterable[Tensor]],
    weight: Optional[float] = None,
    *,
    group: Any = None,
) -> Optional[Dict[str, Tensor]]:
    """Make BatchNorm running statistics agree across ranks by averaging them.

    Floating-point buffers (``running_mean``, ``running_var``) become the
    weighted mean over ranks, with the weighting of :func:`all_reduce_grads`;
    other buffers (the integer ``num_batches_tracked``) take the largest value
    over ranks. The result is the average of the ranks' statistics (as
    without SyncBatchNorm), not statistics recomputed over the union of their
    batches. Use it where ranks updated their running statistics on
    different tasks: after the step, or before evaluating and checkpointing.
    Where only rank 0's statistics should count, use
    :func:`broadcast_buffers` (what DistributedDataParallel does). With
    ``map_tasks(..., batch_stats=True)`` no running statistic changes, and
    neither helper is needed.

    Args:
        buffers: a dict (a new dict is returned), or a module / an iterable
            of buffers (changed in place; ``None`` is returned).
        weight: this rank's weight, a number >= 0 (its task count).
        group: the process group; the default one when ``None``.

    Examples:
        >>> import torch, torch.distributed as dist, fparams.distributed as fd
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> fd.all_reduce_buffers(bn)
        >>> bn.running_var
        tensor([1., 1.])
        >>> dist.destroy_process_group()
    """
    col._require_group()
    w = col._weight(weight)
    in_place, entries = col._entries("buffers", buffers, "buffers")
    col._check_dense(entries)
    results = col._average_buffers(entries, w, group)
    return col._write_back(buffers, in_place, entries, results)








@overload
def broadcast_params(
    params: Mapping[str, Tensor], src: int = 0, *, group: Any = None
) -> Dict[str, Tensor]: ...


@overload
def broadcast_params(
    params: Union[nn.Module, Iterable[Tensor]], src: int = 0, *, group: Any = None
) -> None: ...


@public("distributed.broadcast_params")
def broadcast_params(
    params: Union[Mapping[str, Tensor], nn.Module, Iterable[Tensor]], src: int = 0, *, group: Any = None
) -> Optional[Dict[str, Tensor]]:
    """Give every rank rank ``src``'s parameters; call it once, before training.

    Ranks that start from the same parameters, apply the same averaged
    gradients (:func:`all_reduce_grads`) with the same optimizer stay
    identical, so one broadcast at the start is enough.

    Args:
        params: a module or an iterable of parameters (overwritten in place,
            keeping their identity, so an optimizer built on them stays
            valid; ``None`` is returned), or a dict (a new dict of fresh
            leaves with the same ``requires_grad`` is returned).
        src: the global rank whose values win.
        group: the process group; the default one when ``None``.

    Examples:
        >>> import torch, torch.distributed as dist, fparams.distributed as fd
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> fd.broadcast_params({"w": torch.ones(2, requires_grad=True)})
        {'w': tensor([1., 1.], requires_grad=True)}
        >>> dist.destroy_process_group()
    """
    return col._broadcast("params", params, "params", src, group)


@overload
def broadcast_buffers(
    buffers: Mapping[str, Tensor], src: int = 0, *, group: Any = None
) -> Dict[str, Tensor]: ...


@overload
def broadcast_buffers(
    buffers: Union[nn.Module, Iterable[Tensor]], src: int = 0, *, group: Any = None
) -> None: ...


@public("distributed.broadcast_buffers")
def broadcast_buffers(
    buffers: Union[Mapping[str, Tensor], nn.Module, Iterable[Tensor]], src: int = 0, *, group: Any = None
) -> Optional[Dict[str, Tensor]]:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics).

    What DistributedDataParallel does before each forward: rank ``src``'s
    statistics win and the other ranks' updates are dropped. To combine the
    ranks' statistics instead, use :func:`all_reduce_buffers`.

    Args:
        buffers: a module or an iterable of buffers (overwritten in place;
            ``None`` is returned), or a dict (a new dict is returned).
        src: the global rank whose values win.
        group: the process group; the default one when ``None``.

    Examples:
        >>> import torch, torch.distributed as dist, fparams.distributed as fd
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> fd.broadcast_buffers(bn)
        >>> int(bn.num_batches_tracked)
        0
        >>> dist.destroy_process_group()
    """
    return col._broadcast("buffers", buffers, "buffers", src, group)
