"""Test configuration: bounded, deadline-free hypothesis profiles.

``HYPOTHESIS_PROFILE=ci`` (the default) draws few, derandomized examples so CI time is
bounded and repeatable; ``HYPOTHESIS_PROFILE=dev`` searches harder.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

if not torch.cuda.is_available():
    # The fused Triton kernel (backend="triton") is checked through Triton's CPU interpreter,
    # which must be chosen before the kernel is defined (on its first call).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """The hub tests' saved folders (tests/hub_saved.py), built once for every hub test module."""
    from hub_saved import build_saved

    return build_saved(tmp_path_factory)
