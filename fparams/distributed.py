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

import math
import numbers
import os
import zlib
from datetime import timedelta
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import check_int
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

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_HINT = (
    "Launch the script with `torchrun --nproc_per_node=N script.py` and call "
    "fparams.distributed.init_from_env() (or torch.distributed.init_process_group(...)) first."
)

Entries = List[Tuple[str, Tensor]]


def _require_group() -> None:
    if not dist.is_available():
        raise FparamsRuntimeError("this build of torch has no torch.distributed support.")
    if not dist.is_initialized():
        raise FparamsRuntimeError(f"the default process group is not initialised. {_HINT}")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


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
    if _initialized():
        return True
    present = [v for v in _ENV if v in os.environ]
    if not present:
        return False
    missing = [v for v in _ENV if v not in os.environ]
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
        kwargs["device_id"] = _cuda_device()
    dist.init_process_group(backend=backend, **kwargs)
    return True


def _cuda_device() -> torch.device:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= count:
        raise FparamsRuntimeError(
            f"the NCCL backend needs one GPU per process, but LOCAL_RANK={local} and this "
            f"machine shows {count} GPU(s). Start at most {count} processes per machine "
            f"(torchrun --nproc_per_node={count}), or use backend='gloo'."
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def shutdown() -> None:
    """Destroy the default process group, if there is one (else do nothing).

    Examples:
        >>> import fparams.distributed as fd
        >>> fd.shutdown()
    """
    if _initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """``True`` on global rank 0, and in a run without a process group.

    Use it to print progress, write files and save checkpoints once.

    Examples:
        >>> import fparams.distributed as fd
        >>> fd.is_main_process()
        True
    """
    return not _initialized() or dist.get_rank() == 0


def _check_int(arg: str, value: object, low: int) -> int:
    check_int(arg, value, low)
    assert isinstance(value, numbers.Integral)  # for mypy: check_int let only ints through
    return int(value)


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
    num_tasks = _check_int("num_tasks", num_tasks, 0)
    if (rank is None) != (world_size is None):
        raise FparamsValueError(
            f"pass both `rank` and `world_size`, or neither to use the process group's; "
            f"got rank={rank!r}, world_size={world_size!r}."
        )
    if rank is None or world_size is None:
        if not _initialized():
            raise FparamsRuntimeError(
                f"no `rank` / `world_size` given and the default process group is not "
                f"initialised. {_HINT} Or pass rank= and world_size=."
            )
        rank, world_size = dist.get_rank(), dist.get_world_size()
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise FparamsValueError(
            f"`rank` must be below `world_size`; got rank={rank}, world_size={world_size}."
        )
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


# ---------------------------------------------------------------------------
# Collectives over dicts, modules and iterables of tensors.
#
# Every helper runs the same three steps on every rank:
#   1. gather its entries as (name, tensor) pairs: a dict sorted by name (so
#      ranks agree on the order whatever the insertion order), a module's
#      named parameters or buffers, or an iterable numbered 0, 1, ...;
#   2. one small all_gather of (weight, layout hash, missing-grad flag) per
#      rank: the ranks check that they hold the same names, shapes and dtypes
#      (a mismatch would otherwise hang or mix up values), and every rank
#      sums the same weights in the same order;
#   3. one collective per (device, dtype) bucket on the flattened tensors.
# ---------------------------------------------------------------------------


def _entries(arg: str, target: object, kind: str) -> Tuple[bool, Entries]:
    """``(in_place, entries)`` for a dict, a module or an iterable of tensors."""
    if isinstance(target, Mapping):
        items = sorted(target.items(), key=lambda kv: str(kv[0]))
        bad = [str(k) for k, t in items if not isinstance(t, Tensor)]
        if bad:
            raise FparamsTypeError(f"`{arg}` must map names to tensors; not tensors: {bad}.")
        return False, [(str(k), t) for k, t in items]
    if isinstance(target, nn.Module):
        named = target.named_buffers() if kind == "buffers" else target.named_parameters()
        return True, list(named)
    if isinstance(target, Tensor) or not isinstance(target, Iterable):
        raise FparamsTypeError(
            f"`{arg}` must be a dict of tensors, an nn.Module or an iterable of tensors "
            f"(module.parameters()); got {type(target).__name__}."
        )
    items = [(str(i), t) for i, t in enumerate(target)]
    bad = [k for k, t in items if not isinstance(t, Tensor)]
    if bad:
        raise FparamsTypeError(f"`{arg}` must hold only tensors; not tensors at positions {bad}.")
    return True, items


def _check_dense(entries: Entries) -> None:
    sparse = [k for k, t in entries if t.layout != torch.strided]
    if sparse:
        raise FparamsTypeError(f"only dense (strided) tensors are supported; sparse: {sparse}.")


def _weight(weight: object) -> float:
    if weight is None:
        return 1.0
    if isinstance(weight, Tensor) and weight.numel() == 1:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise FparamsTypeError(
            f"`weight` must be a number (this rank's task count) or None; "
            f"got {type(weight).__name__}."
        )
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise FparamsValueError(
            f"`weight` must be finite and >= 0 (this rank's task count); got {weight!r}."
        )
    return w


def _comm_device(entries: Entries, group: Any) -> torch.device:
    if entries:
        return entries[0][1].device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _layout_hash(entries: Entries) -> int:
    layout = [(k, tuple(t.shape), str(t.dtype)) for k, t in entries]
    return zlib.crc32(repr(layout).encode())


def _agree(
    entries: Entries, weight: float, missing: bool, group: Any
) -> Tuple[List[float], bool]:
    """Step 2: every rank's weight, and whether any rank lacks a gradient."""
    device = _comm_device(entries, group)
    mine = torch.tensor(
        [weight, float(_layout_hash(entries)), float(missing)], dtype=torch.float64, device=device
    )
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    rows = [row.tolist() for row in gathered]
    differ = [r for r, row in enumerate(rows) if row[1] != rows[0][1]]
    if differ:
        shown = ", ".join(f"{k}{tuple(t.shape)} {t.dtype}" for k, t in entries[:8])
        more = f" and {len(entries) - 8} more" if len(entries) > 8 else ""
        raise FparamsValueError(
            f"the ranks passed different tensors: the names, shapes or dtypes on rank(s) "
            f"{differ} differ from rank 0's. Every rank must pass the same structure (the same model "
            f"and the same dict keys). This rank has {len(entries)}: {shown}{more}."
        )
    return [row[0] for row in rows], any(row[2] for row in rows)


def _buckets(entries: Entries) -> Dict[Tuple[torch.device, torch.dtype], List[int]]:
    out: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, (_, t) in enumerate(entries):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


def _flat_collective(tensors: List[Tensor], op: Any) -> List[Tensor]:
    """Run ``op(flat)`` on each (device, dtype) bucket; the results in input order."""
    out: List[Tensor] = list(tensors)
    for idx in _buckets([("", t) for t in tensors]).values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        op(flat)
        sizes = [tensors[i].numel() for i in idx]
        for i, chunk in zip(idx, torch.split(flat, sizes)):
            out[i] = chunk.view(tensors[i].shape)
    return out


def _weighted_sum(tensors: List[Tensor], scale: float, group: Any) -> List[Tensor]:
    def op(flat: Tensor) -> None:
        if scale != 1.0:
            flat.mul_(scale)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)

    return _flat_collective(tensors, op)


