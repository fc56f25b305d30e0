"""Responses and outcomes: the events of a routed batch that say what customers did, as the
table training joins on (the response log).

A *response* is what a customer did with an offer (accepted, declined), as an event. The
*outcomes* of a decision are derived by training from these rows: whether it was accepted
(``models.training.outcomes``), and for every arm, offer or not, whether the customer converted
or opted out within the attribution window (``models.attribution``). So the log holds, beside
the offer responses, every event that may be a conversion (a purchase and the item, a cart
addition, a checkout, a profile update and the names of the fields it set, never their values)
and every consent change (channel, granted). Customers are named by key; nothing else of the
events is kept.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.events.schema import KIND_NAMES, PROFILE_FIELDS, TS_TYPE, EventKind

RESPONSE_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.uint64()),
        pa.field("customer_key", pa.uint64()),
        pa.field("ts", TS_TYPE),
        pa.field("decision_id", pa.string()),
        pa.field("offer_id", pa.string()),
        pa.field("response", pa.string()),
        # since issue 16 (null in older logs, which held offer responses only):
        pa.field("kind", pa.string()),
        pa.field("item", pa.string()),
        pa.field("channel", pa.string()),
        pa.field("granted", pa.bool_()),
        pa.field("fields", pa.list_(pa.string())),  # the profile fields an update set
    ]
)
#: the kinds of event the response log keeps
OUTCOME_KINDS = (
    EventKind.OFFER_RESPONSE,
    EventKind.PURCHASE,
    EventKind.CART_ADD,
    EventKind.CHECKOUT,
    EventKind.PROFILE_UPDATE,
    EventKind.CONSENT,
)
_NAMES = np.array(KIND_NAMES, dtype=object)


def response_table(routed: pa.RecordBatch | pa.Table) -> pa.Table:
    """The outcome events among ``routed`` (pseudonymized) events; empty if there are none."""
    kinds = np.asarray(routed.column("kind").to_numpy(zero_copy_only=False))
    rows = np.flatnonzero(np.isin(kinds, [int(k) for k in OUTCOME_KINDS]))
    if rows.size == 0:
        return RESPONSE_SCHEMA.empty_table()
    picked = routed.take(pa.array(rows))
    columns = []
    for f in RESPONSE_SCHEMA:
        if f.name == "kind":
            columns.append(pa.array(_NAMES[kinds[rows]], pa.string()))
        elif f.name == "fields":
            columns.append(_fields_set(picked))
        elif f.name in picked.schema.names:
            columns.append(pc.cast(picked.column(f.name), f.type))
        else:
            columns.append(pa.nulls(rows.size, f.type))
    return pa.Table.from_arrays(columns, schema=RESPONSE_SCHEMA)


def _fields_set(picked: pa.RecordBatch | pa.Table) -> pa.Array:
    """Per row, the names of the profile fields it carries (null for other kinds)."""
    kinds = np.asarray(picked.column("kind").to_numpy(zero_copy_only=False))
    update = kinds == int(EventKind.PROFILE_UPDATE)
    names = np.array([n for n in PROFILE_FIELDS if n in picked.schema.names], dtype=object)
    if not update.any() or names.size == 0:
        return pa.nulls(picked.num_rows, pa.list_(pa.string()))
    valid = np.column_stack([
        np.asarray(picked.column(n).is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        for n in names
    ]) & update[:, None]  # fmt: skip
    offsets = np.concatenate(([0], np.cumsum(valid.sum(axis=1)))).astype(np.int32)
    values = pa.array(np.broadcast_to(names, valid.shape)[valid], pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~update))


def offer_responses(table: pa.Table) -> int:
    """How many rows of a response table are offer responses."""
    return int(pc.sum(pc.equal(table.column("kind"), "offer_response")).as_py() or 0)
