"""Helpers shared by the test files."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor


def assert_dicts_close(a: Mapping[str, Tensor], b: Mapping[str, Tensor], **tol: float) -> None:
    """Same keys, and every pair of tensors close (``torch.testing.assert_close``)."""
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)
