"""Every input check of fparams, and its wording, in one place.

One rule throughout: :class:`~fparams.FparamsTypeError` (a ``TypeError``) for a
value of the wrong type, :class:`~fparams.FparamsValueError` (a ``ValueError``)
for a value of the right type that is out of range or does not fit. A message
names the argument in backticks, shows what was given and says what would work;
the public function's name (``fparams.<name>:``) is put in front of it once, by
:func:`fparams._errors.public` at the boundary, never threaded through here. Missing and extra
dict keys are always worded like ``torch.func``'s strict checks, sorted:
``Missing key(s): 'a', 'b'. Unexpected key(s): 'c'.``

Tensors are never read back into Python here: a tensor hyperparameter may be a
learned value inside ``torch.func.grad`` or ``vmap``, where reading it (``float()``,
``.item()``, an ``if`` on its value) is impossible or would cut the meta-gradient.
Only Python numbers are range-checked.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Collection, Mapping, Optional, Tuple, Type, TypeVar, Union

import torch
from torch import Tensor

from ._errors import _INTERNAL, FparamsTypeError, FparamsValueError
from ._torch_compat import caller_frame

#: A hyperparameter: a number, or a tensor (which may require grad).
Hyper = Union[float, Tensor]


def describe(value: object) -> str:
    """``"int 3"``, ``"str 'a'"``, ``"Tensor"``: what a message shows of a wrong value."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def key_mismatch(given: Collection[str], expected: Collection[str]) -> str:
    """``"Missing key(s): 'a'. Unexpected key(s): 'b'."``, sorted, for error messages."""
    return keys_text([k for k in expected if k not in given], [k for k in given if k not in expected])


def keys_text(missing: Collection[str], unexpected: Collection[str]) -> str:
    """The one wording of a key mismatch, each list sorted; empty lists are left out."""
    parts = []
    if missing:
        parts.append("Missing key(s): " + ", ".join(repr(k) for k in sorted(missing)) + ".")
    if unexpected:
        parts.append("Unexpected key(s): " + ", ".join(repr(k) for k in sorted(unexpected)) + ".")
    return " ".join(parts)


def check_dict(arg: str, value: object) -> None:
    """``TypeError`` unless ``value`` is a mapping (of names to tensors)."""
    if not isinstance(value, Mapping):
        raise FparamsTypeError(
            f"`{arg}` must be a dict of tensors keyed by name; got "
            f"{type(value).__name__}. Use fparams.split(module) to get one."
        )


def check_keys(
    arg: str,
    given: Collection[str],
    expected: Collection[str],
    *,
    missing_ok: bool = False,
    unexpected_ok: bool = False,
    fix: str = "",
) -> None:
    """``ValueError`` where ``given`` lacks keys of ``expected`` or has others (unless allowed)."""
    missing = [] if missing_ok else [k for k in expected if k not in given]
    unexpected = [] if unexpected_ok else [k for k in given if k not in expected]
    if missing or unexpected:
        raise FparamsValueError(
            f"`{arg}` does not have the expected keys. {keys_text(missing, unexpected)}"
            + (f" {fix}" if fix else "")
        )


def check_shapes(arg: str, given: Mapping[str, object], params: Mapping[str, Tensor]) -> None:
    """Every value of ``given`` is a tensor of exactly its parameter's shape (no silent broadcasting)."""
    for k, t in given.items():
        if not isinstance(t, Tensor):
            raise FparamsTypeError(
                f"`{arg}[{k!r}]` is a {type(t).__name__}; give a tensor (or leave the key out)."
            )
        if t.shape != params[k].shape:
            raise FparamsValueError(
                f"`{arg}[{k!r}]` has shape {tuple(t.shape)} but the parameter has shape "
                f"{tuple(params[k].shape)}."
            )


