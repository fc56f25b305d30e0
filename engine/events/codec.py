"""Wire codec: msgpack (and JSON) events <-> Arrow raw batches.

Wire events are maps: ``{"event_id", "customer_id", "kind", "ts", ...payload fields}``. A
payload is one map (one event) or an array of maps (a batch). Decoding coerces each row's
types; a row that cannot be coerced becomes a dead letter and the other rows are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgpack
import pyarrow as pa

from engine.errors import EventError
from engine.events.deadletter import DeadLetter, show_value
from engine.events.schema import PAYLOAD_FIELDS, RAW_SCHEMA

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


def _coerce(field: str, typ: pa.DataType, value: Any) -> Any:
    if value is None:
        return None
    if pa.types.is_floating(typ):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)
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
        return _text(value)
    if pa.types.is_list(typ):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of strings")
        return [_text(v) for v in value]
    raise TypeError(f"unsupported type {typ} for field {field}")  # pragma: no cover


def _coerce_row(index: int, row: Any) -> tuple[dict[str, Any] | None, DeadLetter | None]:
    if not isinstance(row, Mapping):
        return None, DeadLetter(index, f"expected a map, got {type(row).__name__}")
    out: dict[str, Any] = {}
    event_id: int | None = None
    raw_id = row.get("event_id")
    raw_kind = row.get("kind")
    kind = raw_kind if isinstance(raw_kind, str) and _is_text(raw_kind) else None

    def bad(field: str, reason: str) -> tuple[None, DeadLetter]:
        value = show_value(field, row.get(field))
        return None, DeadLetter(
            index, f"field '{field}' = {value}: {reason}", field, value, event_id, kind
        )

    if isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id <= _U64_MAX:
        event_id = raw_id
    elif isinstance(raw_id, str) and raw_id and _is_text(raw_id):
        event_id = event_id_from_text(raw_id)
    else:
        return bad("event_id", "missing, or not an unsigned 64-bit integer or a non-empty string")
    out["event_id"] = event_id
    customer = row.get("customer_id")
    if isinstance(customer, int) and not isinstance(customer, bool):
        customer = str(customer)
    if not isinstance(customer, str) or not customer or not _is_text(customer):
        return bad("customer_id", "missing or not a non-empty string")
    out["customer_id"] = customer
    if kind is None or not _is_text(kind):
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
        typ = PAYLOAD_FIELDS.get(field)
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
    """
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
    """One event (a map) or a batch (an array of maps) from msgpack bytes."""
    try:
        obj = msgpack.unpackb(payload, raw=False, timestamp=0, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise EventError(f"body is not valid msgpack: {exc}") from exc
    return _as_rows(obj)


def decode_json(payload: bytes) -> list[Any]:
    """One event (an object) or a batch (an array of objects) from JSON bytes."""
    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EventError(f"body is not valid JSON: {exc}") from exc
    return _as_rows(obj)


def _as_rows(obj: Any) -> list[Any]:
    if isinstance(obj, Mapping):
        return [obj]
    if isinstance(obj, list):
        return obj
    raise EventError(f"expected an event (a map) or a batch (an array), got {type(obj).__name__}")


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
