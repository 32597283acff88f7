"""Test configuration: hypothesis profiles and the markers' skip logic.

Profiles: "dev" (default, 50 examples), "ci" (chosen when CI=true: derandomized, 50 examples, no
deadline, so CI runs are reproducible), "thorough" (HYPOTHESIS_PROFILE=thorough, 500 examples).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption("--write-bugs-page", action="store_true", default=False,
                     help="tests/test_bugs.py: rewrite docs/bugs.md from lora_ref/kit/bugs.py before checking it")


def _gpu_skip_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install 'lora-ref[gpu]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy is installed but no CUDA GPU is visible"
    except Exception as exc:  # noqa: BLE001 - any driver failure means no usable GPU
        return f"CuPy is installed but no usable CUDA GPU was found ({exc})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or _gpu_skip_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
