"""The guard of the pure suites (unit, property): any start of Ray fails the test.

``ray.init`` is replaced for the whole package, so an explicit start and Ray's automatic one
(the first ``.remote()`` call, which goes through ``ray.init``) both raise. ``make test`` runs
these suites in their own pytest process, before the integration and e2e suites start their
cluster, so a unit test can never lean on a cluster that happens to be up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest


class RayStartedError(RuntimeError):
    """A pure test tried to start Ray."""


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise RayStartedError("a unit or property test started Ray: these cover the pure core only")


@pytest.fixture(autouse=True, scope="package")
def refuse_ray() -> Iterator[None]:
    import ray

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", _refuse)
        yield


#: ``make check``: the fast inner loop (long statistical tests are left to ``make test``)
QUICK = os.environ.get("KAIROS_QUICK_TESTS") == "1"


def examples(n: int) -> int:
    """``n`` Hypothesis examples in the whole suite; a fifth (at least 10) in ``make check``,
    which sets KAIROS_QUICK_TESTS=1 to stay under a minute."""
    if QUICK:
        return max(10, n // 5)
    return n
