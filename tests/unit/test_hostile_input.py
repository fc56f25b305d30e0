"""Hostile input to the pure core: every decoder, parser and validator answers with a clear
error naming what is wrong (never RecursionError, MemoryError, OverflowError or OSError), within
the limits of ``engine.limits``; and a document that validates can run."""

from __future__ import annotations

import json
import math
import time

import msgpack
import numpy as np
import pytest
import yaml

from engine.config import EngineSettings
from engine.decision.catalog import parse_catalog_text
from engine.errors import CatalogError, EventError, PayloadTooLargeError, RuleError
from engine.events.codec import _as_rows, decode_json, decode_msgpack, rows_to_batch
from engine.events.validation import validate
from engine.limits import MAX_ERRORS_LISTED, MAX_EVENTS_PER_REQUEST, MAX_ID_CHARS
from engine.local import LocalEngine
from engine.rules.duration import parse_duration_ms
from engine.rules.expr import compile_expression
from engine.rules.probe import probe
from engine.rules.spec import VOCABULARY, load_rules, parse_rules_text
from engine.testing import FixedScorer, by_offer
from engine.yamlfile import DocumentLimitError, load_yaml
from tests.conftest import RULES_FILE, ms


def letters_of(rows):
    batch, _, letters = rows_to_batch(rows)
    return batch, letters


def one(**fields):
    return {"event_id": 1, "customer_id": "c", "kind": "usage", "ts": ms(2026, 3, 1), **fields}


# -- request bodies -------------------------------------------------------------------------
def test_json_nested_ten_thousand_deep_is_a_client_error() -> None:
    with pytest.raises(EventError, match="nests deeper"):
        decode_json(b"[" * 10_000 + b"]" * 10_000)
    with pytest.raises(EventError, match="max_event_depth"):
        decode_json(json.dumps([{"mb": [[[1]]]}]).encode())
    with pytest.raises(EventError, match="not an event map"):
        decode_msgpack(msgpack.packb([{"mb": 1}, [1]]))


def test_a_nested_value_among_plain_events_is_found() -> None:
    """The batch-at-once check of plain maps (``_as_rows``) finds one nested value among many
    flat events, in a map or in a list, and lets lists of scalars through."""
    flat = [one(mb=1.0), one(channels=["sms", "push"])] * 500
    assert len(decode_msgpack(msgpack.packb(flat))) == 1_000
    for nested in ({"x": 1}, ["sms", ["push"]], ["sms", {"x": 1}]):
        body = msgpack.packb([*flat, one(channels=nested)])
        with pytest.raises(EventError, match="event 1000 nests deeper"):
            decode_msgpack(body)
        with pytest.raises(EventError, match="event 1000 nests deeper"):
            decode_json(json.dumps([*flat, one(channels=nested)]).encode())

    class Items(list):  # no decoder makes one; rows given directly are judged the same
        pass

    with pytest.raises(EventError, match="event 1000 nests deeper"):
        _as_rows([*flat, one(channels=Items(["sms", {"x": 1}]))])


def test_more_events_than_the_limit_is_refused_before_any_is_read() -> None:
    body = msgpack.packb(list(range(1_000_000)))  # the 1 MB array of integers
    started = time.perf_counter()
    with pytest.raises(PayloadTooLargeError, match="max_events_per_request"):
        decode_msgpack(body)
    assert time.perf_counter() - started < 5
    rows = decode_json(json.dumps([one()] * MAX_EVENTS_PER_REQUEST).encode())
    assert len(rows) == MAX_EVENTS_PER_REQUEST


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("mb", 10**400, "out of range"),
        ("mb", math.inf, "out of range"),
        ("tz", "x" * 300, "longer than 64"),
        ("page", "p" * 5000, "longer than 2048"),
        ("item", "\ud800", "lone surrogate"),
    ],
)
def test_a_bad_value_is_a_dead_letter_naming_the_field(field, value, says) -> None:
    kind = {"tz": "profile_update", "page": "page_view", "item": "cart_add"}.get(field, "usage")
    row = {**one(), "kind": kind, field: value}
    if kind != "usage":
        row.pop("mb", None)
    batch, letters = letters_of([row, one(event_id=2, mb=1.0)])
    if letters:
        assert letters[0].field == field and says in letters[0].reason
    else:  # coerced, refused by validation (ranges): still a dead letter naming the field
        checked = validate(batch, np.arange(batch.num_rows))
        assert [d.field for d in checked.dead_letters] == [field]
        assert says in checked.dead_letters[0].reason or "outside" in checked.dead_letters[0].reason
    assert batch.num_rows + len(letters) == 2  # the valid event next to it is kept


def test_a_five_thousand_digit_integer_in_json_is_a_dead_letter_not_a_crash() -> None:
    body = (
        b'[{"event_id": 1, "customer_id": "c", "kind": "usage", "ts": 1, "mb": '
        + b"9" * 5000
        + b"}]"
    )
    batch, letters = letters_of(decode_json(body))
    checked = validate(batch, np.arange(batch.num_rows))
    assert [d.field for d in [*letters, *checked.dead_letters]] == ["mb"]


def test_a_key_that_json_cannot_carry_is_reported_as_printable_text() -> None:
    rows = decode_json(
        b'[{"event_id": 1, "customer_id": "c", "kind": "usage", "ts": 1, "\\ud800": 1}]'
    )
    _, letters = letters_of(rows)
    (letter,) = letters
    json.dumps(letter.to_dict()).encode("utf-8")  # encodable
    assert "unknown field" in letter.reason and "\\ud800" in letter.field


