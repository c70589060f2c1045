"""fparams: functional parameters for PyTorch meta-learning.

A module is split into an architecture and explicit parameter and buffer
dicts; cloning, detaching and updating are pure dict transforms run through
``torch.func.functional_call``. learn2learn's module API is kept as thin shims.
"""

# Submodules with names of their own: fparams.optim.adam, fparams.distributed.shard_tasks.
from . import (
    datasets as datasets,  # --- docs ---: task samplers, fparams.datasets.sine_tasks
    distributed as distributed,
    implicit as implicit,
    optim as optim,
)
from ._call import Architecture, split
from ._compile import CompileFallbackWarning, compile_fallback as compile
from ._dice import magic_box
from ._errors import FparamsError, FparamsRuntimeError, FparamsTypeError, FparamsValueError
from ._inner import adapt
from ._maml import MAML, MetaSGD
from ._module_api import (
    clone_distribution,
    clone_module,
    clone_named_parameters,
    clone_parameters,
    detach_distribution,
    detach_module,
    maml_update,
    meta_sgd_update,
    update_module,
)
from ._norms import exact_norms
from ._summary import Summary, summary
from ._tasks import VmapFallbackWarning, map_tasks, meta_value_and_grad, pad_tasks, stack_tasks
from ._transforms import (
    apply_updates,
    clone,
    combine,
    detach,
    map_params,
    partition,
    sgd_step,
    zeros_like,
)
from ._types import LR, Buffers, Filter, Grads, Params, Updates
from ._version import __version__

__all__ = [
    "LR",
    "MAML",
    "Architecture",
    "CompileFallbackWarning",
    "FparamsError",
    "FparamsRuntimeError",
    "FparamsTypeError",
    "FparamsValueError",
    "MetaSGD",
    "Buffers",
    "Filter",
    "Grads",
    "Params",
    "Summary",
    "Updates",
    "VmapFallbackWarning",
    "__version__",
    "adapt",
    "apply_updates",
    "clone",
    "clone_distribution",
    "clone_module",
    "clone_named_parameters",
    "clone_parameters",
    "combine",
    "compile",
    "detach",
    "detach_distribution",
    "detach_module",
    "exact_norms",
    "magic_box",
    "maml_update",
    "map_params",
    "map_tasks",
    "meta_sgd_update",
    "meta_value_and_grad",
    "pad_tasks",
    "partition",
    "sgd_step",
    "split",
    "stack_tasks",
    "summary",
    "update_module",
    "zeros_like",
]

# --- adapt ---
from ._inner import Adapted, AdaptedAux, AdaptedState  # noqa: E402

__all__ += ["Adapted", "AdaptedAux", "AdaptedState"]
