"""MicroBatcher: when to call which shard with what, without Ray. The router carries it out.

Per shard it keeps one open micro-batch: the ingestor's per-shard batches in arrival order. A
micro-batch closes when it reaches ``max_events`` (or just before the next routed batch would
take it past that: parts travel whole, except one larger than a whole micro-batch, which is
cut into pieces), or ``deadline_ms`` after it opened. Closing one yields a ``Send``: call this
shard with these parts, after waiting for ``wait`` of its oldest calls. At most
``max_in_flight`` calls are in flight per shard (backpressure: a router that gets ahead of a
shard waits for it, so memory stays bounded). When input has been quiet for
``idle_release_ms``, ``poll`` says so once: the router then closes the watermark up to the
newest event and lets every shard apply what it holds. Behind a source (a log), quiet means the
source had nothing to read for that long (``poll(source_idle=...)``), not that no input came:
a checkpoint or a slow read is not a quiet spell, and an idle release makes every older event
that comes after it late.

Every decision reads the injected ``Clock``, so the whole state machine is tested with a
``ManualClock``; ``actors.router.Router`` only turns ``Send`` s into actor calls.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from engine.clock import Clock
from engine.events.schema import compact


@dataclass(frozen=True)
class Send:
    """One shard call to make: ``apply(parts, watermark)``, or ``end_stream()`` when ``final``.

    Before the call, the router finishes (waits for) the shard's ``wait`` oldest calls.
    ``opened`` is when the micro-batch opened, on the batcher's clock (for its latency).
    ``behind``: the call leaves events of the routed batch being added for a later call (it
    was closed before that batch's part, or holds a piece of it but not the last), so it must
    carry the watermark from before that batch, not after: with the later one the shard would
    fire deadlines that events still on their way to it come before.
    """

    shard: int
    parts: list[pa.RecordBatch]
    opened: float
    wait: int = 0
    final: bool = False
    behind: bool = False

    @property
    def rows(self) -> int:
        return sum(p.num_rows for p in self.parts)


@dataclass(frozen=True)
class Poll:
    """What ``MicroBatcher.poll`` found: micro-batches past their deadline, and whether the
    input has gone quiet (the router should release the watermark)."""

    sends: list[Send]
    release_idle: bool = False


#: latencies kept for percentiles (bounded: a service runs for months)
KEPT_LATENCIES = 100_000


@dataclass
class RouterStats:
    """Counters and micro-batch latencies (router in -> triggers out), in ms."""

    ingested: int = 0
    rejected: int = 0
    applied: int = 0
    duplicates: int = 0
    triggers: int = 0
    decisions: int = 0
    responses: int = 0
    micro_batches: int = 0
    #: events of shard steps that failed, dead-lettered whole with the error
    failed: int = 0
    triggers_by_rule: Counter[str] = field(default_factory=Counter)
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    #: the newest micro-batches' latencies
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=KEPT_LATENCIES))
    #: per micro-batch with decisions: time the shard spent deciding (policy, ranker, choice)
    decide_ms: deque[float] = field(default_factory=lambda: deque(maxlen=KEPT_LATENCIES))

    def finished(self, shard_stats: Mapping[str, Any], latency_ms: float) -> None:
        """Count one finished shard call (its ``ShardLogic`` stats)."""
        self.latencies_ms.append(latency_ms)
        self.micro_batches += 1
        self.applied += shard_stats["applied"]
        self.duplicates += shard_stats["duplicates"]
        self.triggers += shard_stats["triggers"]
        self.triggers_by_rule.update(shard_stats["triggers_by_rule"])
        self.decisions += shard_stats["decisions"]
        self.decide_ms.extend(shard_stats["decide_ms_parts"])
        failed = shard_stats.get("failed")
        if failed is not None and failed.num_rows:
            self.failed += failed.num_rows
            self.rejected += failed.num_rows
            self.rejected_by_reason["shard_failed"] += failed.num_rows

    #: the counters a checkpoint keeps, so a recovered engine reports the same totals
    COUNTERS = (
        "ingested", "rejected", "applied", "duplicates", "triggers", "decisions", "responses",
        "micro_batches", "failed",
    )  # fmt: skip

    def counters(self) -> dict[str, Any]:
        """The counters as plain values (latencies are not kept)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS}
        out["triggers_by_rule"] = dict(self.triggers_by_rule)
        out["rejected_by_reason"] = dict(self.rejected_by_reason)
        return out

    @classmethod
    def from_counters(cls, counters: Mapping[str, Any]) -> RouterStats:
        stats = cls()
        for name in cls.COUNTERS:
            setattr(stats, name, int(counters.get(name, 0)))
        stats.triggers_by_rule.update(counters.get("triggers_by_rule", {}))
        stats.rejected_by_reason.update(counters.get("rejected_by_reason", {}))
        return stats

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
            "failed": self.failed,
            "triggers_by_rule": dict(self.triggers_by_rule),
            "rejected_by_reason": dict(self.rejected_by_reason),
            "p50_ms": self.percentile(50),
            "p99_ms": self.percentile(99),
            "decisions": self.decisions,
            "responses": self.responses,
            "decide_p50_ms": self.percentile(50, self.decide_ms),
            "decide_p99_ms": self.percentile(99, self.decide_ms),
        }


