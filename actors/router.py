"""Router: ingest raw batches, cut them into per-shard micro-batches, call shards, collect.

Runs in the caller's process (driver, job or gateway). Each shard gets at most one call per
micro-batch; a micro-batch closes when it reaches ``micro_batch_max_events`` (or just before
the next routed batch would take it past that) or when it has been open
``micro_batch_deadline_ms``. A micro-batch is a list of the ingestor's per-shard batches, sent
as they are: the driver copies an event's payload once, when it routes it. At most
``max_in_flight_per_shard`` calls are in flight per shard: a router that gets ahead of a shard
waits for it (backpressure), so memory stays bounded. Trigger tables go from the shard straight
to the sink as object refs.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from engine.clock import Clock, SystemClock
from engine.decision.outcome import outcome_table
from engine.events.deadletter import DeadLetter, dead_letter_table
from engine.events.schema import compact
from engine.ingest import Ingestor
from engine.sink import ParquetSink

KEPT_LATENCIES = 100_000


def _pieces(part: pa.RecordBatch, limit: int) -> list[pa.RecordBatch]:
    """``part`` whole if it fits in a micro-batch, else cut into copies of ``limit`` rows (a
    slice would carry its parent's buffers to the shard)."""
    if part.num_rows <= limit:
        return [part]
    return [compact(part.slice(start, limit)) for start in range(0, part.num_rows, limit)]


@dataclass
class _Open:
    parts: list[pa.RecordBatch] = field(default_factory=list)
    rows: int = 0
    opened: float = 0.0


@dataclass
class _InFlight:
    stats_ref: ray.ObjectRef
    triggers_ref: ray.ObjectRef
    decisions_ref: ray.ObjectRef
    opened: float


@dataclass
class RouterStats:
    """Counters and micro-batch latencies (router in -> triggers out), in ms."""

    ingested: int = 0
    rejected: int = 0
    applied: int = 0
    duplicates: int = 0
    triggers: int = 0
    decisions: int = 0
    outcomes: int = 0
    micro_batches: int = 0
    triggers_by_rule: Counter[str] = field(default_factory=Counter)
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    #: the newest micro-batches' latencies (bounded: a service runs for months)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=KEPT_LATENCIES))
    #: per micro-batch with decisions: time the shard spent deciding (policy, ranker, choice)
    decide_ms: deque[float] = field(default_factory=lambda: deque(maxlen=KEPT_LATENCIES))

    def percentile(self, q: float, values: deque[float] | None = None) -> float:
        values = self.latencies_ms if values is None else values
        return float(np.percentile(np.fromiter(values, float), q)) if values else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ingested": self.ingested,
            "rejected": self.rejected,
            "applied": self.applied,
            "duplicates": self.duplicates,
            "triggers": self.triggers,
            "micro_batches": self.micro_batches,
            "triggers_by_rule": dict(self.triggers_by_rule),
            "p50_ms": self.percentile(50),
            "p99_ms": self.percentile(99),
            "decisions": self.decisions,
            "outcomes": self.outcomes,
            "decide_p50_ms": self.percentile(50, self.decide_ms),
            "decide_p99_ms": self.percentile(99, self.decide_ms),
        }


