"""Pattern rules in the engine: the reference's matches, whatever the cut.

The same stream gives the same triggers and decisions (pattern and other rules together, the
decisions at deadlines included) for micro-batches of 1, 7, 1,024 and 65,536 events, on 1, 2
and 8 shards, and across a snapshot and restore at a random point; and each pattern's
triggers are exactly the per-event reference's (``tests/property/pattern_reference.py``).
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineSettings
from engine.decision.catalog import parse_catalog_text
from engine.local import LocalEngine
from engine.rules.spec import PatternSpec, parse_rules
from engine.shard import ShardLogic
from engine.yamlfile import load_yaml
from tests.property.pattern_reference import reference_matches
from tests.property.test_rules_match_reference import (
    LATENESS_MS,
    RULES,
    decisions_of,
    feature_scorer,
    streams,
)
from tests.pure import QUICK, examples

PATTERNS = """
  - id: cart_abandoned
    type: pattern
    pattern:
      - {begin: added, on: cart_add}
      - {not_followed_by: paid, on: checkout, within: 60m}
    emit: {items: cart_items, hour: local_hour(), used: cycle_usage_mb, days: days_left()}
  - id: heavy_thrice
    type: pattern
    pattern:
      - {begin: heavy, on: usage, when: mb >= 300, times: 3}
    within: 2d
    emit: {used: cycle_usage_mb}
  - id: browsed_then_bought
    type: pattern
    pattern:
      - {begin: added, on: cart_add}
      - {not_followed_by: checkout, on: checkout}
      - {followed_by: moved, on: location}
      - {followed_by: used, on: usage, optional: true}
      - {followed_by: bought, on: purchase}
    within: 1d
    skip: no_skip
  - id: quiet_after_usage
    type: pattern
    pattern:
      - {begin: used, on: usage}
      - {followed_by: again, on: [usage, purchase]}
      - {not_followed_by: any, on: [usage, purchase, location], within: 5h}
"""
RULES_P = parse_rules({"rules": [*RULES.document["rules"], *load_yaml(PATTERNS)]})
CATALOG_P = parse_catalog_text("""
policy:
  frequency_caps: [{max: 1, per: 2h}, {max: 3, per: 2d}]
  control_share: 0.2
  exploration: 0.2
offers:
  - {id: pass, answers: [cap80, heavy_thrice], channels: [push, sms], value: 6, cost: 0.5}
  - {id: cart, answers: [cart_abandoned, cart_full], channels: [push], value: 3, cost: 0.2}
  - {id: nudge, answers: [quiet_after_usage, browsed_then_bought], channels: [sms], value: 2,
     cost: 0.1, cooldown: 3h}
""")
SIZES = (1, 7, 1024, 65_536)
#: ``make check`` runs two of the cuts (the restore is in the 7-event one)
CHECKED_SIZES = (7, 65_536) if QUICK else SIZES


def _engine(shards: int) -> LocalEngine:
    config = EngineSettings(
        shards=shards, allowed_lateness_s=LATENESS_MS / 1000, dedupe_window_s=2 * LATENESS_MS / 1000
    )
    return LocalEngine(config, RULES_P, CATALOG_P, feature_scorer())


def _run(
    events: list[dict[str, Any]], shards: int, size: int, cut: int | None = None
) -> LocalEngine:
    """Submit ``events`` ``size`` at a time; after ``cut`` events, every shard is replaced by a
    fresh one restored from its snapshot."""
    engine = _engine(shards)
    for start in range(0, len(events), size):
        engine.submit_rows(events[start : start + size])
        if cut is not None and start < cut <= start + size:
            for k, shard in enumerate(engine.shards):
                fresh = ShardLogic(
                    k, shard.settings, RULES_P, shard.key_range, CATALOG_P, feature_scorer()
                )
                fresh.restore(shard.snapshot())
                engine.shards[k] = fresh
    engine.end_stream()
    assert not engine.failed, engine.failed[0].column("reason")[0]
    return engine


def triggers_of(engine: LocalEngine) -> list[tuple[Any, ...]]:
    return sorted(
        (r["rule_id"], r["customer_key"], r["ts"], r["event_id"], sorted(r["values"] or []))
        for r in engine.trigger_table().to_pylist()
    )


def _bits(spec: PatternSpec, event: dict[str, Any]) -> list[bool]:
    """Whether ``event`` is an event of each step (the conditions above, in plain Python)."""
    out = []
    for step in spec.pattern:
        ok = event["kind"] in step.on
        if ok and step.when == "mb >= 300":
            ok = event.get("mb", 0.0) >= 300
        elif ok and step.when is not None:
            raise AssertionError(f"no plain-Python version of {step.when!r}")
        out.append(ok)
    return out


def accepted(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events the engine applies, in arrival order: not late, not a duplicate id."""
    out, seen, newest = [], set(), None
    for e in events:
        late = newest is not None and e["ts"] < newest - LATENESS_MS
        newest = e["ts"] if newest is None else max(newest, e["ts"])
        if not late and e["event_id"] not in seen:
            seen.add(e["event_id"])
            out.append(e)
    return out


