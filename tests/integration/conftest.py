"""One local Ray cluster for the whole integration session (starting one takes seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    from actors.runtime import init_ray

    init_ray(num_cpus=4, object_store_mb=512)
    yield
    ray.shutdown()
