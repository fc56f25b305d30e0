"""Kairos's own metrics, through ``ray.util.metrics``.

Every process that records them (gateway, shard actors, ranker replicas) exports them on its
node's metrics endpoint (``ray start --metrics-export-port``), next to Ray's own; Prometheus
scrapes that and the Ray dashboard's Metrics view shows them. Ray prefixes each name with
``ray_``: ``kairos_events_ingested_total`` is scraped as ``ray_kairos_events_ingested_total``.

Metric objects are created lazily, once per process: a module that is merely imported (a
unit test, the CLI) registers nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

#: latency buckets in ms, from sub-millisecond calls to slow micro-batches
LATENCY_BUCKETS_MS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3]


class Metrics:
    """The metric objects of one process."""

    def __init__(self) -> None:
        self.ingested = Counter(
            "kairos_events_ingested_total",
            description="Events accepted by the gateway, by kind.",
            tag_keys=("kind",),
        )
        self.rejected = Counter(
            "kairos_events_rejected_total",
            description="Events rejected (dead-lettered), by kind ('unknown' when unreadable).",
            tag_keys=("kind",),
        )
        self.failed = Counter(
            "kairos_events_failed_total",
            description="Events of shard steps that failed, dead-lettered whole with the error, "
            "by kind.",
            tag_keys=("kind",),
        )
        self.triggers = Counter(
            "kairos_triggers_total", description="Triggers fired, by rule.", tag_keys=("rule",)
        )
        self.decisions = Counter(
            "kairos_decisions_total",
            description="Decisions, by chosen action (an offer or NO_ACTION) and policy reason.",
            tag_keys=("offer", "reason"),
        )
        self.micro_batch_ms = Histogram(
            "kairos_micro_batch_latency_ms",
            description="Micro-batch latency, router in to triggers out.",
            boundaries=LATENCY_BUCKETS_MS,
        )
        self.queue_depth = Gauge(
            "kairos_shard_queue_depth",
            description="Micro-batch calls in flight per shard (bounded by backpressure).",
            tag_keys=("shard",),
        )
        self.pending = Gauge(
            "kairos_shard_pending_events",
            description="Events a shard holds until the watermark passes them.",
            tag_keys=("shard",),
        )
        self.ranker_ms = Histogram(
            "kairos_ranker_latency_ms",
            description="Ranker request latency seen by a shard (one request per micro-batch).",
            boundaries=LATENCY_BUCKETS_MS,
        )

    def count(self, counter: Counter, by: Mapping[str, int], tag: str) -> None:
        for value, n in by.items():
            if n:
                counter.inc(n, tags={tag: value})

    def count_pairs(self, counter: Counter, by: Mapping[tuple[str, ...], int], tags: Any) -> None:
        for values, n in by.items():
            if n:
                counter.inc(n, tags=dict(zip(tags, values, strict=True)))


@cache
def metrics() -> Metrics:
    """This process's metric objects."""
    return Metrics()
