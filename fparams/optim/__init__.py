"""Pure, differentiable optimizers over parameter dicts, in the optax style.

An optimizer is a :class:`GradientTransformation`, a pair of pure functions:
``init(params) -> state`` and ``update(grads, state, params=None) -> (updates,
new_state)``. A named optimizer's state has named fields that do not depend
on the hyperparameters' values (``state.adam.mu``); optimizers print as the
call that built them, and states as names and shapes. The updates are added
with ``fparams.apply_updates``; nothing is changed in place, so inner loops
can be differentiated (``torch.func.grad``), batched over tasks
(``torch.func.vmap``) and compiled (``torch.compile``).
Hyperparameters may be tensors that require grad and receive meta-gradients.

Examples:
    >>> import torch, fparams.optim
    >>> lr = torch.tensor(0.1, requires_grad=True)
    >>> opt = fparams.optim.adam(lr=lr)
    >>> params = {"w": torch.tensor([1.0, 2.0])}
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...     grads = torch.func.grad(lambda p: (p["w"] ** 2).sum())(params)
    ...     updates, state = opt.update(grads, state, params)
    ...     params = fparams.apply_updates(params, updates)
    >>> (params["w"] ** 2).sum().backward()
    >>> lr.grad
    tensor(-14.3107)
"""

from ._alias import AdamState, AdamWState, RmspropState, SgdState, adam, adamw, higher_adam, rmsprop, sgd
from ._alias_torch import (
    AdadeltaState,
    AdafactorState,
    AdagradState,
    AdamaxState,
    AsgdState,
    NadamState,
    RadamState,
    RpropState,
    adadelta,
    adafactor,
    adagrad,
    adamax,
    asgd,
    nadam,
    radam,
    rprop,
)
from ._base import (
    CountState,
    EmptyState,
    GradientTransformation,
    Hyper,
    InitFn,
    OptState,
    Rate,
    Schedule,
    Scheduled,
    UpdateFn,
)
from ._groups import (
    MultiTransformState,
    clip_grad_norm,
    clip_grad_value,
    map_grads,
    multi_transform,
    partition,
)
from ._interop import from_torch, from_torch_state, to_torch_state
from ._moments import ScaleByAdamState, ScaleByRmsState, TraceState, scale_by_adam, scale_by_rms, trace
from ._transforms import add_decayed_weights, chain, identity, named_chain, scale_by_learning_rate

__all__ = [
    "AdadeltaState",
    "AdafactorState",
    "AdagradState",
    "AdamaxState",
    "AsgdState",
    "CountState",
    "MultiTransformState",
    "clip_grad_norm",
    "from_torch",
    "map_grads",
    "from_torch_state",
    "to_torch_state",
    "clip_grad_value",
    "multi_transform",
    "partition",
    "NadamState",
    "RadamState",
    "RpropState",
    "Rate",
    "Schedule",
    "Scheduled",
    "adadelta",
    "adafactor",
    "adagrad",
    "adamax",
    "asgd",
    "nadam",
    "radam",
    "rprop",
    "AdamState",
    "AdamWState",
    "EmptyState",
    "GradientTransformation",
    "Hyper",
    "InitFn",
    "OptState",
    "RmspropState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "SgdState",
    "TraceState",
    "UpdateFn",
    "adam",
    "adamw",
    "add_decayed_weights",
    "chain",
    "identity",
    "named_chain",
    "higher_adam",
    "rmsprop",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "sgd",
    "trace",
]

from ._saved import allow_states_in_torch_load as _allow_states

_allow_states()
