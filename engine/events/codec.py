"""Wire codec: msgpack (and JSON) events <-> Arrow raw batches.

Wire events are maps: ``{"event_id", "customer_id", "kind", "ts", ...payload fields}``. A
payload is one map (one event) or an array of maps (a batch). Decoding coerces each row's
types; a row that cannot be coerced becomes a dead letter and the other rows are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from itertools import chain, repeat
from typing import Any

import msgpack
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import EventError, PayloadTooLargeError
from engine.events.deadletter import DeadLetter, label, show_value
from engine.events.schema import PAYLOAD_FIELDS, RAW_SCHEMA
from engine.fields import MAX_CHARS, MAX_ITEMS
from engine.limits import (
    MAX_EVENT_DEPTH,
    MAX_EVENTS_PER_REQUEST,
    MAX_FIELDS_PER_EVENT,
    MAX_ID_CHARS,
)

_U64_MAX = (1 << 64) - 1
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_HEADER = ("event_id", "customer_id", "kind", "ts")


def event_id_from_text(text: str) -> int:
    """A stable 64-bit event id for a textual id (a UUID, say); every process agrees."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _to_ms(value: Any) -> int:
    ms = _epoch_ms(value)
    if not _I64_MIN <= ms <= _I64_MAX:
        raise ValueError("timestamp is out of range (epoch milliseconds must fit in 64 bits)")
    return ms


