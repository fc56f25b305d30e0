"""Vectorized semantic checks of raw event batches; each failure names the field and value.

Checks run as pyarrow/numpy masks over the whole batch; only the rejected rows are visited one
by one, to write their reasons. Valid rows next to invalid ones are kept.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import EventError
from engine.events.deadletter import DeadLetter, show_value
from engine.events.schema import (
    CONSENT_CHANNELS,
    KIND_NAMES,
    KIND_SPECS,
    PAYLOAD_FIELDS,
    RAW_SCHEMA,
    RESPONSES,
    EventKind,
)
from engine.fields import RANGES
from engine.limits import TS_MAX_MS, TS_MIN_MS, TS_RANGE_TEXT

_RANGES: dict[str, tuple[float, float]] = RANGES
#: accepted event times: [1970-01-01, 2200-01-01) UTC, in epoch milliseconds
_CHOICES: dict[str, tuple[str, ...]] = {"response": RESPONSES, "channel": CONSENT_CHANNELS}
#: _ALLOWED[field][kind code]: may a kind carry the field
_ALLOWED: dict[str, np.ndarray] = {
    field: np.array([field in KIND_SPECS[k].allowed for k in EventKind], dtype=bool)
    for field in PAYLOAD_FIELDS
}


@lru_cache(maxsize=4096)
def is_time_zone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long
        return False
    return True


@dataclass(frozen=True)
class Validated:
    """Which rows passed (``keep``), every row's input position, dead letters of the rest."""

    batch: pa.RecordBatch
    keep: np.ndarray
    positions: np.ndarray
    dead_letters: list[DeadLetter]
    #: EventKind code per row, -1 where the kind is unknown
    kinds: np.ndarray

    def valid(self) -> pa.RecordBatch:
        """Just the rows that passed."""
        return self.batch if self.keep.all() else self.batch.filter(pa.array(self.keep))


