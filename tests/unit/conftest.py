"""Unit tests run without Ray: a unit test that starts it fails."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@pytest.fixture(autouse=True)
def _no_ray() -> Iterator[None]:
    # the integration suite's session cluster may already be up; starting one here is the fault
    was_up = _ray_up()
    yield
    if not was_up and _ray_up():
        pytest.fail("a unit test started Ray; unit tests cover the pure core only")
