"""Test configuration: hypothesis profiles and the CUDA marker.

Profiles (choose with ``HYPOTHESIS_PROFILE``):
  ci   bounded example count, no deadline, derandomized (the same examples on every run, so a CI
       failure reproduces locally with the same command). The default.
  dev  many more examples with a random seed; hypothesis prints the seed and a reproduction blob on
       failure.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One intra-op thread: float convolutions' reduction order (and so their last bits) depends on the
# thread count, and on a loaded 2-core machine one thread is also much faster for these small shapes.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