def _scale(weights: List[float], weight: float) -> float:
    total = math.fsum(weights)
    if total == 0:
        raise FparamsValueError("every rank passed weight=0, so there is nothing to average.")
    return weight / total


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
    _require_group()
    w = _weight(weight)
    in_place, entries = _entries("grads", grads, "grads")
    if not in_place:
        _check_dense(entries)
        weights, _ = _agree(entries, w, False, group)
        with torch.no_grad():
            summed = _weighted_sum([t for _, t in entries], _scale(weights, w), group)
        return _in_order(grads, {k: t for (k, _), t in zip(entries, summed)})

    params = [(k, p) for k, p in entries if p.requires_grad]
    have = [p.grad is not None for _, p in params]
    _check_dense([(k, p.grad) for k, p in params if p.grad is not None])
    weights, any_missing = _agree(params, w, not all(have), group)
    scale = _scale(weights, w)
    if any_missing:
        # Some rank lacks some .grad: reduce only what exists on some rank.
        found = torch.tensor(have, dtype=torch.uint8, device=_comm_device(params, group))
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        have_any = [bool(v) for v in found.tolist()]
    else:
        have_any = have
    reduce = [p for (_, p), any_ in zip(params, have_any) if any_]
    with torch.no_grad():
        local = [p.grad if p.grad is not None else torch.zeros_like(p) for p in reduce]
        summed = _weighted_sum(local, scale, group)
        for p, g in zip(reduce, summed):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
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
    _require_group()
    w = _weight(weight)
    in_place, entries = _entries("buffers", buffers, "buffers")
    _check_dense(entries)
    weights, _ = _agree(entries, w, False, group)
    scale = _scale(weights, w)
    floating = [i for i, (_, t) in enumerate(entries) if t.is_floating_point() or t.is_complex()]
    others = sorted(set(range(len(entries))) - set(floating))
    with torch.no_grad():
        results: List[Tensor] = [t for _, t in entries]
        averaged = _weighted_sum([entries[i][1] for i in floating], scale, group)
        maxed = _flat_collective(
            [entries[i][1] for i in others],
            lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group),
        )
        for i, t in zip(floating + others, averaged + maxed):
            results[i] = t
        return _write_back(buffers, in_place, entries, results)


def _in_order(target: Any, by_name: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``by_name`` in the key order of the dict the caller passed."""
    return {str(k): by_name[str(k)] for k in target}


def _write_back(
    target: Any, in_place: bool, entries: Entries, results: List[Tensor]
) -> Optional[Dict[str, Tensor]]:
    if not in_place:
        fresh = {k: r.clone().requires_grad_(t.requires_grad) for (k, t), r in zip(entries, results)}
        return _in_order(target, fresh)
    with torch.no_grad():
        for (_, t), r in zip(entries, results):
            t.copy_(r)
    return None


def _broadcast(
    arg: str, target: object, kind: str, src: int, group: Any
) -> Optional[Dict[str, Tensor]]:
    _require_group()
    src = _check_int("src", src, 0)
    if src >= dist.get_world_size():
        raise FparamsValueError(
            f"`src` must be a rank below the world size {dist.get_world_size()}; got {src}."
        )
    in_place, entries = _entries(arg, target, kind)
    _check_dense(entries)
    _agree(entries, 1.0, False, group)
    with torch.no_grad():
        results = _flat_collective(
            [t for _, t in entries], lambda flat: dist.broadcast(flat, src=src, group=group)
        )
        return _write_back(target, in_place, entries, results)


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
    return _broadcast("params", params, "params", src, group)


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
    return _broadcast("buffers", buffers, "buffers", src, group)
