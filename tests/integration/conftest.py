"""Integration tests share the session's local Ray cluster (``ray_cluster`` in tests/conftest)."""
