"""Triggers: a rule fired for a customer at an event. One Arrow table per micro-batch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.events.schema import TS_TYPE

TRIGGER_SCHEMA = pa.schema(
    [
        pa.field("rule_id", pa.string()),
        pa.field("customer_key", pa.uint64()),
        pa.field("event_id", pa.uint64()),
        pa.field("seq", pa.uint64()),
        pa.field("ts", TS_TYPE),
        pa.field("values", pa.map_(pa.string(), pa.float64())),
    ]
)


def trigger_table(
    rule_id: str,
    customer_key: np.ndarray,
    event_id: np.ndarray,
    seq: np.ndarray,
    ts: np.ndarray,
    values: dict[str, np.ndarray],
) -> pa.Table:
    """Triggers of one rule; ``values`` holds one array per emitted name (built vectorized)."""
    n = customer_key.size
    names = list(values)
    m = len(names)
    offsets = pa.array(
        np.arange(0, n * m + 1, m, dtype=np.int32) if m else np.zeros(n + 1, np.int32)
    )
    keys = pa.array(np.tile(np.array(names, dtype=object), n) if m else [], type=pa.string())
    items = np.column_stack([values[k] for k in names]).ravel() if m else np.zeros(0)
    mapped = pa.MapArray.from_arrays(offsets, keys, pa.array(items, type=pa.float64()))
    return pa.Table.from_arrays(
        [
            pa.array(np.full(n, rule_id, dtype=object), type=pa.string()),
            pa.array(customer_key, type=pa.uint64()),
            pa.array(event_id, type=pa.uint64()),
            pa.array(seq, type=pa.uint64()),
            pa.array(ts, type=pa.int64()).cast(TS_TYPE),
            mapped,
        ],
        schema=TRIGGER_SCHEMA,
    )


def empty_triggers() -> pa.Table:
    return TRIGGER_SCHEMA.empty_table()