class Router:
    """Feeds shard actors with micro-batches and the sinks with their triggers and decisions."""

    def __init__(
        self,
        ingestor: Ingestor,
        shards: list[Any],
        sink: Any | None = None,
        clock: Clock | None = None,
        dead_letter_sink: ParquetSink | None = None,
        decision_sink: Any | None = None,
        outcome_sink: ParquetSink | None = None,
        observer: Callable[[int, dict[str, Any], float], None] | None = None,
    ) -> None:
        """``observer(shard, shard_stats, latency_ms)`` is told of every finished call."""
        self.ingestor = ingestor
        self.observer = observer
        self.decision_sink = decision_sink
        #: offer responses as they are ingested: what retraining joins the decision log with
        self.outcome_sink = outcome_sink
        self.settings = ingestor.settings
        self.shards = shards
        self.sink = sink
        self.clock = clock or SystemClock()
        self._open = [_Open() for _ in shards]
        self._in_flight: list[deque[_InFlight]] = [deque() for _ in shards]
        self.stats = RouterStats()
        #: the first dead letters, for display; all of them go to ``dead_letter_sink``
        self.dead_letters: list[DeadLetter] = []
        self._keep_dead_letters = 1_000
        self.dead_letter_sink = dead_letter_sink

    # -- input --------------------------------------------------------------------------------
    def submit(
        self, batch: pa.RecordBatch | pa.Table, positions: np.ndarray | list[int] | None = None
    ) -> list[DeadLetter]:
        """Ingest one raw batch; sends every micro-batch that fills up. Returns dead letters."""
        result = self.ingestor.ingest(batch, positions)
        self._record_rejects(result.dead_letters)
        self.stats.ingested += result.accepted
        if self.outcome_sink is not None and result.accepted:
            outcomes = outcome_table(result.routed)
            self.stats.outcomes += outcomes.num_rows
            self.outcome_sink.write(outcomes)
        now = self.clock.monotonic()
        limit = self.settings.micro_batch_max_events
        for shard, part in result.parts.items():
            if self._open[shard].rows and self._open[shard].rows + part.num_rows > limit:
                self._send(shard)  # close before it would overflow: parts travel whole
            for piece in _pieces(part, limit):
                buf = self._open[shard]
                if not buf.parts:
                    buf.opened = now
                buf.parts.append(piece)
                buf.rows += piece.num_rows
                if buf.rows >= limit:
                    self._send(shard)
        self._harvest(block=False)
        return result.dead_letters

    def reject(self, letters: list[DeadLetter]) -> None:
        """Dead-letter events rejected before ingest (unreadable lines of a file, say)."""
        self._record_rejects(letters)

    def _record_rejects(self, letters: list[DeadLetter]) -> None:
        self.stats.rejected += len(letters)
        for letter in letters:
            self.stats.rejected_by_reason[letter.reason.split(":")[0].split(" ")[0]] += 1
        room = self._keep_dead_letters - len(self.dead_letters)
        if room > 0:
            self.dead_letters.extend(letters[:room])
        if letters and self.dead_letter_sink is not None:
            self.dead_letter_sink.write(dead_letter_table(letters))

    def poll(self) -> None:
        """Send micro-batches whose deadline has passed; collect finished calls."""
        deadline = self.settings.micro_batch_deadline_ms / 1000
        now = self.clock.monotonic()
        for shard, buf in enumerate(self._open):
            if buf.parts and now - buf.opened >= deadline:
                self._send(shard)
        self._harvest(block=False)

    # -- shard calls --------------------------------------------------------------------------
    def _send(self, shard: int, final: bool = False) -> None:
        """Close shard's open micro-batch and call the shard (or flush it, at the end)."""
        buf = self._open[shard]
        queue = self._in_flight[shard]
        while len(queue) >= self.settings.max_in_flight_per_shard:
            self._finish(shard, queue.popleft())  # backpressure: wait for the oldest call
        batches = buf.parts  # whole routed batches, each owning its buffers: sent as they are
        opened = buf.opened if buf.parts else self.clock.monotonic()
        self._open[shard] = _Open()
        if final:  # end of stream: release everything still waiting for the watermark
            triggers_ref, decisions_ref, stats_ref = self.shards[shard].flush.remote()
        else:
            triggers_ref, decisions_ref, stats_ref = self.shards[shard].apply.remote(
                batches, self.ingestor.watermark_ms
            )
        queue.append(_InFlight(stats_ref, triggers_ref, decisions_ref, opened))

    def _finish(self, shard: int, call: _InFlight) -> None:
        stats = ray.get(call.stats_ref)
        latency_ms = (self.clock.monotonic() - call.opened) * 1000
        self.stats.latencies_ms.append(latency_ms)
        if self.observer is not None:
            self.observer(shard, stats, latency_ms)
        self.stats.micro_batches += 1
        self.stats.applied += stats["applied"]
        self.stats.duplicates += stats["duplicates"]
        self.stats.triggers += stats["triggers"]
        self.stats.triggers_by_rule.update(stats["triggers_by_rule"])
        self.stats.decisions += stats["decisions"]
        self.stats.decide_ms.extend(stats["decide_ms_parts"])
        if stats["triggers"] and self.sink is not None:
            self.sink.write.remote(call.triggers_ref)
        if stats["decisions"] and self.decision_sink is not None:
            self.decision_sink.write.remote(call.decisions_ref)

    def _harvest(self, block: bool) -> None:
        for shard, queue in enumerate(self._in_flight):
            while queue:
                ready, _ = ray.wait([queue[0].stats_ref], timeout=None if block else 0)
                if not ready:
                    break
                self._finish(shard, queue.popleft())

    # -- end of stream ------------------------------------------------------------------------
    def drain(self) -> None:
        """Send every open micro-batch and wait for all calls."""
        for shard, buf in enumerate(self._open):
            if buf.parts:
                self._send(shard)
        self._harvest(block=True)

    def release_idle(self) -> None:
        """The input went quiet: close the watermark up to the newest event and let every
        shard apply what it holds (see ``Ingestor.close_idle``)."""
        self.ingestor.close_idle()
        for shard in range(len(self.shards)):
            self._send(shard)  # the open micro-batch, or none: the new watermark either way
        self._harvest(block=True)

    @property
    def queue_depth(self) -> list[int]:
        """Calls in flight per shard."""
        return [len(q) for q in self._in_flight]

    def flush_logs(self) -> None:
        """Write what the sinks hold (triggers, decisions, outcomes, dead letters), so readers
        see everything so far. Applies nothing: works while shards or the ranker stop."""
        if self.outcome_sink is not None:
            self.outcome_sink.flush()
        if self.dead_letter_sink is not None:
            self.dead_letter_sink.flush()
        refs = [s.flush.remote() for s in (self.decision_sink, self.sink) if s is not None]
        ray.get(refs)

    def flush(self) -> dict[str, Any]:
        """End of stream: shards release everything pending; the sink writes its files."""
        self.drain()
        for shard in range(len(self.shards)):
            self._send(shard, final=True)
        self._harvest(block=True)
        if self.dead_letter_sink is not None:
            self.dead_letter_sink.flush()
        self.flush_logs()
        if self.sink is not None:
            return dict(ray.get(self.sink.flush.remote()))
        return {}