def conform(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """Cast a batch from any source to the raw schema: missing payload columns become null.

    Raises EventError naming the column when a column cannot be cast or a header column is
    missing: a whole file with a wrong schema is a user error, not a per-event one.
    """
    if isinstance(batch, pa.Table):
        batch = (
            batch.combine_chunks().to_batches()[0]
            if batch.num_rows
            else pa.RecordBatch.from_pylist([], schema=RAW_SCHEMA)
        )
    arrays = []
    unknown = set(batch.schema.names) - set(RAW_SCHEMA.names)
    if unknown:
        raise EventError(
            f"unknown columns {sorted(unknown)}; expected a subset of {RAW_SCHEMA.names}"
        )
    for field in RAW_SCHEMA:
        if field.name not in batch.schema.names:
            if not field.nullable:
                raise EventError(f"column '{field.name}' is missing")
            arrays.append(pa.nulls(batch.num_rows, type=field.type))
            continue
        column = batch.column(field.name)
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode() if field.name != "customer_id" else column
        if field.name == "customer_id" and pa.types.is_dictionary(column.type):
            arrays.append(column)  # kept dictionary-encoded: pseudonymization hashes the uniques
            continue
        if not column.type.equals(field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise EventError(
                    f"column '{field.name}' has type {column.type}, expected {field.type}: {exc}"
                ) from exc
        arrays.append(column)
    names = RAW_SCHEMA.names
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _np_bool(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _present(arr: pa.Array) -> np.ndarray:
    """Per row: the value is not null (from the validity bitmap; no nulls to fill)."""
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def validate(
    batch: pa.RecordBatch, positions: Sequence[int] | np.ndarray | None = None
) -> Validated:
    """Check kinds, required and allowed fields per kind, ranges and choices, vectorized."""
    n = batch.num_rows
    pos = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    reasons: dict[int, tuple[str, str | None, str | None]] = {}

    def flag(mask: np.ndarray, field: str | None, template: str) -> None:
        """Reject rows in ``mask`` not yet rejected; ``{value}`` in the template is the value."""
        new = mask & ~bad
        for i in np.flatnonzero(new).tolist():
            value = show_value(field, batch.column(field)[i].as_py()) if field else None
            shown = value if "{value}" in template else None
            reasons[i] = (template.format(value=value), field, shown)
        bad[new] = True

    for header in ("event_id", "customer_id", "kind", "ts"):
        if batch.column(header).null_count:
            flag(~_present(batch.column(header)), header, f"field '{header}' is missing")
    # event time within a plausible range (the calendar math of the rules needs real dates)
    ts_ms = pc.fill_null(batch.column("ts").cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    odd = ~bad & ((ts_ms < TS_MIN_MS) | (ts_ms >= TS_MAX_MS))
    for i in np.flatnonzero(odd).tolist():
        ms_text = f"{int(ts_ms[i])} ms"
        reasons[i] = (f"field 'ts' = {ms_text} is outside {TS_RANGE_TEXT}", "ts", ms_text)
    bad[odd] = True
    customer = batch.column("customer_id")
    if pa.types.is_dictionary(customer.type):  # look at each distinct identifier once
        empty_entry = _np_bool(pc.equal(pc.binary_length(customer.dictionary), 0))
        if empty_entry.any():
            indices = pc.fill_null(customer.indices, 0).to_numpy(zero_copy_only=False)
            flag(empty_entry[indices], "customer_id", "field 'customer_id' is empty")
    else:
        empty = _np_bool(pc.equal(pc.binary_length(customer), 0))
        flag(empty, "customer_id", "field 'customer_id' is empty")

    kind_col = batch.column("kind")
    index = pc.index_in(kind_col, value_set=pa.array(KIND_NAMES))
    codes = pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    flag(codes < 0, "kind", f"field 'kind' = {{value}} is not one of {', '.join(KIND_NAMES)}")

    none_present = np.zeros(n, dtype=bool)
    present = {
        name: none_present if batch.column(name).null_count == n else _present(batch.column(name))
        for name in PAYLOAD_FIELDS
    }
    in_batch = [name for name in PAYLOAD_FIELDS if batch.column(name).null_count < n]
    kinds_here = np.flatnonzero(np.bincount(codes[codes >= 0], minlength=1))  # small codes
    for code in kinds_here.tolist():
        kind = EventKind(code)
        spec = KIND_SPECS[kind]
        of_kind = codes == code
        for field in spec.required:
            flag(
                of_kind & ~present[field],
                field,
                f"field '{field}' is required on a {kind.wire_name} event",
            )
        if spec.any_of:
            none = of_kind & ~np.logical_or.reduce([present[f] for f in spec.any_of])
            flag(
                none,
                None,
                f"a {kind.wire_name} event needs at least one of {', '.join(spec.any_of)}",
            )
    safe_codes = np.maximum(codes, 0)
    for field in in_batch:  # a field present on a kind that does not carry it
        wrong = present[field] & ~_ALLOWED[field][safe_codes] & (codes >= 0)
        if wrong.any():
            for code in np.unique(codes[wrong]).tolist():
                flag(
                    wrong & (codes == code),
                    field,
                    f"field '{field}' = {{value}} is not allowed on a "
                    f"{EventKind(code).wire_name} event",
                )

    for field, (lo, hi) in _RANGES.items():
        if field not in in_batch:
            continue
        values = batch.column(field).to_numpy(zero_copy_only=False).astype(np.float64)
        with np.errstate(invalid="ignore"):
            out = present[field] & ~((values >= lo) & (values <= hi))
        flag(out, field, f"field '{field}' = {{value}} is out of range [{lo:g}, {hi:g}]")
    for field, choices in _CHOICES.items():
        if field not in in_batch:
            continue
        ok = _np_bool(pc.is_in(batch.column(field), value_set=pa.array(choices)))
        flag(
            present[field] & ~ok,
            field,
            f"field '{field}' = {{value}} is not one of {', '.join(choices)}",
        )
    tz = batch.column("tz")
    if present["tz"].any():
        zones = pc.unique(tz.drop_null()).to_pylist()
        invalid = [z for z in zones if not is_time_zone(z)]
        if invalid:
            flag(
                _np_bool(pc.is_in(tz, value_set=pa.array(invalid))),
                "tz",
                "field 'tz' = {value} is not an IANA time zone",
            )
    chan = batch.column("channels")
    if present["channels"].any():
        flat = pc.list_flatten(chan)
        known = CONSENT_CHANNELS[:-1]
        unknown = [c for c in pc.unique(flat).to_pylist() if c not in known]
        if unknown:
            parent = pc.list_parent_indices(chan).to_numpy()
            hit = np.zeros(n, dtype=bool)
            hit[parent[_np_bool(pc.is_in(flat, value_set=pa.array(unknown)))]] = True
            flag(
                hit,
                "channels",
                f"field 'channels' = {{value}} names an unknown channel "
                f"(known: {', '.join(known)})",
            )

    letters = []
    ids = batch.column("event_id")
    for i in sorted(reasons):
        reason, bad_field, shown = reasons[i]
        letters.append(
            DeadLetter(int(pos[i]), reason, bad_field, shown, ids[i].as_py(), kind_col[i].as_py())
        )
    return Validated(batch, ~bad, pos, letters, codes)


__all__ = ["EventKind", "Validated", "conform", "validate"]
