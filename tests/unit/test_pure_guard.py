"""The pure suites' guard works: starting Ray in a unit test raises."""

from __future__ import annotations

import pytest

from tests.pure import RayStartedError


def test_starting_ray_in_a_unit_test_raises() -> None:
    import ray

    with pytest.raises(RayStartedError):
        ray.init(num_cpus=1)


def test_an_actor_call_that_would_start_ray_raises() -> None:
    import ray

    if ray.is_initialized():  # only when the whole suite runs in one process
        pytest.skip("a cluster is up in this process")

    @ray.remote
    def f() -> int:
        return 1

    with pytest.raises(RayStartedError):
        f.remote()
