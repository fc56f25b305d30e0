"""The wire codec's two ways from rows to a raw batch give the same answer.

``rows_to_batch`` builds a batch a column at a time when every row is already as the schema
takes it (``_columns_of``), and row by row otherwise (``_rows_to_batch``, which names each bad
row in a dead letter). The rows here are valid events whose fields sometimes take a value at
or just past an edge (a bool for a number, 1.5 for an integer, bytes for a text, one character
over a limit, an integer past 64 bits): whatever the column path takes must be exactly what
the row path makes of the same rows, and a clean batch must take the column path.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.events.codec import _columns_of, _rows_to_batch, rows_to_batch
from engine.events.schema import KIND_NAMES, PAYLOAD_FIELDS
from engine.fields import MAX_CHARS, MAX_ITEMS
from engine.limits import MAX_ID_CHARS
from tests.pure import examples

PATHS = settings(
    max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_EDGE_INTS = [2**53 + 1, 2**62 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**400]


def _edges(typ: pa.DataType, name: str) -> list[Any]:
    """Values past what a column of ``typ`` takes as it is, or just at its edge."""
    if pa.types.is_floating(typ):
        return [True, False, "1", b"x", *_EDGE_INTS, float("nan"), 2.5]
    if pa.types.is_integer(typ):
        top = 2 ** (typ.bit_width - 1)
        return [1.0, 1.5, True, "1", top - 1, top, -top, -top - 1, 2**64]
    if pa.types.is_boolean(typ):
        return [1, 0, 1.0, "true", None]
    limit = MAX_CHARS.get(name, 40)
    if pa.types.is_list(typ):
        most = MAX_ITEMS.get(name, 4)
        items = [["x" * limit], ["x" * (limit + 1)], ["a"] * most, ["a"] * (most + 1)]
        return [[], [b"sms"], [None], ["sms", 1], "ab", ("sms",), *items]
    return ["", "x" * limit, "x" * (limit + 1), "🙂" * (limit + 1), "\ud800", b"x", 1, True]


def _clean(typ: pa.DataType, name: str) -> st.SearchStrategy[Any]:
    """Values a column of ``typ`` takes as they are."""
    if pa.types.is_floating(typ):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1000, 1000))
    if pa.types.is_integer(typ):
        bits = typ.bit_width - 1
        return st.integers(-(2**bits), 2**bits - 1)
    if pa.types.is_boolean(typ):
        return st.booleans()
    if pa.types.is_list(typ):
        return st.lists(st.sampled_from(["sms", "push", "app"]), max_size=3)
    return st.text(min_size=1, max_size=min(MAX_CHARS.get(name, 40), 40))


_HEADER_EDGES = {
    "event_id": [-1, True, 1.0, "ab", None, 2**64],
    "customer_id": ["", "c" * (MAX_ID_CHARS + 1), "\ud800", 5, b"c1", None],
    "kind": ["", 3, None, "k" * (MAX_ID_CHARS + 1), "\ud800"],
    "ts": [2**63, -(2**63) - 1, 1.0, 1.5, "2026-01-01T00:00:00Z", True, None],
}
_ODD_KEYS = ["unknown", b"mb", 7]


@st.composite
def events(draw: Any) -> dict[Any, Any]:
    """A valid event, its values as the columns take them."""
    event: dict[Any, Any] = {
        "event_id": draw(st.integers(0, 2**64 - 1)),
        "customer_id": draw(st.sampled_from(["c1", "c2", "c" * MAX_ID_CHARS])),
        "kind": draw(st.sampled_from(KIND_NAMES)),
        "ts": draw(st.integers(-(2**63), 2**63 - 1)),
    }
    for name in draw(st.lists(st.sampled_from(sorted(PAYLOAD_FIELDS)), max_size=4)):
        event[name] = draw(_clean(PAYLOAD_FIELDS[name], name))
    return event


@st.composite
def batches(draw: Any) -> list[dict[Any, Any]]:
    """Clean events, mostly with one value at or past an edge (or a field unknown or missing):
    one at a time, so each edge decides alone which path the batch takes."""
    rows = draw(st.lists(events(), min_size=1, max_size=6))
    if draw(st.integers(0, 3)) == 0:
        return rows
    row = rows[draw(st.integers(0, len(rows) - 1))]
    what = draw(st.sampled_from(["header", "payload", "payload", "payload", "unknown", "gone"]))
    if what == "header":
        name = draw(st.sampled_from(sorted(_HEADER_EDGES)))
        row[name] = draw(st.sampled_from(_HEADER_EDGES[name]))
    elif what == "payload":
        name = draw(st.sampled_from(sorted(PAYLOAD_FIELDS)))
        row[name] = draw(st.sampled_from(_edges(PAYLOAD_FIELDS[name], name)))
    elif what == "unknown":
        row[draw(st.sampled_from(_ODD_KEYS))] = 1.0
    else:
        del row[draw(st.sampled_from(sorted(_HEADER_EDGES)))]
    return rows


def _one_edge_batches() -> list[list[dict[Any, Any]]]:
    """Every edge value of every field alone in a batch of two events, every odd key, and every
    header field missing: the same edges the property draws, each one surely tried."""

    def pair(change: Any) -> list[dict[Any, Any]]:
        rows = [
            {"event_id": 1, "customer_id": "c1", "kind": "usage", "ts": 5, "mb": 1.5},
            {"event_id": 2, "customer_id": "c2", "kind": "profile_update", "ts": 6},
        ]
        change(rows[1])
        return rows

    out = []
    for name, values in [*_HEADER_EDGES.items()] + [
        (name, _edges(typ, name)) for name, typ in PAYLOAD_FIELDS.items()
    ]:
        out += [pair(lambda row, n=name, v=value: row.__setitem__(n, v)) for value in values]
    out += [pair(lambda row, k=key: row.__setitem__(k, 1.0)) for key in _ODD_KEYS]
    out += [pair(lambda row, n=name: row.pop(n)) for name in _HEADER_EDGES]
    return out


def _same_answer(rows: list[dict[Any, Any]]) -> None:
    slow_batch, slow_positions, slow_letters = _rows_to_batch(rows)
    fast = _columns_of(rows)
    if fast is not None:
        assert not slow_letters, f"the column path took rows the row path refuses: {rows}"
        assert fast.schema == slow_batch.schema
        assert _plain(fast) == _plain(slow_batch)
    batch, positions, letters = rows_to_batch(rows)
    assert _plain(batch) == _plain(slow_batch)
    assert positions == slow_positions
    assert [(d.index, d.reason) for d in letters] == [(d.index, d.reason) for d in slow_letters]


def _plain(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """The batch's rows, with NaN as a marker (NaN is not equal to itself) and times as
    integers (Python's datetime does not reach every 64-bit millisecond)."""

    def value(v: Any) -> Any:
        return "NaN" if isinstance(v, float) and math.isnan(v) else v

    columns = {
        name: (col.cast(pa.int64()) if pa.types.is_timestamp(col.type) else col).to_pylist()
        for name, col in zip(batch.schema.names, batch.columns, strict=True)
    }
    return [
        {name: value(values[i]) for name, values in columns.items()} for i in range(batch.num_rows)
    ]


@PATHS
@given(batches())
def test_the_column_path_takes_only_what_the_row_path_takes_the_same_way(rows) -> None:
    _same_answer(rows)


def test_each_edge_alone_gets_the_row_paths_answer() -> None:
    batches = _one_edge_batches()
    for rows in batches:
        _same_answer(rows)
    taken = sum(_columns_of(rows) is not None for rows in batches)
    assert 0 < taken < len(batches) / 2  # values at the edge take the column path, past it not


@PATHS
@given(st.lists(events(), min_size=1, max_size=6))
def test_a_clean_batch_takes_the_column_path(rows) -> None:
    fast = _columns_of(rows)
    assert fast is not None
    assert _plain(fast) == _plain(_rows_to_batch(rows)[0])
