"""GatewayLogic: what the service's single ingest point does, without Ray.

``actors.gateway.GatewayActor`` is a thin wrapper: it owns the lock, the clock thread and the
metrics, and calls this object, which owns the work: ingest a request's events and build its
report (with per-kind counts), and on every tick collect finished calls, send due
micro-batches, release the watermark when input went quiet (all inside ``Feed.poll``), and
retrain when enough offer responses arrived. The feed (a Router) and the retrainer come in through
the protocols below, so tests drive this object with plain fakes and a ``ManualClock``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from engine.clock import Clock, SystemClock
from engine.events.deadletter import DeadLetter
from engine.events.schema import KIND_NAMES
from engine.limits import MAX_ERRORS_LISTED


class Feed(Protocol):
    """What the gateway needs of its router."""

    def submit(self, batch: pa.RecordBatch, positions: np.ndarray) -> list[DeadLetter]: ...

    def reject(self, letters: list[DeadLetter]) -> None: ...

    def poll(self) -> None: ...

    @property
    def queue_depth(self) -> list[int]: ...


class Retrainer(Protocol):
    """Retrains the ranker from the engine's own logs (``deploy.retraining.Retrainer``)."""

    def due(self) -> bool: ...

    def maybe_retrain(self, force: bool = False) -> Any: ...

    def set_catalog(self, catalog: Any) -> None: ...


#: seconds after which an API replica's "busy" report no longer holds back an idle mark
API_BUSY_EXPIRES_S = 60.0
#: an API replica busy this long tells the gateway again; a (re)started gateway marks no quiet
#: spell for this long, since the reports of requests under way went to the gateway before it
API_BUSY_RETOLD_S = 10.0


class ApiActivity:
    """Whether events made before now may still reach the ingest log from the API replicas.

    The gateway marks a quiet spell in the log (the watermark moves up to the newest event, so
    every older event after the mark is late) only when none may: a replica reports, with a
    per-replica ``seq`` (reports may arrive out of order), for how long its events may still
    come: while it works on event requests (at most ``API_BUSY_EXPIRES_S``, so a replica that
    died holds nothing back for long), for a while after it refused some with 503 (their
    retries carry events made before), or 0. A gateway that was ``restarted`` under running
    replicas has not heard of the requests under way: it waits ``API_BUSY_RETOLD_S``, in which
    a busy replica tells again.
    """

    def __init__(self, clock: Clock | None = None, restarted: bool = False) -> None:
        self.clock = clock or SystemClock()
        self._grace_until = self.clock.monotonic() + (API_BUSY_RETOLD_S if restarted else 0.0)
        #: replica -> (its last report's seq, until when its events may come)
        self._until: dict[str, tuple[int, float]] = {}

    def report(self, replica: str, seq: int, hold_s: float) -> None:
        """``replica``'s events may come for ``hold_s`` more seconds (0: none are under way)."""
        hold_s = min(max(float(hold_s), 0.0), API_BUSY_EXPIRES_S)
        last = self._until.get(replica)
        if last is None or seq > last[0]:
            self._until[replica] = (seq, self.clock.monotonic() + hold_s)

    def quiet(self) -> bool:
        """No replica's events may still come: a quiet spell may be marked."""
        now = self.clock.monotonic()
        if now < self._grace_until:
            return False
        return all(until <= now for _, until in self._until.values())


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as the API reports it."""
    return {
        "index": letter.index,
        "event_id": letter.event_id,
        "kind": letter.kind,
        "field": letter.field,
        "value": letter.value,
        "reason": letter.reason,
    }


@dataclass(frozen=True)
class Submitted:
    """One request's ingest: the API's report and the counts behind the ingest metrics."""

    report: dict[str, Any]
    accepted_by_kind: dict[str, int]
    rejected_by_kind: dict[str, int]


def accepted_by_kind(
    batch: pa.RecordBatch, positions: Sequence[int], dead: Sequence[DeadLetter]
) -> dict[str, int]:
    """Events of ``batch`` per kind, less the ``dead`` ones (``positions`` maps the batch's
    rows to the request indexes that dead letters carry)."""
    index = {int(p): i for i, p in enumerate(positions)}
    ok = np.ones(batch.num_rows, dtype=bool)
    for letter in dead:
        row = index.get(letter.index)
        if row is not None:
            ok[row] = False
    if not ok.any():
        return {}
    kinds = np.asarray(batch.column("kind").to_numpy(zero_copy_only=False)).astype(str)
    names, counts = np.unique(kinds[ok], return_counts=True)
    return dict(zip(names.tolist(), counts.tolist(), strict=True))


def rejected_by_kind(letters: Sequence[DeadLetter]) -> dict[str, int]:
    """Dead letters per kind; one of no known kind counts as ``unknown``."""
    return dict(Counter(d.kind if d.kind in KIND_NAMES else "unknown" for d in letters))


@dataclass
class GatewayLogic:
    """The gateway's work over one feed and an optional retrainer."""

    feed: Feed
    retrainer: Retrainer | None = None
    #: the last retraining's error (None after a success)
    retrain_error: str | None = None
    retrained: list[Any] = field(default_factory=list)

    def submit(
        self, batch: pa.RecordBatch, positions: Sequence[int], letters: Sequence[DeadLetter]
    ) -> Submitted:
        """Ingest one request's events; ``letters`` are rows the API could not coerce.

        The report counts every rejected event and lists the first MAX_ERRORS_LISTED of them
        (by index in the request), so an answer stays small whatever the request."""
        if letters:
            self.feed.reject(list(letters))
        dead = self.feed.submit(batch, np.asarray(positions, dtype=np.int64))
        rejected = sorted([*letters, *dead], key=lambda d: d.index)
        report = {
            "accepted": batch.num_rows - len(dead),
            "rejected": len(rejected),
            "errors": [letter_json(d) for d in rejected[:MAX_ERRORS_LISTED]],
            "errors_truncated": len(rejected) > MAX_ERRORS_LISTED,
        }
        return Submitted(
            report, accepted_by_kind(batch, positions, dead), rejected_by_kind(rejected)
        )

    def tick(self) -> list[int]:
        """One clock period: deadlines, idle release, finished calls. Returns the calls in
        flight per shard (for the queue-depth gauge)."""
        self.feed.poll()
        return self.feed.queue_depth

    def retrain_due(self) -> bool:
        return self.retrainer is not None and self.retrainer.due()

    def retrain(self) -> Any:
        """Run the retrainer now (when due); a failure is kept in ``retrain_error`` and the
        running model stays. Returns the retrainer's result, or None."""
        if self.retrainer is None:
            return None
        try:
            result = self.retrainer.maybe_retrain()
        except Exception as exc:  # any failure of training must leave the service running
            self.retrain_error = f"{type(exc).__name__}: {exc}"
            return None
        self.retrain_error = None
        if result is not None:
            self.retrained.append(result)
        return result
