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

# One intra-op thread: the tensors in these tests are tiny, and on 2 shared
# cores a second thread made BatchNorm and LSTM tests up to 100x slower.
torch.set_num_threads(1)
