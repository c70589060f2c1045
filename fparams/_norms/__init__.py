"""Normalization layers written with ordinary tensor ops, exact under vmap.

torch's batching rules for the native ``batch_norm`` / ``layer_norm`` kernels
give silently wrong *second-order* gradients when a parameterised layer comes
before the normalization (about 1% relative error in float64 on Linear ->
BatchNorm1d -> ReLU -> Linear with one inner step), while the same maths
written with ``mean`` / ``var`` / ``rsqrt`` is exact under vmap. The closest
upstream report is https://github.com/pytorch/functorch/issues/534 (the
batching rule of the layer_norm and batch_norm backward is incorrect for
``grad_input``), open at the time of writing. ``tests/test_norms.py`` keeps
strict xfail canaries on raw ``torch.func``: when torch fixes this, they fail
and say so.

Three parts, one file each:

* ``functions.py``: the normalization functions, pure tensor ops (``channel_norm``
  for batch and instance normalization, ``layer_norm`` ...);
* ``journal.py``: :class:`StatsJournal`, which updates running statistics,
  tracks them over a loop of tasks and rolls them back when two tasks share one;
* ``mode.py``: :class:`exact_norms`, a thin ``TorchFunctionMode`` that
  dispatches to them while a ``vmap`` runs (torch's fused kernels otherwise).

It changes no module and no global function; leaving the ``with`` block
restores everything. ``map_tasks`` runs under it. With ``batch_stats=True``
batch normalization always uses the statistics of the batch at hand and
leaves running statistics (and ``num_batches_tracked``) untouched.
"""

from .functions import Observed, channel_norm, group_norm, layer_norm, rms_norm
from .journal import StatsJournal
from .mode import exact_norms, innermost_exact_norms

__all__ = [
    "Observed",
    "StatsJournal",
    "channel_norm",
    "exact_norms",
    "group_norm",
    "innermost_exact_norms",
    "layer_norm",
    "rms_norm",
]
