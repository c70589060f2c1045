"""The normalization functionals written with ordinary tensor ops: pure, exact under vmap.

No function here changes a tensor: where batch or instance normalization
uses the statistics of its input, :func:`channel_norm` returns them, and the
caller (:class:`~fparams._norms.mode.exact_norms`, through the
:class:`~fparams._norms.journal.StatsJournal`) folds them into running
statistics.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor


class Observed(NamedTuple):
    """Per-channel statistics of an input, as a layer folds them into its running ones."""

    mean: Tensor
    var: Tensor  # unbiased, as torch's running_var


def channel_shape(x: Tensor) -> List[int]:
    """``[1, C, 1, ...]``: how a per-channel vector broadcasts against ``x``."""
    return [1, -1] + [1] * (x.dim() - 2)


def values_per_channel(x: Tensor, per_instance: bool) -> int:
    """How many values each statistic is taken over (1 makes the variance 0)."""
    return x[0, 0].numel() if per_instance else x.numel() // x.size(1)


def affine(out: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shape: List[int]) -> Tensor:
    """``out * weight + bias``, each reshaped to ``shape`` and optional."""
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def channel_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    use_input_stats: bool,
    eps: float,
    *,
    per_instance: bool,
    observe: bool = False,
) -> Tuple[Tensor, Optional[Observed]]:
    """Batch (``per_instance=False``) or instance normalization, without side effects.

    Returns the output and, with ``observe`` where the input's own statistics
    were used, what a layer with running statistics folds into them (else None).
    """
    shape = channel_shape(input)
    if not use_input_stats and running_mean is not None and running_var is not None:
        out = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
        return affine(out, weight, bias, shape), None
    dims = list(range(2, input.dim())) if per_instance else [0] + list(range(2, input.dim()))
    mean = input.mean(dims, keepdim=True)
    var = input.var(dims, correction=0, keepdim=True)
    out = affine((input - mean) * torch.rsqrt(var + eps), weight, bias, shape)
    if not observe:
        return out, None
    n = values_per_channel(input, per_instance)
    flat = [-1, input.size(1)]
    unbiased = var * (n / max(n - 1, 1))
    return out, Observed(mean.reshape(flat).mean(0), unbiased.reshape(flat).mean(0))


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` with plain tensor ops."""
    dims = list(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    var = input.var(dims, correction=0, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.group_norm`` with plain tensor ops."""
    grouped = input.reshape(input.size(0), num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    var = grouped.var(-1, correction=0, keepdim=True)
    out = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    return affine(out, weight, bias, channel_shape(input))


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """``F.rms_norm`` with plain tensor ops."""
    dims = list(range(-len(normalized_shape), 0))
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    out = input * torch.rsqrt(input.pow(2).mean(dims, keepdim=True) + eps)
    return out * weight if weight is not None else out
