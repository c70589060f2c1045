"""Turn the user-facing :data:`~fparams._types.Filter` forms into a predicate."""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, List, Mapping, Union

from torch import Tensor

from ._errors import FparamsTypeError, FparamsValueError
from ._types import Filter

Predicate = Callable[[str, Tensor], bool]
_Pattern = Union[str, "re.Pattern[str]"]


def _matches(pattern: _Pattern, name: str) -> bool:
    if isinstance(pattern, str):
        return name == pattern or fnmatch.fnmatchcase(name, pattern)
    return pattern.search(name) is not None


def _patterns(filter: Filter) -> List[_Pattern]:
    if isinstance(filter, (str, re.Pattern)):
        return [filter]
    try:
        items = list(filter)  # type: ignore[arg-type]
    except TypeError:
        raise FparamsTypeError(
            f"`filter` must be a glob string, a compiled regex, an iterable "
            f"of those, or a predicate fn(name, tensor) -> bool; got "
            f"{type(filter).__name__}."
        ) from None
    for item in items:
        if not isinstance(item, (str, re.Pattern)):
            raise FparamsTypeError(
                f"every entry of `filter` must be a glob string or a compiled "
                f"regex; got {item!r} of type {type(item).__name__}."
            )
    return items


def mask(tensors: Mapping[str, Tensor], filter: Filter) -> List[bool]:
    """One bool per entry of ``tensors`` (in order): does ``filter`` select it?

    A string or regex that selects no name at all is almost always a typo, so
    it raises ``ValueError`` listing the names that exist.
    """
    if callable(filter) and not isinstance(filter, re.Pattern):
        return [bool(filter(name, t)) for name, t in tensors.items()]
    patterns = _patterns(filter)
    names = list(tensors)
    unused = [p for p in patterns if not any(_matches(p, n) for n in names)]
    if unused:
        shown = ", ".join(repr(getattr(p, "pattern", p)) for p in unused)
        raise FparamsValueError(
            f"filter pattern(s) {shown} match no name; the names are "
            f"{sorted(names)}. Fix the pattern: strings are globs ('head.*'); for a regular "
            f"expression pass re.compile(...)."
        )
    return [any(_matches(p, n) for p in patterns) for n in names]
