"""``fparams.summary``: a dict of tensors as a table of names, shapes, dtypes, grads and devices."""

from __future__ import annotations

import pytest
import torch

import fparams


def test_rows_and_totals() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.BatchNorm1d(40), torch.nn.Linear(40, 1))
    _, params, buffers = fparams.split(net)
    table = fparams.summary(params)
    assert [row[0] for row in table.rows] == list(params)
    assert table.rows[0] == ("0.weight", "(40, 1)", "float32", "True", "cpu")
    assert table.numel == sum(p.numel() for p in params.values()) == 201
    lines = repr(table).splitlines()
    assert lines[0].split() == ["name", "shape", "dtype", "requires_grad", "device"]
    assert lines[-1] == "6 tensors, 201 elements, 804 B"
    assert len(lines) == 8  # header, six tensors, totals: no values
    buffer_rows = {row[0]: row for row in fparams.summary(buffers).rows}
    assert buffer_rows["1.num_batches_tracked"][2:4] == ("int64", "False")
    assert "<table>" in table._repr_html_() and "804 B" in table._repr_html_()


def test_sizes_and_one_tensor() -> None:
    table = fparams.summary({"w": torch.zeros(1000, 1000, dtype=torch.float64)})
    assert table.total() == "1 tensor, 1,000,000 elements, 8.0 MB"
    assert fparams.summary({}).total() == "0 tensors, 0 elements, 0 B"


def test_rejects_what_is_not_a_dict_of_tensors() -> None:
    with pytest.raises(TypeError, match=r"fparams.summary: `tensors` must be a dict of tensors.*got list"):
        fparams.summary([torch.zeros(1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"these keys do not: 'a', 'b'"):
        fparams.summary({"b": 1, "a": None, "c": torch.zeros(1)})  # type: ignore[dict-item]
