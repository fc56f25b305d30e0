"""Responses: the offer_response events of a routed batch, as the table training joins on.

A *response* is what a customer did with an offer (accepted, declined), as an event; the
*outcome* of a decision (accepted, declined or ignored within the attribution window) is
derived from the responses by training (``models.training.outcomes``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.events.schema import TS_TYPE, EventKind

RESPONSE_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.uint64()),
        pa.field("customer_key", pa.uint64()),
        pa.field("ts", TS_TYPE),
        pa.field("decision_id", pa.string()),
        pa.field("offer_id", pa.string()),
        pa.field("response", pa.string()),
    ]
)


def response_table(routed: pa.RecordBatch | pa.Table) -> pa.Table:
    """The offer responses among ``routed`` (pseudonymized) events; empty if there are none."""
    kinds = np.asarray(routed.column("kind").to_numpy(zero_copy_only=False))
    rows = np.flatnonzero(kinds == int(EventKind.OFFER_RESPONSE))
    if rows.size == 0:
        return RESPONSE_SCHEMA.empty_table()
    picked = routed.take(pa.array(rows))
    columns = []
    for f in RESPONSE_SCHEMA:
        if f.name in picked.schema.names:
            columns.append(pc.cast(picked.column(f.name), f.type))
        else:
            columns.append(pa.nulls(rows.size, f.type))
    return pa.Table.from_arrays(columns, schema=RESPONSE_SCHEMA)
