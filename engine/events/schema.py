"""Event kinds and the two Arrow schemas: raw events (as sources give them) and routed events.

A raw batch names customers by their external identifier (``customer_id``); ingest turns it
into a routed batch keyed by a pseudonym (``customer_key``), with the owning key group and an
arrival sequence number. Both are one wide schema: the columns a kind does not use are null.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import pyarrow as pa

from engine.fields import PAYLOAD_TYPES, PROFILE_UPDATE_TYPES

TS_TYPE = pa.timestamp("ms", tz="UTC")


class EventKind(IntEnum):
    """What happened. The code is the value stored in routed batches."""

    USAGE = 0  # UsageRecorded: mobile data used, in MB
    LOCATION = 1  # LocationPinged: the device was seen at (lat, lon)
    PURCHASE = 2  # PurchaseMade
    PAGE_VIEW = 3  # PageViewed
    CART_ADD = 4  # CartItemAdded
    CHECKOUT = 5  # CheckoutCompleted
    OFFER_RESPONSE = 6  # OfferResponded: accepted or declined
    PROFILE_UPDATE = 7  # ProfileUpdated: one or more profile fields changed
    CONSENT = 8  # ConsentChanged: granted or withdrawn for a channel and purpose

    @property
    def wire_name(self) -> str:
        return self.name.lower()

    @classmethod
    def from_wire(cls, name: str) -> EventKind:
        return cls[name.upper()]


KIND_NAMES: tuple[str, ...] = tuple(k.wire_name for k in EventKind)
#: the kind code of a pattern's deadline: not an event kind (never on the wire or in a log), a
#: row a shard adds to its step so the match is decided as of that moment (``engine.rules.timers``)
TIMER_KIND = 127

#: what a profile update may carry (``engine.fields``); overage_cycles is billing history: it
#: replaces the running count
PROFILE_FIELDS: dict[str, pa.DataType] = PROFILE_UPDATE_TYPES
#: every payload column of an event (``engine.fields``)
PAYLOAD_FIELDS: dict[str, pa.DataType] = PAYLOAD_TYPES


@dataclass(frozen=True)
class KindSpec:
    """Which payload fields a kind must and may carry."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    #: at least one of these must be present (profile updates)
    any_of: tuple[str, ...] = ()

    @property
    def allowed(self) -> frozenset[str]:
        return frozenset(self.required + self.optional + self.any_of)


KIND_SPECS: dict[EventKind, KindSpec] = {
    EventKind.USAGE: KindSpec(required=("mb",)),
    EventKind.LOCATION: KindSpec(required=("lat", "lon")),
    EventKind.PURCHASE: KindSpec(required=("amount",), optional=("item",)),
    EventKind.PAGE_VIEW: KindSpec(required=("page",)),
    EventKind.CART_ADD: KindSpec(required=("item",), optional=("amount",)),
    EventKind.CHECKOUT: KindSpec(required=(), optional=("amount",)),
    EventKind.OFFER_RESPONSE: KindSpec(
        required=("decision_id", "response"), optional=("offer_id",)
    ),
    EventKind.PROFILE_UPDATE: KindSpec(required=(), any_of=tuple(PROFILE_FIELDS)),
    EventKind.CONSENT: KindSpec(required=("channel", "granted"), optional=("purpose",)),
}

RESPONSES = ("accepted", "declined")
CHANNELS = ("sms", "email", "push", "app", "web", "call_center")
CONSENT_CHANNELS = (*CHANNELS, "all")
#: a channel's bit in the golden record's channel masks (reachable, consent granted/withdrawn)
CHANNEL_BITS: dict[str, int] = {name: 1 << i for i, name in enumerate(CHANNELS)}
ALL_CHANNELS = (1 << len(CHANNELS)) - 1

RAW_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.uint64(), nullable=False),
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("ts", TS_TYPE, nullable=False),
        *(pa.field(name, typ) for name, typ in PAYLOAD_FIELDS.items()),
    ]
)

ROUTED_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.uint64(), nullable=False),
        pa.field("customer_key", pa.uint64(), nullable=False),
        pa.field("key_group", pa.uint16(), nullable=False),
        pa.field("seq", pa.uint64(), nullable=False),
        pa.field("kind", pa.int8(), nullable=False),
        pa.field("ts", TS_TYPE, nullable=False),
        *(pa.field(name, typ) for name, typ in PAYLOAD_FIELDS.items()),
    ]
)


def empty_batch(schema: pa.Schema = ROUTED_SCHEMA) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


HEADER_NAMES = ("event_id", "customer_key", "key_group", "seq", "kind", "ts")


def sparse_routed(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Check a routed batch that may leave out payload columns it has no values for.

    Routed batches travel between processes; a column that is null on every row is left out
    rather than shipped as a buffer of nulls. Raises ValueError naming a wrong column.
    """
    for name in HEADER_NAMES:
        if name not in batch.schema.names:
            raise ValueError(f"routed batch has no '{name}' column")
    arrays, fields = [], []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        index = ROUTED_SCHEMA.get_field_index(name)
        if index < 0:
            raise ValueError(f"routed batch has an unknown column '{name}'")
        field = ROUTED_SCHEMA.field(index)
        arrays.append(column if column.type.equals(field.type) else column.cast(field.type))
        fields.append(field)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def full_routed(table: pa.Table) -> pa.Table:
    """A routed table with every column of ROUTED_SCHEMA, absent ones as nulls."""
    columns = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in ROUTED_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=ROUTED_SCHEMA)


def compact(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch that owns just its rows' bytes.

    A slice still references its parent's buffers, and Ray serializes those whole: a 1,000-row
    slice of a 1,000,000-row batch costs as much to send as the parent. Copy such slices.
    """
    if batch.num_rows and batch.get_total_buffer_size() > 1.25 * batch.nbytes + 4096:
        return batch.take(pa.array(np.arange(batch.num_rows)))
    return batch
