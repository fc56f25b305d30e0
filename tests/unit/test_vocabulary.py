"""One vocabulary (``engine.fields``): every name a rule can use is one the view computes, and
every derived list (schemas, store, validation ranges) agrees with the table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from engine.config import EngineSettings
from engine.events.schema import KIND_NAMES, PAYLOAD_FIELDS, RAW_SCHEMA, ROUTED_SCHEMA
from engine.events.validation import _RANGES as VALIDATION_RANGES
from engine.fields import FIELDS, names
from engine.local import LocalEngine
from engine.rules.expr import BUILTINS
from engine.rules.spec import VOCABULARY, parse_rules
from engine.state.store import COLUMNS, PROFILE_COLUMNS
from engine.state.view import AGGREGATES, BatchView
from tests.conftest import ms

EVERY_KIND = [
    ("usage", {"mb": 10.0}),
    ("location", {"lat": 52.5, "lon": 13.4}),
    ("purchase", {"amount": 5.0, "item": "sku"}),
    ("page_view", {"page": "/plans"}),
    ("cart_add", {"item": "sku"}),
    ("checkout", {}),
    ("offer_response", {"decision_id": "00000000000000aa", "response": "accepted"}),
    ("profile_update", {"plan_data_cap_mb": 1000.0, "tz": "Europe/Berlin", "tenure_months": 3}),
    ("consent", {"channel": "sms", "granted": True}),
]


def test_the_rule_vocabulary_is_the_field_tables_expression_names() -> None:
    fields = {f.name for f in FIELDS if f.expr is not None}
    # and where the phone is now: derived from location events, not a field of its own
    assert set(VOCABULARY) == fields | {"current_lat", "current_lon"}


@pytest.mark.parametrize("name", sorted(VOCABULARY))
def test_every_name_a_rule_accepts_is_computed_by_the_view_on_every_kind(name, event) -> None:
    test = f"{name} == {name}" if VOCABULARY[name] == "num" else f"{name} != 'x'"
    rules = parse_rules(
        {"rules": [{"id": "r", "type": "condition", "on": list(KIND_NAMES), "when": test}]}
    )
    engine = LocalEngine(EngineSettings(shards=1, allowed_lateness_s=0), rules)
    rows = [
        event(k, "c", ms(2026, 3, 1, 10, i), **fields) for i, (k, fields) in enumerate(EVERY_KIND)
    ]
    assert engine.submit_rows(rows) == []
    engine.end_stream()  # evaluates the rule on every kind: a name the view lacks raises


def test_the_view_computes_the_implicit_names_of_the_builtins(event) -> None:
    reads = {r for f in BUILTINS.values() for r in f.reads}
    engine = LocalEngine(EngineSettings(shards=1), parse_rules({"rules": []}))
    shard = engine.shards[0]
    view = BatchView(ROUTED_SCHEMA.empty_table(), np.zeros(0, dtype=np.int64),
                     np.zeros(0, dtype=np.int64), shard.store)  # fmt: skip
    for name in sorted(reads):
        assert view.column(name).size == 0


def test_schemas_store_and_validation_derive_from_the_table() -> None:
    wire = [
        f.name for f in FIELDS if f.wire is not None and (f.role == "event" or f.on_profile_update)
    ]
    assert list(PAYLOAD_FIELDS) == wire
    assert all(name in RAW_SCHEMA.names and name in ROUTED_SCHEMA.names for name in wire)
    for f in FIELDS:
        if f.store is not None:
            assert COLUMNS[f.name].dtype == f.store, f.name
    assert names("profile") == PROFILE_COLUMNS
    assert names("aggregate") == AGGREGATES
    numeric_wire = {
        f.name for f in FIELDS if (f.wire is not None and pa.types.is_integer(f.wire))
        or (f.wire is not None and pa.types.is_floating(f.wire))
    }  # fmt: skip
    assert set(VALIDATION_RANGES) == numeric_wire  # every number on the wire has a range


def test_every_text_field_on_the_wire_has_a_length_limit() -> None:
    for f in FIELDS:
        if f.wire is None:
            continue
        text = pa.types.is_string(f.wire) or pa.types.is_list(f.wire)
        assert (f.max_chars is not None) == text, f.name
        if pa.types.is_list(f.wire):
            assert f.max_items is not None, f.name