def reference_triggers(engine: LocalEngine, events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Every pattern's matches by the per-event reference, as (rule, customer key, ms)."""
    events = accepted(events)
    keys = {
        e["customer_id"]: int(engine.customer(e["customer_id"])["customer_key"]) for e in events
    }
    out = []
    for rule in RULES_P.rules:
        if rule.pattern is None:
            continue
        assert isinstance(rule.spec, PatternSpec)
        rows = [(keys[e["customer_id"]], e["ts"], _bits(rule.spec, e)) for e in events]
        out += [(rule.id, c, t) for c, t, _ in reference_matches(rule.spec, rows, 2**62)]
    return sorted(out)


def pattern_triggers(engine: LocalEngine) -> list[tuple[Any, ...]]:
    table = engine.trigger_table()
    ms = table.column("ts").cast("int64").to_pylist()
    return sorted(
        (r, int(c), t)
        for r, c, t in zip(
            table.column("rule_id").to_pylist(),
            table.column("customer_key").to_pylist(),
            ms,
            strict=True,
        )
        if RULES_P.rules[[x.id for x in RULES_P.rules].index(r)].pattern is not None
    )


def cart_items_at_deadlines(engine: LocalEngine, events: list[dict[str, Any]]) -> None:
    """A deadline's trigger carries the customer's state as of it: the events of its time and
    before, none after (here: items in the cart, counted the plain way)."""
    events = accepted(events)
    for trigger in engine.trigger_table().to_pylist():
        if trigger["rule_id"] != "cart_abandoned":
            continue
        at = int(trigger["ts"].timestamp() * 1000)
        mine = [
            e
            for e in events
            if engine.customer(e["customer_id"])["customer_key"] == trigger["customer_key"]
        ]
        items = 0
        for e in sorted(mine, key=lambda e: e["ts"]):  # stable: arrival order of ties
            if e["ts"] > at:
                break
            items = 0 if e["kind"] == "checkout" else items + (e["kind"] == "cart_add")
        assert dict(trigger["values"])["items"] == items, trigger


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams(), shards=st.sampled_from([1, 2, 8]), cut=st.integers(0, 120))
def test_patterns_give_the_same_triggers_and_decisions_however_the_stream_is_cut(
    events: list[dict[str, Any]], shards: int, cut: int
) -> None:
    whole = _run(events, 1, 65_536)
    assert pattern_triggers(whole) == reference_triggers(whole, events)
    cart_items_at_deadlines(whole, events)
    want_triggers, want_decisions = triggers_of(whole), decisions_of(whole)
    for size in CHECKED_SIZES:
        run = _run(events, shards, size, cut=cut if size == 7 else None)
        assert triggers_of(run) == want_triggers, size
        assert decisions_of(run) == want_decisions, size
