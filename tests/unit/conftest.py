"""Unit tests run without Ray: starting it here raises (see ``tests.pure``)."""

from tests.pure import refuse_ray  # noqa: F401  (an autouse fixture)
