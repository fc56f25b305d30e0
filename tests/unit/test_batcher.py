"""The micro-batcher's state machine, on a ManualClock: size, deadline, backpressure, idle."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from engine.batcher import MicroBatcher, Send
from engine.clock import ManualClock


def part(rows: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"x": pa.array(np.arange(rows))})


def batcher(clock: ManualClock, **overrides) -> MicroBatcher:
    options = {"shards": 2, "max_events": 100, "deadline_ms": 5, "max_in_flight": 2}
    options.update(overrides)
    return MicroBatcher(clock=clock, **options)


def test_a_micro_batch_closes_on_its_deadline_not_before() -> None:
    clock = ManualClock()
    b = batcher(clock)
    assert b.add({0: part(10)}) == []
    clock.advance(0.004)
    assert b.poll().sends == []  # 4 ms: still open
    clock.advance(0.002)
    sends = b.poll().sends
    assert [(s.shard, s.rows) for s in sends] == [(0, 10)]
    assert sends[0].opened == 0.0
    assert b.open_rows == [0, 0]


def test_a_micro_batch_closes_at_its_size_and_before_a_part_would_overflow_it() -> None:
    b = batcher(ManualClock())
    assert b.add({0: part(60)}) == []
    sends = b.add({0: part(50)})  # 110 > 100: the open 60 go first, the 50 open a new one
    assert [s.rows for s in sends] == [60]
    sends = b.add({0: part(50)})  # exactly full
    assert [s.rows for s in sends] == [100]
    assert [len(s.parts) for s in sends] == [2]  # parts travel whole


def test_a_part_larger_than_a_micro_batch_is_cut_into_pieces() -> None:
    b = batcher(ManualClock(), max_in_flight=10)
    sends = b.add({1: part(250)})
    assert [s.rows for s in sends] == [100, 100]
    assert b.open_rows == [0, 50]
    values = np.concatenate([p.column("x").to_numpy() for s in sends for p in s.parts])
    assert values.tolist() == list(range(200))


def test_a_call_that_leaves_events_of_the_batch_added_for_later_is_behind_it() -> None:
    """Such a call must carry the watermark from before the batch (``Send.behind``): closed
    before a part would overflow it, or a piece that is not the part's last."""
    b = batcher(ManualClock(), max_in_flight=10)
    assert [(s.rows, s.behind) for s in b.add({0: part(60)})] == []
    sends = b.add({0: part(250)})  # the open 60 first, then pieces of 100, 100 (50 stay open)
    assert [(s.rows, s.behind) for s in sends] == [(60, True), (100, True), (100, True)]
    sends = b.add({0: part(50), 1: part(300)})  # shard 0 exactly full: nothing left behind
    assert [(s.shard, s.rows, s.behind) for s in sends] == [
        (0, 100, False), (1, 100, True), (1, 100, True), (1, 100, False)
    ]  # fmt: skip
    assert all(not s.behind for s in [*b.close_open(), *b.end_stream()])


def test_calls_in_flight_never_exceed_the_bound() -> None:
    b = batcher(ManualClock(), max_events=10, max_in_flight=2)
    in_flight = 0
    waits = []
    for _ in range(6):
        for send in b.add({0: part(10)}):
            in_flight -= send.wait  # the router waits for these before it calls
            in_flight += 1
            waits.append(send.wait)
            assert in_flight <= 2
    assert waits == [0, 0, 1, 1, 1, 1]
    assert b.in_flight == [2, 0]
    b.finished(0)
    assert b.in_flight == [1, 0]
    assert b.add({0: part(10)})[0].wait == 0  # room again
    with pytest.raises(ValueError, match="no call in flight"):
        b.finished(1)


def test_idle_release_comes_once_per_quiet_spell() -> None:
    clock = ManualClock()
    b = batcher(clock, idle_release_ms=2_000)
    assert not b.poll().release_idle  # nothing came in yet
    b.add({0: part(1)})
    clock.advance(1.0)
    assert not b.poll().release_idle
    clock.advance(1.0)
    assert b.poll().release_idle
    clock.advance(5.0)
    assert not b.poll().release_idle  # already released; waits for new input
    b.add({1: part(1)})
    clock.advance(2.0)
    assert b.poll().release_idle


def test_behind_a_source_quiet_is_counted_from_when_it_had_nothing_to_read() -> None:
    """No input for a while because the pipeline was busy (a checkpoint, a slow read) while
    the source still held events is not a quiet spell: only polls that found the source empty
    count, from the first of them."""
    clock = ManualClock()
    b = batcher(clock, idle_release_ms=300)
    b.add({0: part(1)})
    clock.advance(1.0)  # a checkpoint took a second
    assert not b.poll(source_idle=False).release_idle  # the source still had events
    assert not b.poll(source_idle=True).release_idle  # quiet from now on
    clock.advance(0.2)
    assert not b.poll(source_idle=True).release_idle
    assert not b.poll(source_idle=False).release_idle  # a read found more: not quiet
    clock.advance(0.2)
    assert not b.poll(source_idle=True).release_idle
    clock.advance(0.35)
    assert b.poll(source_idle=True).release_idle
    b.add({0: part(1)})  # new input ends the spell
    clock.advance(0.35)
    assert not b.poll(source_idle=True).release_idle
    clock.advance(0.35)
    assert b.poll(source_idle=True).release_idle
    b.idle_declined()  # a request was still on its way upstream: ask again at the next poll
    assert b.poll(source_idle=True).release_idle
    assert not b.poll(source_idle=True).release_idle  # released this time


def test_without_an_idle_setting_the_watermark_is_never_released_by_the_clock() -> None:
    clock = ManualClock()
    b = batcher(clock)
    b.add({0: part(1)})
    clock.advance(3600)
    assert not b.poll().release_idle


def test_end_of_stream_sends_what_is_open_then_a_final_call_per_shard() -> None:
    b = batcher(ManualClock())
    b.add({0: part(5)})
    sends = b.end_stream()
    assert [(s.shard, s.rows, s.final) for s in sends] == [
        (0, 5, False),
        (0, 0, True),
        (1, 0, True),
    ]
    release = b.close_every_shard()
    assert [(s.shard, s.rows, s.final) for s in release] == [(0, 0, False), (1, 0, False)]
    assert all(isinstance(s, Send) for s in release)