def check_hyper(name: str, value: object, high: float = math.inf, high_closed: bool = False
) -> None:
    """``TypeError`` unless ``value`` is a number or a tensor; ``ValueError`` unless a number is
    finite and in ``[0, high)`` (``[0, high]`` with ``high_closed``)."""
    if isinstance(value, Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FparamsTypeError(f"`{name}` must be a number or a tensor; got {describe(value)}.")
    number = float(value)  # a Python number, never a tensor
    below = number <= high if high_closed else number < high
    if 0 <= number and below and math.isfinite(number):
        return
    valid = "a finite number >= 0" if math.isinf(high) else f"in [0, {high:g}{']' if high_closed else ')'}"
    raise FparamsValueError(f"`{name}` must be {valid}; got {value!r}.")


def check_lr(lr: object, *, optimizer_ok: bool = False, per_step_ok: bool = False
) -> Optional[Mapping[str, Hyper]]:
    """The one learning-rate rule: a finite number >= 0, a tensor, or a dict of those per name.

    Returns the dict of per-name rates, or None for one shared rate. Which
    names a dict must cover is the caller's to check (:func:`check_rate_keys`).
    ``optimizer_ok`` and ``per_step_ok`` only add what else the caller accepts
    (an optimizer, a list of per-step rates) to the message; the caller
    handles those before calling this on a rate.
    """
    if isinstance(lr, Mapping):
        for k, v in lr.items():
            check_hyper(f"lr[{k!r}]", v)
        return lr
    if isinstance(lr, Tensor) or (isinstance(lr, numbers.Real) and not isinstance(lr, bool)):
        check_hyper("lr", lr)
        return None
    kinds = ["a number", "a tensor", "a dict of per-parameter rates"]
    kinds += ["a list of per-step rates"] * per_step_ok + ["an fparams.optim optimizer"] * optimizer_ok
    listed = ", ".join(kinds[:-1]) + " or " + kinds[-1]
    raise FparamsTypeError(f"`lr` must be {listed}; got {describe(lr)}.")


def check_rate_keys(lr: Mapping[str, object], names: Collection[str], all_names: Collection[str]
) -> None:
    """A dict of rates has a rate for each of ``names``, and no key outside ``all_names``."""
    missing = [k for k in names if k not in lr]
    unknown = [k for k in lr if k not in all_names]
    if missing or unknown:
        raise FparamsValueError(
            f"`lr` is a dict of per-parameter rates but does not fit the params. "
            f"{keys_text(missing, unknown)} Give one rate per parameter that gets a gradient."
        )


def check_rate_shapes(lr: object, params: Mapping[str, Tensor]) -> None:
    """A tensor learning rate must broadcast to each parameter's shape without changing it."""
    for k, p in params.items():
        rate = lr[k] if isinstance(lr, Mapping) else lr
        if isinstance(rate, Tensor) and not _keeps_shape(rate.shape, p.shape):
            raise FparamsValueError(
                f"the learning rate for {k!r} has shape {tuple(rate.shape)}, which would "
                f"change the parameter's shape {tuple(p.shape)}; give a scalar or a tensor of the "
                f"parameter's shape."
            )


def _keeps_shape(rate: torch.Size, shape: torch.Size) -> bool:
    try:
        return bool(torch.Size(torch.broadcast_shapes(rate, shape)) == shape)  # type: ignore[no-untyped-call]
    except RuntimeError:  # not broadcastable at all
        return False


def check_flag(name: str, value: object) -> None:
    """``TypeError`` unless ``value`` is a ``bool`` (flags pick code paths, so no tensors)."""
    if not isinstance(value, bool):
        raise FparamsTypeError(f"`{name}` must be True or False; got {describe(value)}.")


def check_betas(betas: object) -> Tuple[Hyper, Hyper]:
    """A pair of hyperparameters, each in ``[0, 1)``."""
    if not isinstance(betas, (tuple, list)):
        raise FparamsTypeError(
            f"`betas` must be a pair (beta1, beta2) of numbers or tensors; got {describe(betas)}."
        )
    if len(betas) != 2:
        raise FparamsValueError(
            f"`betas` must be a pair (beta1, beta2) of numbers or tensors; got {len(betas)} values."
        )
    for i, beta in enumerate(betas):
        check_hyper(f"betas[{i}]", beta, high=1.0)
    return betas[0], betas[1]


def check_int(name: str, value: object, low: int, *, none_ok: bool = False) -> None:
    """``TypeError`` unless ``value`` is an int (or ``None``, with ``none_ok``);
    ``ValueError`` below ``low``."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        also = " or None" if none_ok else ""
        raise FparamsTypeError(f"`{name}` must be an int{also}; got {describe(value)}.")
    if value < low:
        raise FparamsValueError(f"`{name}` must be an int >= {low}; got {value!r}.")


def check_positive(name: str, value: object) -> None:
    """``TypeError`` unless ``value`` is a number; ``ValueError`` unless it is finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FparamsTypeError(f"`{name}` must be a number; got {describe(value)}.")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise FparamsValueError(f"`{name}` must be a finite number > 0; got {value!r}.")


def check_choice(name: str, value: object, choices: Tuple[str, ...]) -> None:
    """``TypeError`` unless ``value`` is a string; ``ValueError`` unless it is one of ``choices``."""
    if not isinstance(value, str):
        raise FparamsTypeError(f"`{name}` must be one of {choices}; got {describe(value)}.")
    if value not in choices:
        raise FparamsValueError(f"`{name}` must be one of {choices}; got {value!r}.")


def check_callable(name: str, value: object, what: str) -> None:
    """``TypeError`` unless ``value`` is callable; ``what`` shows its expected signature."""
    if not callable(value):
        raise FparamsTypeError(f"`{name}` must be a callable {what}; got {type(value).__name__}.")


def check_instance(name: str, value: object, kind: Type[Any], what: str) -> None:
    """``TypeError`` unless ``value`` is a ``kind`` (``what`` names it in the message)."""
    if not isinstance(value, kind):
        raise FparamsTypeError(f"`{name}` must be {what}; got {type(value).__name__}.")


def check_state(state: object, kind: Type[Any]) -> None:
    """``TypeError`` unless ``state`` is the NamedTuple that this transform's ``init`` returns."""
    if not isinstance(state, kind):
        raise FparamsTypeError(
            f"`state` must be the {kind.__name__} that this transform's init() returned; "
            f"got {type(state).__name__}."
        )


F = TypeVar("F", bound=Callable[..., Any])


def warn_in_user_code(message: str, category: Type[Warning]) -> None:
    """``warnings.warn`` attributed to the innermost frame outside fparams and torch.

    A fixed ``stacklevel`` breaks as soon as a wrapper (such as
    :func:`fparams._errors.public`) or another internal call adds a frame; this
    counts the frames instead, so the warning names the user's line.
    """
    frame = caller_frame(1)  # the caller: stacklevel 2
    level = 2
    while frame is not None and frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


# --- core ---


def check_tensors(arg: str, tensors: Mapping[str, object], *, floating: bool = False) -> None:
    """``TypeError`` unless every value of ``tensors`` is a tensor (floating point or complex,
    with ``floating``: what parameters must be)."""
    for k, t in tensors.items():
        if not isinstance(t, Tensor):
            raise FparamsTypeError(
                f"`{arg}[{k!r}]` is {describe(t)}; every value must be a tensor. "
                f"Use fparams.split(module) to get the dicts."
            )
        if floating and not (t.is_floating_point() or t.is_complex()):
            raise FparamsTypeError(
                f"`{arg}[{k!r}]` is a tensor of dtype {t.dtype}; parameters must be floating point "
                f"(or complex) tensors. Convert it (`.float()`), or pass it as a buffer."
            )


def check_castable(arg: str, given: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """``TypeError`` where a value of ``given`` cannot be cast to its parameter's dtype without
    losing its kind (a float update into an integer parameter, a complex one into a real one)."""
    for k, t in given.items():
        p = params[k]
        if t.dtype != p.dtype and not torch.can_cast(t.dtype, p.dtype):
            raise FparamsTypeError(
                f"`{arg}[{k!r}]` has dtype {t.dtype}, which cannot be cast to its parameter's dtype "
                f"{p.dtype}; parameters keep their dtype, so give values of a dtype of the same kind."
            )


#: The smallest largest-finite-value of torch's floating dtypes: a rate below it fits them all.
SMALLEST_MAX = min(torch.finfo(d).max for d in (torch.float16, torch.bfloat16, torch.float32)) / 2


def rate_may_overflow(lr: object) -> bool:
    """Could a Python-number rate (or a dict holding one) overflow some floating dtype?"""
    values = lr.values() if isinstance(lr, Mapping) else (lr,)
    return any(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and abs(float(v)) > SMALLEST_MAX
        for v in values
    )


def check_rate_fits(lr: object, params: Mapping[str, Tensor], arg: str = "lr") -> None:
    """``ValueError`` where a rate given as a Python number overflows the dtype of a parameter it
    scales (``1e39`` in float32 would turn every updated weight into inf or NaN)."""
    if not rate_may_overflow(lr):
        return
    rates = lr if isinstance(lr, Mapping) else None
    for k, p in params.items():
        rate = rates.get(k) if rates is not None else lr
        if isinstance(rate, Tensor) or not isinstance(rate, numbers.Real) or not p.is_floating_point():
            continue
        top = torch.finfo(p.dtype).max
        if abs(float(rate)) > top:
            name = arg if rates is None else f"{arg}[{k!r}]"
            raise FparamsValueError(
                f"`{name}` is {rate!r}, which overflows {p.dtype}, the dtype of parameter {k!r} "
                f"(largest finite value {top:.4g}); give a rate that fits the parameters' dtype."
            )
