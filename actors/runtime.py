"""Starting and joining Ray with the settings this machine and CI need."""

from __future__ import annotations

import logging
import os
import resource

import ray


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
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(
            address="local",  # embedded: a cluster of our own, never someone else's
            num_cpus=num_cpus,
            object_store_memory=object_store_mb << 20,
            include_dashboard=dashboard,
            _metrics_export_port=metrics_export_port,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
