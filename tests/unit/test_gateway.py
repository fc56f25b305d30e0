"""The gateway's work without Ray: reports, per-kind counts, ticks and retraining."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from engine.clock import ManualClock
from engine.events.deadletter import DeadLetter
from engine.gateway import API_BUSY_EXPIRES_S, API_BUSY_RETOLD_S, ApiActivity, GatewayLogic


@dataclass
class FakeFeed:
    """Rejects the events whose request index is in ``bad``; counts polls."""

    bad: set[int] = field(default_factory=set)
    rejected: list[DeadLetter] = field(default_factory=list)
    polls: int = 0
    depths: list[int] = field(default_factory=lambda: [1, 0])

    def submit(self, batch: pa.RecordBatch, positions: np.ndarray) -> list[DeadLetter]:
        kinds = batch.column("kind").to_pylist()
        return [
            DeadLetter(int(p), "late: older than the watermark", kind=kinds[i])
            for i, p in enumerate(positions)
            if int(p) in self.bad
        ]

    def reject(self, letters: list[DeadLetter]) -> None:
        self.rejected.extend(letters)

    def poll(self) -> None:
        self.polls += 1

    @property
    def queue_depth(self) -> list[int]:
        return self.depths


@dataclass
class FakeRetrainer:
    responses: int = 0
    fail: bool = False
    runs: int = 0

    def due(self) -> bool:
        return self.responses >= 10

    def set_catalog(self, catalog: Any) -> None:
        pass

    def maybe_retrain(self, force: bool = False) -> Any:
        if self.fail:
            raise RuntimeError("registry unreachable")
        self.runs += 1
        self.responses = 0
        return "trained"


def batch(kinds: list[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"kind": pa.array(kinds).dictionary_encode()})


def test_the_report_lists_every_rejected_event_by_request_index_and_counts_kinds() -> None:
    feed = FakeFeed(bad={3})
    logic = GatewayLogic(feed)
    uncoercible = DeadLetter(1, "field 'mb': not a number", field="mb", kind="usage")
    # request indexes 0, 2, 3, 4 made it into the batch; 1 could not be coerced
    done = logic.submit(
        batch(["usage", "location", "usage", "purchase"]), [0, 2, 3, 4], [uncoercible]
    )
    assert done.report["accepted"] == 3
    assert done.report["rejected"] == 2
    assert [e["index"] for e in done.report["errors"]] == [1, 3]
    assert done.report["errors"][0]["field"] == "mb"
    assert done.accepted_by_kind == {"usage": 1, "location": 1, "purchase": 1}
    assert done.rejected_by_kind == {"usage": 2}
    assert feed.rejected == [uncoercible]


def test_a_rejected_event_of_no_known_kind_counts_as_unknown() -> None:
    logic = GatewayLogic(FakeFeed())
    done = logic.submit(batch([]), [], [DeadLetter(0, "unknown kind", kind="teleport")])
    assert done.rejected_by_kind == {"unknown": 1}
    assert done.accepted_by_kind == {}


def test_a_tick_polls_the_feed_and_reports_the_queue_depths() -> None:
    feed = FakeFeed()
    logic = GatewayLogic(feed)
    assert logic.tick() == [1, 0]
    assert feed.polls == 1
    assert not logic.retrain_due()


def test_retraining_runs_when_due_and_a_failure_is_kept_not_raised() -> None:
    retrainer = FakeRetrainer()
    logic = GatewayLogic(FakeFeed(), retrainer)
    assert not logic.retrain_due()
    retrainer.responses = 10
    assert logic.retrain_due()
    assert logic.retrain() == "trained"
    assert logic.retrained == ["trained"] and logic.retrain_error is None
    retrainer.fail = True
    assert logic.retrain() is None
    assert logic.retrain_error == "RuntimeError: registry unreachable"
    retrainer.fail = False
    logic.retrain()
    assert logic.retrain_error is None


def test_an_answer_lists_at_most_the_first_errors_and_counts_them_all() -> None:
    from engine.limits import MAX_ERRORS_LISTED

    n = MAX_ERRORS_LISTED * 3
    logic = GatewayLogic(FakeFeed(bad=set(range(n))))
    done = logic.submit(batch(["usage"] * n), list(range(n)), [])
    assert done.report["rejected"] == n and done.report["accepted"] == 0
    assert [e["index"] for e in done.report["errors"]] == list(range(MAX_ERRORS_LISTED))
    assert done.report["errors_truncated"]
    assert done.rejected_by_kind == {"usage": n}


# -- ApiActivity: when the gateway may mark a quiet spell in the log ---------------------------
def _activity() -> tuple[ApiActivity, ManualClock]:
    clock = ManualClock()
    return ApiActivity(clock), clock


def test_a_restarted_gateway_marks_no_quiet_spell_for_a_while() -> None:
    """It has not heard of the requests under way when it restarted (their replicas told the
    gateway before it): they tell again within API_BUSY_RETOLD_S. A new one starts quiet."""
    assert ApiActivity(ManualClock()).quiet()
    clock = ManualClock()
    activity = ApiActivity(clock, restarted=True)
    assert not activity.quiet()
    clock.advance(API_BUSY_RETOLD_S - 0.1)
    assert not activity.quiet()
    clock.advance(0.1)
    assert activity.quiet()


def test_a_busy_replica_holds_back_quiet_until_it_is_done_or_its_report_expires() -> None:
    activity, clock = _activity()
    activity.report("a", 1, API_BUSY_EXPIRES_S)
    clock.advance(5)
    assert not activity.quiet()
    activity.report("a", 2, 0.0)
    assert activity.quiet()
    activity.report("b", 1, API_BUSY_EXPIRES_S)  # a replica that dies while busy
    clock.advance(API_BUSY_EXPIRES_S - 0.1)
    assert not activity.quiet()
    clock.advance(0.1)
    assert activity.quiet()


def test_a_replica_that_refused_events_holds_back_quiet_until_their_retries_are_due() -> None:
    """A 503 client sends the same events again: a mark before that would make them late."""
    activity, clock = _activity()
    activity.report("a", 1, API_BUSY_EXPIRES_S)
    activity.report("a", 2, 4.0)  # done, but refused some with 503
    clock.advance(3.9)
    assert not activity.quiet()
    clock.advance(0.1)
    assert activity.quiet()


def test_reports_that_arrive_out_of_order_are_read_in_the_replicas_order() -> None:
    activity, _ = _activity()
    activity.report("a", 2, 0.0)
    activity.report("a", 1, API_BUSY_EXPIRES_S)  # older: ignored
    assert activity.quiet()
    activity.report("a", 3, 1e9)  # a hold is never longer than a busy report's
    assert not activity.quiet()
