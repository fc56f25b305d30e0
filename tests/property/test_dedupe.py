"""Dedupe in the event buffer against a set: the first arrival of each event id is kept."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.events.schema import ROUTED_SCHEMA
from engine.state.buffer import EventBuffer


def routed(ids: list[int]) -> pa.RecordBatch:
    n = len(ids)
    columns = {f.name: pa.nulls(n, f.type) for f in ROUTED_SCHEMA}
    columns["event_id"] = pa.array(ids, type=pa.uint64())
    columns["ts"] = pa.array(np.arange(n), type=pa.int64()).cast(ROUTED_SCHEMA.field("ts").type)
    for name in ("customer_key", "key_group", "seq", "kind"):
        columns[name] = pa.array(np.zeros(n), type=ROUTED_SCHEMA.field(name).type)
    return pa.RecordBatch.from_arrays(
        [columns[f.name] for f in ROUTED_SCHEMA], schema=ROUTED_SCHEMA
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=60), min_size=1, max_size=6))
def test_each_event_id_is_kept_once_at_its_first_arrival(batches) -> None:
    buffer, seen = EventBuffer(dedupe_window_ms=10**12), set()
    for ids in batches:
        expected = []
        for i in ids:
            expected.append(i not in seen)
            seen.add(i)
        pending_before = len(buffer._pending)
        dropped = buffer.add(routed(ids))
        assert dropped == len(ids) - sum(expected)
        if any(expected):
            alive = buffer._pending[-1][1]
            kept = np.ones(len(ids), dtype=bool) if alive is None else alive
            assert kept.tolist() == expected
        else:
            assert len(buffer._pending) == pending_before
    assert buffer.pending_rows == len(seen)
