"""Dedupe in the event buffer against a set: the first arrival of each event id is kept."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.events.schema import ROUTED_SCHEMA
from engine.state.buffer import EventBuffer, rows_holding
from tests.pure import examples


def routed(ids: list[int], first_ts: int = 0) -> pa.RecordBatch:
    """A routed batch of ``ids``; event times count up from ``first_ts`` (the arrival order)."""
    n = len(ids)
    columns = {f.name: pa.nulls(n, f.type) for f in ROUTED_SCHEMA}
    columns["event_id"] = pa.array(ids, type=pa.uint64())
    ts = np.arange(first_ts, first_ts + n)
    columns["ts"] = pa.array(ts, type=pa.int64()).cast(ROUTED_SCHEMA.field("ts").type)
    for name in ("customer_key", "key_group", "seq", "kind"):
        columns[name] = pa.array(np.zeros(n), type=ROUTED_SCHEMA.field(name).type)
    return pa.RecordBatch.from_arrays(
        [columns[f.name] for f in ROUTED_SCHEMA], schema=ROUTED_SCHEMA
    )


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=60), min_size=1, max_size=6))
def test_each_event_id_is_kept_once_at_its_first_arrival(batches) -> None:
    buffer, seen = EventBuffer(dedupe_window_ms=10**12), set()
    arrived = 0
    first_arrivals = []  # arrival positions that must survive
    for ids in batches:
        fresh = 0
        for position, i in enumerate(ids, start=arrived):
            if i not in seen:
                first_arrivals.append(position)
                fresh += 1
            seen.add(i)
        dropped = buffer.add(routed(ids, first_ts=arrived))
        assert dropped == len(ids) - fresh
        arrived += len(ids)
    assert buffer.pending_rows == len(seen)
    released = buffer.release(watermark_ms=arrived)
    ts = released.table.column("ts").cast(pa.int64()).to_numpy()[released.rows]
    assert sorted(ts.tolist()) == first_arrivals


@settings(max_examples=examples(300), deadline=None)
@given(
    st.lists(st.integers(0, 2**64 - 1), max_size=300),
    st.lists(st.integers(0, 2**64 - 1), max_size=40),
    st.integers(0, 2**32 - 1),
)
def test_rows_holding_finds_exactly_the_members(values, members, seed) -> None:
    rng = np.random.default_rng(seed)
    if values and members:  # some members present, some rows repeating them
        values += [members[i] for i in rng.integers(0, len(members), len(values) // 4)]
    arr = np.array(values, dtype=np.uint64)
    rng.shuffle(arr)
    wanted = set(members)
    expected = [i for i, v in enumerate(arr.tolist()) if v in wanted]
    got = rows_holding(arr, np.unique(np.array(members, dtype=np.uint64)))
    assert got.tolist() == expected