def _epoch_ms(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("expected a timestamp, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("timestamp is not finite")
        return round(value)
    if isinstance(value, msgpack.Timestamp):
        return value.to_unix_nano() // 1_000_000
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError("not an ISO-8601 timestamp") from exc
        value = parsed
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("timestamp has no time zone (add Z or an offset)")
        return round(value.timestamp() * 1000)
    raise TypeError(
        f"expected epoch milliseconds or an ISO-8601 string, got {type(value).__name__}"
    )


def _text(value: str) -> str:
    """``value`` if it can be stored as UTF-8 (JSON can carry lone surrogates; Arrow cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("not valid Unicode text (a lone surrogate)") from exc
    return value


def _is_text(value: str) -> bool:
    try:
        _text(value)
    except ValueError:
        return False
    return True


def _int_range(typ: pa.DataType) -> tuple[int, int]:
    bits = typ.bit_width
    if pa.types.is_signed_integer(typ):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _short(field: str, value: str) -> str:
    limit = MAX_CHARS.get(field)
    if limit is not None and len(value) > limit:
        raise ValueError(f"longer than {limit} characters (the limit for '{field}')")
    return _text(value)


def _coerce(field: str, typ: pa.DataType, value: Any) -> Any:
    if value is None:
        return None
    if pa.types.is_floating(typ):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: out of every field's range
            raise ValueError("out of range (too large for a number)") from None
    if pa.types.is_integer(typ):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        low, high = _int_range(typ)
        if not low <= value <= high:
            raise ValueError(f"out of range [{low}, {high}]")
        return value
    if pa.types.is_boolean(typ):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {type(value).__name__}")
        return value
    if pa.types.is_string(typ):
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return _short(field, value)
    if pa.types.is_list(typ):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of strings")
        most = MAX_ITEMS.get(field)
        if most is not None and len(value) > most:
            raise ValueError(f"more than {most} items (the limit for '{field}')")
        return [_short(field, v) for v in value]
    raise TypeError(f"unsupported type {typ} for field {field}")  # pragma: no cover


def _coerce_row(index: int, row: Any) -> tuple[dict[str, Any] | None, DeadLetter | None]:
    if not isinstance(row, Mapping):
        return None, DeadLetter(index, f"expected a map, got {type(row).__name__}")
    out: dict[str, Any] = {}
    event_id: int | None = None
    raw_id = row.get("event_id")
    raw_kind = row.get("kind")
    kind = raw_kind if isinstance(raw_kind, str) and _is_text(raw_kind) else None

    def bad(field: Any, reason: str) -> tuple[None, DeadLetter]:
        name = label(field)  # a key may be anything: the letter holds printable text
        value = show_value(name, row.get(field))
        return None, DeadLetter(
            index, f"field '{name}' = {value}: {reason}", name, value, event_id, kind
        )

    if len(row) > MAX_FIELDS_PER_EVENT:
        return None, DeadLetter(
            index, f"{len(row)} fields: an event has at most {MAX_FIELDS_PER_EVENT}", None, None
        )
    if isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id <= _U64_MAX:
        event_id = raw_id
    elif isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_CHARS and _is_text(raw_id):
        event_id = event_id_from_text(raw_id)
    else:
        return bad(
            "event_id",
            "missing, or not an unsigned 64-bit integer or a non-empty string of at most "
            f"{MAX_ID_CHARS} characters",
        )
    out["event_id"] = event_id
    customer = row.get("customer_id")
    if isinstance(customer, int) and not isinstance(customer, bool):
        customer = str(customer)
    if not isinstance(customer, str) or not customer or not _is_text(customer):
        return bad("customer_id", "missing or not a non-empty string")
    if len(customer) > MAX_ID_CHARS:
        return bad("customer_id", f"longer than {MAX_ID_CHARS} characters")
    out["customer_id"] = customer
    if kind is None or len(kind) > MAX_ID_CHARS:
        return bad("kind", "missing or not a string")
    out["kind"] = kind
    if "ts" not in row:
        return bad("ts", "missing")
    try:
        out["ts"] = _to_ms(row["ts"])
    except (TypeError, ValueError, OverflowError) as exc:
        return bad("ts", str(exc))
    for field, value in row.items():
        if field in _HEADER:
            continue
        typ = PAYLOAD_FIELDS.get(field) if isinstance(field, str) else None
        if typ is None:
            return bad(field, "unknown field")
        try:
            out[field] = _coerce(field, typ, value)
        except (TypeError, ValueError) as exc:
            return bad(field, str(exc))
    return out, None


def rows_to_batch(rows: Sequence[Any]) -> tuple[pa.RecordBatch, list[int], list[DeadLetter]]:
    """Coerce wire rows into a raw batch.

    Returns the batch, the input position of each of its rows, and a dead letter for each row
    that could not be coerced. Semantic checks (kinds, ranges) come after, in ``validate``.

    A batch whose every row is already what the schema takes (integer ids and times, known
    fields, values of the field's exact type within its limits) is converted a column at a
    time (``_columns_of``); any other batch row by row (``_rows_to_batch``), which names each
    bad row. Both give the same answer for every batch the first takes (a property test).
    """
    batch = _columns_of(rows)
    if batch is not None:
        return batch, list(range(len(rows))), []
    return _rows_to_batch(rows)


#: the Python types a column takes as they are in the column fast path (``_columns_of``);
#: anything else (an ISO time, a textual id, an integral float for an integer, a bool where a
#: number goes) takes the row-by-row path, which coerces it or names it in a dead letter
def _exact_types(typ: pa.DataType) -> frozenset[type]:
    if pa.types.is_floating(typ):
        return frozenset({float, int})  # an int beyond 64 bits: Arrow refuses, rows decide
    if pa.types.is_integer(typ) or pa.types.is_timestamp(typ):
        return frozenset({int})  # out of the type's range: Arrow refuses, rows decide
    if pa.types.is_boolean(typ):
        return frozenset({bool})
    if pa.types.is_string(typ):
        return frozenset({str})
    return frozenset({list})  # a list of strings (``channels``)


_TYPES = {f.name: _exact_types(f.type) for f in RAW_SCHEMA}
_FIELD_NAMES = frozenset(RAW_SCHEMA.names)
_HEADER_LIMITS = {"customer_id": MAX_ID_CHARS, "kind": MAX_ID_CHARS}
_NONE = type(None)
#: a row of known fields never has more than the schema's columns
assert len(RAW_SCHEMA) <= MAX_FIELDS_PER_EVENT


def _columns_of(rows: Sequence[Any]) -> pa.RecordBatch | None:
    """The raw batch of ``rows``, built a column at a time, if every row is a plain map whose
    values are all as the schema takes them; None when any is not (the caller then goes row by
    row). Checks: only known field names; the header's fields present and of their exact type
    (``_TYPES``: no bools for numbers, no integral floats for integers); Arrow's conversion
    refusing out-of-range integers and lone surrogates; ids non-empty; texts and lists within
    ``MAX_CHARS`` / ``MAX_ITEMS``."""
    if not rows or set(map(type, rows)) != {dict}:
        return None
    names = set().union(*rows)
    if not names <= _FIELD_NAMES:
        return None
    arrays = []
    try:
        for field in RAW_SCHEMA:
            if field.name not in names:
                if not field.nullable:
                    return None
                arrays.append(pa.nulls(len(rows), field.type))
                continue
            values = list(map(dict.get, rows, repeat(field.name)))
            types = set(map(type, values))
            if not field.nullable and _NONE in types:
                return None
            if not types - {_NONE} <= _TYPES[field.name]:
                return None
            if list in types:  # Arrow would take bytes, or a null, for a string item
                items = chain.from_iterable(v for v in values if v is not None)
                if not set(map(type, items)) <= {str}:
                    return None
            array = pa.array(values, type=field.type)
            if not _within_limits(field.name, array):
                return None
            arrays.append(array)
    except (pa.ArrowException, OverflowError, UnicodeEncodeError, TypeError, ValueError):
        return None
    return pa.RecordBatch.from_arrays(arrays, schema=RAW_SCHEMA)


def _within_limits(name: str, array: pa.Array) -> bool:
    """Whether every value of a column is within its field's limits (the ids non-empty)."""
    if name in _HEADER_LIMITS:
        lengths = pc.utf8_length(array)
        return pc.min(lengths).as_py() >= 1 and pc.max(lengths).as_py() <= _HEADER_LIMITS[name]
    if pa.types.is_list(array.type):
        items = array.flatten()
        most = MAX_ITEMS.get(name)
        if most is not None and (pc.max(pc.list_value_length(array)).as_py() or 0) > most:
            return False
        array = items
    limit = MAX_CHARS.get(name)
    if limit is None or not pa.types.is_string(array.type) or len(array) == 0:
        return True
    return (pc.max(pc.utf8_length(array)).as_py() or 0) <= limit


def _rows_to_batch(rows: Sequence[Any]) -> tuple[pa.RecordBatch, list[int], list[DeadLetter]]:
    """``rows_to_batch`` a row at a time: each row coerced or made a dead letter."""
    good: list[dict[str, Any]] = []
    positions: list[int] = []
    letters: list[DeadLetter] = []
    for i, row in enumerate(rows):
        coerced, letter = _coerce_row(i, row)
        if letter is not None:
            letters.append(letter)
        else:
            assert coerced is not None
            good.append(coerced)
            positions.append(i)
    columns: dict[str, list[Any]] = {name: [] for name in RAW_SCHEMA.names}
    for row in good:
        for name, values in columns.items():
            values.append(row.get(name))
    arrays = [pa.array(columns[f.name], type=f.type) for f in RAW_SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=RAW_SCHEMA), positions, letters


def decode_msgpack(payload: bytes) -> list[Any]:
    """One event (a map) or a batch (an array of maps) from msgpack bytes.

    EventError when the body is not msgpack or nests too deeply; PayloadTooLargeError when it
    holds more than MAX_EVENTS_PER_REQUEST events.
    """
    try:
        obj = msgpack.unpackb(payload, raw=False, timestamp=0, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise EventError(f"body is not valid msgpack: {exc}") from exc
    except (TypeError, OverflowError, RecursionError, MemoryError) as exc:  # odd keys, ext types
        raise EventError(f"body is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    return _as_rows(obj)


def _json_int(text: str) -> int | float:
    """JSON integers as ints, except ones too long for any field: those become +-inf, which
    every numeric check refuses by field (Python refuses to parse 4,300+ digits at all)."""
    if len(text) <= 40:
        return int(text)
    return -math.inf if text.startswith("-") else math.inf


def decode_json(payload: bytes) -> list[Any]:
    """One event (an object) or a batch (an array of objects) from JSON bytes; see
    ``decode_msgpack`` for the errors."""
    try:
        obj = json.loads(payload, parse_int=_json_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EventError(f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise EventError(
            f"body nests deeper than {MAX_EVENT_DEPTH} levels (limit max_event_depth)"
        ) from exc
    except (ValueError, MemoryError) as exc:
        raise EventError(f"body is not valid JSON: {type(exc).__name__}: {exc}") from exc
    return _as_rows(obj)


def _as_rows(obj: Any) -> list[Any]:
    if isinstance(obj, Mapping):
        rows = [obj]
    elif isinstance(obj, list):
        rows = obj
    else:
        raise EventError(
            f"expected an event (a map) or a batch (an array), got {type(obj).__name__}"
        )
    if len(rows) > MAX_EVENTS_PER_REQUEST:
        raise PayloadTooLargeError(
            f"{len(rows):,} events in one request: the limit is {MAX_EVENTS_PER_REQUEST:,} "
            "(max_events_per_request); send them in several requests"
        )
    if _flat_maps(rows):
        return rows
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise EventError(
                f"item {i} of the batch is a {type(row).__name__}, not an event map: a body is an "
                "event map or an array of event maps"
            )
        for value in row.values():
            if _nested(value):
                raise EventError(
                    f"event {i} nests deeper than {MAX_EVENT_DEPTH} levels (max_event_depth): "
                    "an event's values are numbers, strings, booleans or lists of them"
                )
    return rows


def _flat_maps(rows: list[Any]) -> bool:
    """Whether every row is a plain map whose values are scalars or lists of scalars, judged
    by their types all at once; False when not, or not sure (the caller then looks row by
    row, and names the row)."""
    if not set(map(type, rows)) <= {dict}:
        return False
    containers = {k for k in set(map(type, chain.from_iterable(map(_VALUES, rows)))) if _nests(k)}
    if not containers:
        return True
    if not containers <= {list, tuple}:  # a map, or a subclass of one: row by row
        return False
    values = chain.from_iterable(map(_VALUES, rows))
    items = chain.from_iterable(v for v in values if type(v) in _SEQUENCES)
    return not any(map(_nests, set(map(type, items))))


_VALUES: Callable[[Any], Iterable[Any]] = dict.values
_SEQUENCES = (list, tuple)


def _nests(kind: type) -> bool:
    """Whether values of ``kind`` may hold others (maps, lists, tuples and their subclasses)."""
    return issubclass(kind, Mapping | list | tuple)


def _nested(value: Any) -> bool:
    """Is an event's value a map, or a list holding a container?"""
    if isinstance(value, Mapping):
        return True
    return isinstance(value, list | tuple) and any(
        isinstance(v, list | tuple | Mapping) for v in value
    )


def _wire_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return round(value.astimezone(UTC).timestamp() * 1000)
    return value


def encode_event(event: Mapping[str, Any]) -> bytes:
    """One event as msgpack; timestamps become epoch milliseconds, null fields are left out."""
    return msgpack.packb({k: _wire_value(v) for k, v in event.items() if v is not None})


def encode_batch(events: Sequence[Mapping[str, Any]]) -> bytes:
    """A batch of events as a msgpack array."""
    return msgpack.packb(
        [{k: _wire_value(v) for k, v in e.items() if v is not None} for e in events]
    )


def batch_to_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """Raw Arrow events as wire rows (null fields dropped, ts as epoch ms)."""
    rows = batch.to_pylist()
    return [{k: _wire_value(v) for k, v in row.items() if v is not None} for row in rows]
