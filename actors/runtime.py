"""Starting and joining Ray with the settings this machine and CI need."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
from pathlib import Path

import ray

#: Allocator settings for the busy actors (shards, sinks). Each micro-batch allocates and frees
#: tens of MB of temporaries; by default glibc hands large blocks back to the kernel right away
#: (mmap/trim) and mimalloc (Arrow's pool) purges freed pages after 10 ms, so the next
#: micro-batch page-faults them in again: ~46,000 faults per million events per shard. Keeping
#: blocks up to 32 MB on the heap, trimming only beyond 256 MB free, and purging after 1 s of
#: idleness takes that to ~14,000 and a shard's CPU from 0.63-0.79 s to 0.61-0.68 s per million
#: events (docs/benchmarks.md). Memory is still returned when a shard goes idle.
#: glibc's part is set with ``mallopt`` (``tune_allocator``), mimalloc's through the environment
#: before pyarrow loads (``actors/__init__.py``): no ``runtime_env``, whose setup costs a new
#: worker 1-1.5 s here.
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "1000"}
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 << 20, 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h


#: where an embedded Ray listens
LOOPBACK = "127.0.0.1"


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int = 1024,
    dashboard: bool = False,
    metrics_export_port: int | None = None,
) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start an embedded local Ray.

    An embedded Ray gets an explicit object store size and no dashboard unless asked, so it
    starts in seconds on a small machine. Does nothing when Ray is already initialized.
    ``metrics_export_port`` fixes the port of the node's Prometheus endpoint (``/metrics``).

    An embedded Ray is closed to everyone else: its node address is 127.0.0.1 (Ray binds its
    GCS, raylet, object manager, workers and dashboard there, not on every interface) and it
    requires Ray's token: Ray 2.60 (pinned in pyproject.toml) turns token authentication on for
    a new local cluster unless ``RAY_AUTH_MODE`` says otherwise, and keeps the token in
    ``~/.ray/auth_token``; neither a driver nor the jobs API works without it. (Setting the
    variable here would be too late: Ray reads it when first imported.)
    """
    if ray.is_initialized():
        return
    tune_allocator()  # this process routes: it allocates and frees a batch's worth per call
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(
            address="local",  # embedded: a cluster of our own, never someone else's
            num_cpus=num_cpus,
            object_store_memory=object_store_mb << 20,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            _metrics_export_port=metrics_export_port,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        protect_token_file()


def protect_token_file() -> None:
    """Ray writes its token to ``~/.ray/auth_token`` readable by everyone on the machine
    (0644): make it the owner's alone, as any secret."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError:
        pass  # no token file (token auth off, or the token is in RAY_AUTH_TOKEN)


def tune_allocator() -> bool:
    """Keep glibc's freed blocks up to 32 MB on the heap and trim beyond 256 MB free, in this
    running process (a driver that routes, a shard or sink actor when it starts).

    ``mallopt`` acts now (the ``MALLOC_*_`` variables only at process start). Returns False
    where the C library is not glibc (nothing changes there).
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