@dataclass
class _Open:
    parts: list[pa.RecordBatch] = field(default_factory=list)
    rows: int = 0
    opened: float = 0.0


def pieces(part: pa.RecordBatch, limit: int) -> list[pa.RecordBatch]:
    """``part`` whole if it fits in a micro-batch, else cut into copies of ``limit`` rows (a
    slice would carry its parent's buffers to the shard)."""
    if part.num_rows <= limit:
        return [part]
    return [compact(part.slice(start, limit)) for start in range(0, part.num_rows, limit)]


class MicroBatcher:
    """Open micro-batches and calls in flight, per shard; see the module docstring."""

    def __init__(
        self,
        shards: int,
        max_events: int,
        deadline_ms: float,
        max_in_flight: int,
        clock: Clock,
        idle_release_ms: float | None = None,
    ) -> None:
        self.max_events = max_events
        self.deadline_s = deadline_ms / 1000
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.idle_release_s = None if idle_release_ms is None else idle_release_ms / 1000
        self._open = [_Open() for _ in range(shards)]
        self._in_flight = [0] * shards
        self._last_input = clock.monotonic()
        #: since when the source has had nothing to read (None: it had, at the last poll)
        self._source_quiet_since: float | None = None
        self._idle_released = True  # nothing came in yet: nothing to release

    @property
    def shards(self) -> int:
        return len(self._open)

    # -- input ------------------------------------------------------------------------------
    def add(self, parts: Mapping[int, pa.RecordBatch]) -> list[Send]:
        """Queue one routed batch's per-shard parts; the micro-batches that fill up."""
        now = self.clock.monotonic()
        self._last_input = now
        self._source_quiet_since = None
        self._idle_released = False
        sends: list[Send] = []
        for shard, part in parts.items():
            if not part.num_rows:
                continue
            if self._open[shard].rows and self._open[shard].rows + part.num_rows > self.max_events:
                sends.append(self._close(shard, behind=True))  # close before it would overflow
            cut = pieces(part, self.max_events)
            for i, piece in enumerate(cut):
                buf = self._open[shard]
                if not buf.parts:
                    buf.opened = now
                buf.parts.append(piece)
                buf.rows += piece.num_rows
                if buf.rows >= self.max_events:
                    sends.append(self._close(shard, behind=i < len(cut) - 1))
        return sends

    def poll(self, source_idle: bool | None = None) -> Poll:
        """Micro-batches whose deadline has passed, and an idle release when input went quiet
        for ``idle_release_ms`` (once per quiet spell). ``source_idle``: whether the source
        had nothing to read just now (None: there is no source; quiet is no input)."""
        now = self.clock.monotonic()
        sends = [
            self._close(shard)
            for shard, buf in enumerate(self._open)
            if buf.parts and now - buf.opened >= self.deadline_s
        ]
        if source_idle is None:
            quiet_since: float | None = self._last_input
        else:
            if not source_idle:
                self._source_quiet_since = None
            elif self._source_quiet_since is None:
                self._source_quiet_since = now
            quiet_since = self._source_quiet_since
        release = (
            self.idle_release_s is not None
            and not self._idle_released
            and quiet_since is not None
            and now - quiet_since >= self.idle_release_s
        )
        if release:
            self._idle_released = True
        return Poll(sends, release)

    # -- closing ------------------------------------------------------------------------------
    def close_open(self) -> list[Send]:
        """Close every open micro-batch (a drain)."""
        return [self._close(shard) for shard, buf in enumerate(self._open) if buf.parts]

    def idle_declined(self) -> None:
        """The idle release ``poll`` announced did not happen (input is still on its way
        upstream): the next poll asks again, the quiet spell going on."""
        self._idle_released = False

    def close_every_shard(self) -> list[Send]:
        """A call for every shard, with its open micro-batch or none: the watermark moved on
        its own (an idle release) and every shard should apply what it can."""
        self._idle_released = True
        return [self._close(shard) for shard in range(self.shards)]

    def end_stream(self) -> list[Send]:
        """The stream ended: every open micro-batch, then a final call per shard (release
        everything pending, whatever the watermark)."""
        sends = self.close_open()
        self._idle_released = True
        return [*sends, *(self._close(shard, final=True) for shard in range(self.shards))]

    def _close(self, shard: int, final: bool = False, behind: bool = False) -> Send:
        buf = self._open[shard]
        self._open[shard] = _Open()
        wait = max(0, self._in_flight[shard] - self.max_in_flight + 1)
        self._in_flight[shard] += 1 - wait
        opened = buf.opened if buf.parts else self.clock.monotonic()
        return Send(shard, buf.parts, opened, wait, final, behind)

    # -- calls ---------------------------------------------------------------------------------
    def finished(self, shard: int) -> None:
        """A call to ``shard`` finished that no ``Send.wait`` waited for."""
        if self._in_flight[shard] == 0:
            raise ValueError(f"shard {shard} has no call in flight")
        self._in_flight[shard] -= 1

    @property
    def in_flight(self) -> list[int]:
        """Calls in flight per shard."""
        return list(self._in_flight)

    @property
    def open_rows(self) -> list[int]:
        """Events in each shard's open micro-batch."""
        return [buf.rows for buf in self._open]
