"""``fparams.summary``: a params or buffers dict as a table of shapes, not of values."""

from __future__ import annotations

import html
from typing import List, Mapping, Tuple

from torch import Tensor

from ._errors import FparamsTypeError, public

_COLUMNS = ("name", "shape", "dtype", "requires_grad", "device")


class Summary:
    """The table :func:`summary` returns: text in a terminal, an HTML table in Jupyter.

    ``rows`` holds one ``(name, shape, dtype, requires_grad, device)`` tuple of
    strings per tensor; ``numel`` and ``nbytes`` are the totals.

    Examples:
        >>> import torch, fparams
        >>> table = fparams.summary({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
        >>> table.rows[0]
        ('w', '(3, 4)', 'float32', 'False', 'cpu')
        >>> table.total()
        '2 tensors, 16 elements, 64 B'
    """

    def __init__(self, rows: List[Tuple[str, str, str, str, str]], numel: int, nbytes: int):
        self.rows = rows
        self.numel = numel
        self.nbytes = nbytes

    def total(self) -> str:
        count = len(self.rows)
        return f"{count} tensor{'s' if count != 1 else ''}, {self.numel:,} elements, {_size(self.nbytes)}"

    def __repr__(self) -> str:
        table = [_COLUMNS, *self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        return "\n".join([*lines, self.total()])

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in self.rows
        )
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p>{html.escape(self.total())}</p>"
        )


def _size(nbytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


@public("summary")
def summary(tensors: Mapping[str, Tensor]) -> Summary:
    """A table of a params or buffers dict: name, shape, dtype, requires_grad and device per
    tensor, then the number of tensors, elements and bytes.

    A dict of tensors prints every value; this prints what you usually want to
    see. In Jupyter the result shows as an HTML table.

    Examples:
        >>> import torch, fparams
        >>> _, params, _ = fparams.split(torch.nn.Linear(3, 2))
        >>> fparams.summary(params)
        name    shape   dtype    requires_grad  device
        weight  (2, 3)  float32  True           cpu
        bias    (2,)    float32  True           cpu
        2 tensors, 8 elements, 32 B
    """
    if not isinstance(tensors, Mapping):
        raise FparamsTypeError(
            f"`tensors` must be a dict of tensors, such as the params or buffers "
            f"of fparams.split(module); got {type(tensors).__name__}."
        )
    wrong = sorted(str(k) for k, v in tensors.items() if not isinstance(v, Tensor))
    if wrong:
        raise FparamsTypeError(
            f"`tensors` must hold tensors only; these keys do not: "
            f"{', '.join(repr(k) for k in wrong)}."
        )
    rows = [
        (
            str(name),
            str(tuple(t.shape)),
            str(t.dtype).replace("torch.", ""),
            str(t.requires_grad),
            str(t.device),
        )
        for name, t in tensors.items()
    ]
    numel = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return Summary(rows, numel, nbytes)
