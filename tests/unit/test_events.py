"""Codec and validation: bad events are dead-lettered with field and value, good ones kept."""

from __future__ import annotations

import msgpack
import pytest

from engine.errors import EventError
from engine.events.codec import (
    decode_json,
    decode_msgpack,
    encode_batch,
    encode_event,
    rows_to_batch,
)
from engine.events.schema import KIND_NAMES, EventKind
from engine.events.validation import validate


def _check(rows):
    batch, positions, letters = rows_to_batch(rows)
    checked = validate(batch, positions)
    return checked.valid(), sorted(letters + checked.dead_letters, key=lambda d: d.index)


def test_msgpack_round_trip_of_one_event_and_a_batch() -> None:
    one = {
        "event_id": 7,
        "customer_id": "+4915100",
        "kind": "usage",
        "ts": 1_700_000_000_000,
        "mb": 5.5,
    }
    assert decode_msgpack(encode_event(one)) == [one]
    assert decode_msgpack(encode_batch([one, one])) == [one, one]


def test_unreadable_bodies_raise_event_error() -> None:
    with pytest.raises(EventError, match="not valid msgpack"):
        decode_msgpack(b"\xc1\xc1")
    with pytest.raises(EventError, match="not valid JSON"):
        decode_json(b"{nope")
    with pytest.raises(EventError, match="expected an event"):
        decode_msgpack(msgpack.packb(42))


