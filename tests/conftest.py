"""Shared test settings and helpers."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fparams",
    deadline=None,
    max_examples=int(os.environ.get("FPARAMS_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("fparams")

torch.set_num_threads(min(2, torch.get_num_threads()))
