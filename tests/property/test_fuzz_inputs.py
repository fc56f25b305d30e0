"""Fuzzing the parsers and validators: whatever comes in, the answer is the error type of the
layer (EventError, RuleError, CatalogError, YAMLError) or a result, never a crash; and the
dead letters of a request are always encodable as JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.decision.catalog import parse_catalog
from engine.errors import CatalogError, EventError, RuleError
from engine.events.codec import decode_json, decode_msgpack, rows_to_batch
from engine.events.schema import KIND_NAMES, PAYLOAD_FIELDS
from engine.events.validation import validate
from engine.gateway import letter_json
from engine.rules.expr import compile_expression
from engine.rules.spec import VOCABULARY, parse_rules
from engine.yamlfile import load_yaml
from tests.pure import examples

FUZZ = settings(
    max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

nasty_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\ud800", "x" * 5000, "", "🙂" * 100, "Europe/Berlin" * 30, "NaN"]),
)
nasty_number = st.one_of(
    st.integers(),
    st.sampled_from([10**400, -(10**30), 2**64, 2**63, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalar = st.one_of(st.none(), st.booleans(), nasty_number, nasty_text)
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    nasty_text, inner, max_size=4), max_leaves=12)  # fmt: skip
field_name = st.one_of(st.sampled_from([*PAYLOAD_FIELDS, "event_id", "kind", "ts"]), nasty_text)


@st.composite
def wire_events(draw: Any) -> dict[Any, Any]:
    event: dict[Any, Any] = {
        "event_id": draw(st.one_of(st.integers(0, 2**64 - 1), nasty_text, nasty_number)),
        "customer_id": draw(st.one_of(st.sampled_from(["c1", "c2"]), nasty_text, nasty_number)),
        "kind": draw(st.one_of(st.sampled_from(KIND_NAMES), nasty_text)),
        "ts": draw(st.one_of(st.integers(-(2**70), 2**70), nasty_text, nasty_number)),
    }
    for _ in range(draw(st.integers(0, 5))):
        event[draw(field_name)] = draw(value)
    return event


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_a_clear_event_error_or_rows(body) -> None:
    for decode in (decode_json, decode_msgpack):
        try:
            decode(body)
        except EventError as exc:
            assert str(exc)


@FUZZ
@given(st.lists(st.one_of(wire_events(), value), max_size=8))
def test_any_rows_become_a_batch_and_dead_letters_never_a_crash(rows) -> None:
    batch, positions, letters = rows_to_batch(rows)
    checked = validate(batch, np.asarray(positions, dtype=np.int64))
    assert batch.num_rows + len(letters) == len(rows)
    for letter in [*letters, *checked.dead_letters]:  # the API can always answer with them
        json.dumps(letter_json(letter), allow_nan=False).encode("utf-8")


@FUZZ
@given(st.lists(wire_events(), max_size=5))
def test_rows_through_json_and_msgpack_decode_or_fail_cleanly(rows) -> None:
    for encode, decode in ((_json_bytes, decode_json), (_msgpack_bytes, decode_msgpack)):
        body = encode(rows)
        if body is None:
            continue
        try:
            decoded = decode(body)
        except EventError:
            continue
        rows_to_batch(decoded)


def _json_bytes(rows: list[Any]) -> bytes | None:
    try:
        return json.dumps(rows).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return None


def _msgpack_bytes(rows: list[Any]) -> bytes | None:
    try:
        return msgpack.packb(rows, unicode_errors="surrogatepass")
    except (TypeError, ValueError, OverflowError):
        return None


@FUZZ
@given(st.one_of(st.text(max_size=200), st.from_regex(r"[a-z_ ()<>=!+\-*/%.0-9'\"]{0,120}")))
def test_any_expression_text_compiles_or_is_a_rule_error(text) -> None:
    try:
        compile_expression(text, VOCABULARY)
    except RuleError as exc:
        assert str(exc)


@FUZZ
@given(st.text(max_size=300))
def test_any_yaml_text_loads_or_is_a_yaml_error(text) -> None:
    try:
        load_yaml(text)
    except yaml.YAMLError as exc:
        assert str(exc)


rule_like = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["r", "x y"]),
        "type": st.sampled_from(["threshold", "condition", "location", "?"]),
    },
    optional={
        "on": st.one_of(st.sampled_from(KIND_NAMES), st.lists(nasty_text, max_size=2)),
        "when": st.one_of(nasty_text, st.sampled_from(["mb > 1", "not " * 50 + "true"])),
        "value": st.one_of(nasty_text, st.sampled_from(["cycle_usage_mb"])),
        "threshold": st.one_of(nasty_number, st.sampled_from(["1e400", "0.8 * plan_data_cap_mb"])),
        "cooldown": st.one_of(nasty_number, nasty_text, st.sampled_from(["99999999999999999999d"])),
        "once_per": st.one_of(nasty_text, st.sampled_from(["cycle", "day"])),
        "min_distance_km": nasty_number,
        "emit": st.dictionaries(nasty_text, nasty_text, max_size=2),
    },
)  # fmt: skip


@FUZZ
@given(st.one_of(value, st.fixed_dictionaries({"rules": st.lists(rule_like, max_size=3)})))
def test_any_rules_document_is_a_rule_set_or_a_rule_error(document) -> None:
    try:
        parse_rules(document)
    except RuleError as exc:
        assert exc.problems


offer_like = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["o", "NO_ACTION"]),
        "answers": st.just(["r"]),
        "channels": st.just(["sms"]),
    },
    optional={
        "value": nasty_number, "cost": nasty_number,
        "cooldown": st.one_of(nasty_number, nasty_text),
        "eligible": st.one_of(nasty_text, st.sampled_from(["plan_data_cap_mb < 2000"])),
    },
)  # fmt: skip


@FUZZ
@given(
    st.one_of(
        value,
        st.fixed_dictionaries(
            {"offers": st.lists(offer_like, max_size=3)},
            optional={"policy": st.dictionaries(st.sampled_from(
                ["seed", "control_share", "exploration", "attribution_window", "quiet_hours"]),
                st.one_of(nasty_number, nasty_text), max_size=3)},
        ),
    )
)  # fmt: skip
def test_any_catalog_document_is_a_catalog_or_a_catalog_error(document) -> None:
    try:
        catalog = parse_catalog(document)
    except CatalogError as exc:
        assert exc.problems
        return
    for offer in catalog.offers:  # what validates is within range
        assert 0 <= offer.cooldown_ms <= 3650 * 86_400_000
        assert math.isfinite(offer.spec.value) and math.isfinite(offer.spec.cost)