def test_invalid_events_are_dead_lettered_naming_field_and_value_and_valid_ones_kept() -> None:
    rows = [
        {"event_id": 1, "customer_id": "a", "kind": "usage", "ts": 1000, "mb": 1.0},
        {"event_id": 2, "customer_id": "a", "kind": "location", "ts": 1000, "lat": 123.0, "lon": 0},
        {"event_id": 3, "customer_id": "a", "kind": "usage", "ts": "yesterday", "mb": 1.0},
        {"event_id": 4, "customer_id": "a", "kind": "teleport", "ts": 1000},
        {"event_id": 5, "customer_id": "a", "kind": "usage", "ts": 1000},
        {"event_id": 6, "customer_id": "a", "kind": "usage", "ts": 1000, "mb": "lots"},
        {"event_id": 7, "customer_id": "a", "kind": "usage", "ts": 1000, "mb": 1.0, "lat": 3.0},
        {"customer_id": "a", "kind": "usage", "ts": 1000, "mb": 1.0},
        {
            "event_id": 9,
            "customer_id": "a",
            "kind": "profile_update",
            "ts": 1000,
            "tz": "Mars/Olympus",
        },
        {
            "event_id": 10,
            "customer_id": "a",
            "kind": "usage",
            "ts": "2026-01-01T00:00:00",
            "mb": 1.0,
        },
        "not a map",
        {
            "event_id": "uuid-12",
            "customer_id": "b",
            "kind": "usage",
            "ts": "2026-01-01T00:00:00Z",
            "mb": 2.0,
        },
    ]
    valid, letters = _check(rows)
    assert valid.column("event_id").to_pylist()[0] == 1 and valid.num_rows == 2
    by_index = {d.index: d for d in letters}
    assert set(by_index) == {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
    assert (
        by_index[1].field == "lat"
        and "123.0" in by_index[1].reason
        and "range" in by_index[1].reason
    )
    assert by_index[2].field == "ts" and "ISO-8601" in by_index[2].reason
    assert by_index[3].field == "kind" and "'teleport'" in by_index[3].reason
    assert "required on a usage event" in by_index[4].reason
    assert by_index[5].field == "mb" and "expected a number" in by_index[5].reason
    assert "not allowed on a usage event" in by_index[6].reason
    assert by_index[7].field == "event_id"
    assert "IANA time zone" in by_index[8].reason and "Mars/Olympus" in by_index[8].reason
    assert "no time zone" in by_index[9].reason
    assert "expected a map" in by_index[10].reason


def test_personal_identifiers_never_appear_in_dead_letters() -> None:
    _, letters = _check([{"event_id": 1, "customer_id": ["+4915112345"], "kind": "usage", "ts": 1}])
    assert letters and "+4915112345" not in str(letters[0]) and letters[0].value == "<withheld>"


def test_text_event_ids_hash_to_the_same_id_everywhere() -> None:
    rows = [{"event_id": "abc", "customer_id": "a", "kind": "checkout", "ts": 1}]
    first, _ = _check(rows)
    again, _ = _check(rows)
    assert first.column("event_id").to_pylist() == again.column("event_id").to_pylist()


def test_compact_copies_slices_that_hold_a_larger_parent() -> None:
    import numpy as np
    import pyarrow as pa

    from engine.events.schema import compact

    big = pa.RecordBatch.from_pydict({"x": np.arange(100_000, dtype=np.int64)})
    part = compact(big.slice(10, 1000))
    assert part.get_total_buffer_size() <= 8 * 1000 + 64
    assert part.column("x").to_pylist() == list(range(10, 1010))
    whole = compact(big)
    assert whole is big


def test_values_arrow_cannot_hold_are_dead_lettered_not_crashed_on() -> None:
    from engine.events.codec import rows_to_batch

    base = {"customer_id": "a", "kind": "profile_update", "ts": 1000}
    rows = [
        {**base, "event_id": 1, "cycle_day": -29494},  # int8
        {**base, "event_id": 2, "tenure_months": 1 << 40},  # int32
        {**base, "event_id": 3, "tz": "Europe/\udbc2"},  # a lone surrogate (JSON allows it)
        {**base, "event_id": 4, "channels": ["sms", "\ud800"]},
        {**base, "event_id": 5, "customer_id": "\udfff"},
        {**base, "event_id": 6, "kind": "\ud800"},
        {**base, "event_id": 7, "cycle_day": 3},
        {**base, "event_id": 8, "ts": -850234018914688605093888},  # found by schemathesis
        {**base, "event_id": 9, "ts": 1e300},
    ]
    batch, positions, letters = rows_to_batch(rows)
    assert positions == [6] and batch.num_rows == 1
    assert [(d.index, d.field) for d in letters] == [
        (0, "cycle_day"), (1, "tenure_months"), (2, "tz"), (3, "channels"),
        (4, "customer_id"), (5, "kind"), (7, "ts"), (8, "ts"),
    ]  # fmt: skip
    assert "timestamp is out of range" in letters[6].reason
    assert "out of range [-128, 127]" in letters[0].reason
    assert all(d.kind in (None, "profile_update") for d in letters)


def test_event_times_outside_1970_to_2200_are_dead_lettered() -> None:
    from engine.events.codec import rows_to_batch

    base = {"customer_id": "a", "kind": "cart_add", "item": "x"}
    rows = [
        {**base, "event_id": 1, "ts": -84312023381098},  # year -702, found by schemathesis
        {**base, "event_id": 2, "ts": 0},
        {**base, "event_id": 3, "ts": "2199-12-31T23:59:59Z"},
        {**base, "event_id": 4, "ts": "2200-01-01T00:00:00Z"},
    ]
    batch, positions, letters = rows_to_batch(rows)
    assert not letters
    result = validate(batch, positions)
    assert [(d.index, d.field) for d in result.dead_letters] == [(0, "ts"), (3, "ts")]
    assert "-84312023381098 ms is outside 1970-01-01 .. 2200-01-01" in result.dead_letters[0].reason
    assert result.keep.tolist() == [False, True, True, False]


@pytest.mark.parametrize("dictionary", [False, True], ids=["plain", "dictionary (Parquet)"])
def test_empty_or_missing_header_fields_of_arrow_batches_are_dead_lettered(dictionary) -> None:
    import pyarrow as pa

    from engine.events.validation import conform

    customers = pa.array(["a", "", None, "b", ""])
    if dictionary:
        customers = customers.dictionary_encode()
    batch = pa.table(
        {
            "event_id": pa.array([1, 2, 3, 4, None], type=pa.uint64()),
            "customer_id": customers,
            "kind": pa.array(["usage", "usage", "usage", "teleport", "usage"]),
            "ts": pa.array([1000] * 5, type=pa.timestamp("ms", tz="UTC")),
            "mb": pa.array([1.0] * 5),
        }
    )
    result = validate(conform(batch))
    reasons = {d.index: (d.field, d.reason) for d in result.dead_letters}
    assert reasons == {
        1: ("customer_id", "field 'customer_id' is empty"),
        2: ("customer_id", "field 'customer_id' is missing"),
        3: ("kind", f"field 'kind' = 'teleport' is not one of {', '.join(KIND_NAMES)}"),
        4: ("event_id", "field 'event_id' is missing"),
    }
    assert result.keep.tolist() == [True, False, False, False, False]
    assert result.kinds.tolist()[3] == -1 and result.kinds.tolist()[0] == EventKind.USAGE
