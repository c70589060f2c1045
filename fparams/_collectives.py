"""The machinery under :mod:`fparams.distributed`: argument checks, the agreement step and
bucketed collectives over ``(name, tensor)`` entries.

Every collective helper runs the same three steps on every rank:

1. gather its entries as ``(name, tensor)`` pairs: a dict sorted by name (so ranks agree on
   the order whatever the insertion order), a module's named parameters or buffers, or an
   iterable numbered 0, 1, ...;
2. one small ``all_gather`` of (weight, layout hash, missing-grad flag) per rank: the ranks
   check that they hold the same names, shapes and dtypes (a mismatch would otherwise hang or
   mix up values), and every rank sums the same weights in the same order;
3. one collective per (device, dtype) bucket on the flattened tensors.
"""

from __future__ import annotations

import math
import numbers
import os
import zlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import check_int
from ._errors import FparamsRuntimeError, FparamsTypeError, FparamsValueError

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


def _check_int(arg: str, value: object, low: int) -> int:
    check_int(arg, value, low)
    assert isinstance(value, numbers.Integral)  # for mypy: check_int let only ints through
    return int(value)


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


def _reduce_param_grads(entries: Entries, w: float, group: Any) -> None:
    """``all_reduce_grads`` on a module or parameters: each ``.grad`` averaged in place (a rank
    without one adds zeros; a parameter without one on every rank keeps ``None``)."""
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


def _average_buffers(entries: Entries, w: float, group: Any) -> List[Tensor]:
    """``all_reduce_buffers``' values: floating buffers averaged by weight, the others maxed."""
    weights, _ = _agree(entries, w, False, group)
    scale = _scale(weights, w)
    floating = [i for i, (_, t) in enumerate(entries) if t.is_floating_point() or t.is_complex()]
    others = sorted(set(range(len(entries))) - set(floating))
    results: List[Tensor] = [t for _, t in entries]
    with torch.no_grad():
        averaged = _weighted_sum([entries[i][1] for i in floating], scale, group)
        maxed = _flat_collective(
            [entries[i][1] for i in others],
            lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group),
        )
    for i, t in zip(floating + others, averaged + maxed):
        results[i] = t
    return results