def test_identifiers_over_the_limit_are_dead_letters() -> None:
    _, letters = letters_of([one(customer_id="c" * (MAX_ID_CHARS + 1)), one(event_id="e" * 1000)])
    assert [d.field for d in letters] == ["customer_id", "event_id"]
    assert all("<withheld>" in d.reason or "e" * 100 not in d.reason for d in letters)


# -- expressions ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not " * 5000 + "true", "max_expression_chars"),
        ("-" * 100_000 + "1", "max_expression_chars"),
        ("not " * 400 + "true", "max_expression_depth"),
        ("mb > 1" + "0" * 400, "max_number"),
        ("mb > 1e400", "max_number"),
        ("mb > 10**400", "unsupported operator"),
    ],
)
def test_expressions_over_a_limit_are_rule_errors(text, says) -> None:
    with pytest.raises(RuleError, match=says):
        compile_expression(text, VOCABULARY, "bool")


def test_an_expression_that_cannot_run_is_refused_at_validation() -> None:
    expression = compile_expression("mb > 1", VOCABULARY, "bool")

    class Broken(type(expression)):  # type: ignore[misc]
        def evaluate(self, ctx):
            raise ZeroDivisionError("boom")

    with pytest.raises(RuleError, match="representative events: ZeroDivisionError"):
        probe(Broken(expression.source, expression.type, expression.names, lambda ctx: None))


# -- documents --------------------------------------------------------------------------------
def test_a_yaml_alias_bomb_is_refused_at_once() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    started = time.perf_counter()
    with pytest.raises(DocumentLimitError, match="aliases"):
        load_yaml(bomb)
    assert time.perf_counter() - started < 1


def test_deep_or_huge_yaml_is_a_yaml_error_naming_the_limit() -> None:
    with pytest.raises(DocumentLimitError, match="max_document_depth"):
        load_yaml("a: " + "[" * 900 + "]" * 900)
    with pytest.raises(DocumentLimitError, match="max_document_bytes"):
        load_yaml("a: " + "x" * (2 << 20))
    with pytest.raises(yaml.YAMLError, match="ValueError"):  # Python refuses 4,300+ digits
        load_yaml("a: " + "9" * 5000)


def test_the_shipped_rules_parse_the_same_as_a_file_and_as_a_body() -> None:
    text = RULES_FILE.read_text()
    assert load_yaml(text.encode()) == load_yaml(text)
    assert "on" in load_yaml(text)["rules"][0]  # YAML 1.2: `on` is a key, not true
    assert len(load_rules(RULES_FILE)) == len(parse_rules_text(text))


@pytest.mark.parametrize("duration", ["99999999999999999999d", "-1d", 1e300, math.inf, "3651d"])
def test_durations_beyond_ten_years_are_refused(duration) -> None:
    with pytest.raises(ValueError, match=r"duration|not a duration"):
        parse_duration_ms(duration)


def test_a_poisoned_catalog_is_refused_and_names_the_offer_and_field() -> None:
    text = """
offers:
  - {id: p, answers: [r], channels: [sms], value: 1, cooldown: 99999999999999999999d}
  - {id: q, answers: [r], channels: [sms], value: .inf}
policy: {seed: 100000000000000000000000000000}
"""
    with pytest.raises(CatalogError) as info:
        parse_catalog_text(text, "offers.yaml")
    problems = "\n".join(info.value.problems)
    assert "offer 'p': field 'cooldown'" in problems
    assert "offer 'q': field 'value'" in problems
    assert "policy: field 'seed'" in problems


# -- a step that fails anyway ----------------------------------------------------------------
CATALOG = """
policy: {control_share: 0, exploration: 0}
offers:
  - {id: pass, answers: [data_cap_nearing], channels: [sms], value: 6, cost: 0.5, cooldown: 0}
"""


def test_a_step_that_fails_dead_letters_its_events_whole_and_the_shard_goes_on(event) -> None:
    calls = {"n": 0}
    good = by_offer({"pass": 0.5})

    def flaky(features, names):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in a scorer")
        return good.fn(features, names)

    settings = EngineSettings(shards=1, allowed_lateness_s=0)
    engine = LocalEngine(
        settings, load_rules(RULES_FILE), parse_catalog_text(CATALOG), FixedScorer(flaky)
    )
    profile = {"plan_data_cap_mb": 1000.0, "cycle_day": 1, "tz": "UTC", "channels": ["sms"]}
    engine.submit_rows([event("profile_update", "c", ms(2026, 3, 1), **profile)])
    engine.end_stream()
    engine.submit_rows([event("usage", "c", ms(2026, 3, 2), mb=850.0),
                        event("page_view", "c", ms(2026, 3, 2, 1), page="/")])  # fmt: skip
    engine.end_stream()
    (failed,) = engine.failed
    assert failed.num_rows == 2  # the whole step, both events
    assert failed.column("reason")[0].as_py().startswith("shard_failed: RuntimeError")
    assert engine.shards[0].counters["failed"] == 2
    assert engine.customer("c")["cycle_usage_mb"] == 0.0  # nothing of the step was applied
    # the shard goes on; the failed step left the rule's state as it was: it fires again
    engine.submit_rows([event("usage", "c", ms(2026, 3, 3), mb=900.0)])
    engine.end_stream()
    assert [d["action"] for d in engine.decision_table().to_pylist()] == ["pass"]


def test_errors_listed_limit_is_small() -> None:
    assert 10 <= MAX_ERRORS_LISTED <= 1000
