"""Unit tests run without Ray: a test that starts it fails."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_ray() -> Iterator[None]:
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        pytest.fail("a unit test started Ray; unit tests cover the pure core only")
