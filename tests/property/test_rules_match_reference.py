"""The vectorized shards give exactly the triggers of the per-event reference, and the same
stream makes the same decisions on 1 shard as on 4."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineSettings
from engine.decision.catalog import Catalog, parse_catalog_text
from engine.events.schema import CHANNELS
from engine.local import LocalEngine
from engine.rules.spec import parse_rules_text
from engine.state.view import AGGREGATES
from engine.testing import FixedScorer
from tests.property.reference import ReferenceEngine
from tests.pure import examples

RULES = parse_rules_text("""
rules:
  - id: cap80
    type: threshold
    on: usage
    value: cycle_usage_mb
    threshold: 0.8 * plan_data_cap_mb
    when: plan_data_cap_mb > 0
    emit: {pct: 100 * cycle_usage_mb / plan_data_cap_mb, days_left: days_left()}
  - id: away
    type: location
    min_distance_km: 100
    cooldown: 6h
  - id: daily_heavy
    type: threshold
    on: [usage, purchase]
    value: cycle_usage_mb + 10 * purchase_count
    threshold: 300
    once_per: day
    emit: {hour: local_hour()}
  - id: cart_full
    type: condition
    on: [cart_add]
    when: cart_items >= 2 and not (overage_cycles > 3) and offers_declined < 2
    cooldown: 1h
    emit: {items: cart_items, overage: overage_cycles}
  - id: every_checkout
    type: condition
    on: checkout
    when: cart_items == 0
  - id: keen
    type: condition
    on: offer_response
    when: offers_accepted >= 2 and response == 'accepted'
""")

CATALOG = parse_catalog_text("""
policy:
  frequency_caps: [{max: 1, per: 6h}, {max: 2, per: 2d}]
  quiet_hours: {start: 22, end: 7}
  control_share: 0.2
  exploration: 0.2
offers:
  - {id: pass, answers: [cap80, daily_heavy], channels: [push, sms], value: 6, cost: 0.5}
  - {id: upgrade, answers: [cap80], channels: [sms], value: 24, cost: 1, cooldown: 1d,
     eligible: plan_data_cap_mb < 2000}
  - {id: roam, answers: [away], channels: [sms], value: 10, cost: 0.5, cooldown: 12h}
  - {id: cart, answers: [cart_full, every_checkout], channels: [push], value: 3, cost: 0.2}
""")


def feature_scorer() -> FixedScorer:
    """Propensities that depend on every feature, so any feature difference shows."""
    return FixedScorer(lambda x, _: np.abs(np.sin(np.nan_to_num(x) @ np.arange(1, x.shape[1] + 1))))


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
LATENESS_MS = 2 * 3_600_000
T0 = 1_700_000_000_000  # 2023-11-14


@st.composite
def streams(draw: Any) -> list[dict[str, Any]]:
    customers = [f"c{i}" for i in range(draw(st.integers(1, 5)))]
    n = draw(st.integers(1, 120))
    events: list[dict[str, Any]] = []
    t = T0
    for i in range(n):
        # mostly on a half-hour grid, so gaps equal cooldowns exactly now and then
        step = draw(st.sampled_from([0, 1, 2, 12, 48, 96]))
        t += step * 1_800_000 if draw(st.integers(0, 3)) else draw(st.integers(0, 86_400_000))
        who = draw(st.sampled_from(customers))
        kind = draw(
            st.sampled_from(
                ["usage"] * 4
                + ["location"] * 2
                + ["profile_update", "purchase", "cart_add", "checkout", "offer_response"]
                + ["consent"]
            )
        )
        e: dict[str, Any] = {"event_id": i + 1, "customer_id": who, "kind": kind, "ts": t}
        if kind == "usage":
            # multiples of 50 MB hit 80 % of a cap and the cap itself exactly; quarters do not
            e["mb"] = (
                float(draw(st.integers(0, 12)) * 50)
                if draw(st.booleans())
                else draw(st.integers(0, 2400)) / 4
            )
        elif kind == "location":
            e["lat"] = draw(st.sampled_from([52.5, 52.6, 48.1, 40.7, -33.9]))
            e["lon"] = draw(st.sampled_from([13.4, 13.5, 11.6, -74.0, 151.2]))
        elif kind == "profile_update":
            fields = draw(
                st.sets(
                    st.sampled_from(
                        ["plan_data_cap_mb", "cycle_day", "home", "tz", "channels", "overage"]
                    ),
                    min_size=1,
                )
            )
            if "plan_data_cap_mb" in fields:
                e["plan_data_cap_mb"] = draw(st.sampled_from([500.0, 1000.0, 2000.0]))
            if "cycle_day" in fields:
                e["cycle_day"] = draw(st.integers(1, 31))
            if "home" in fields:
                e["home_lat"], e["home_lon"] = draw(st.sampled_from([(52.5, 13.4), (40.7, -74.0)]))
            if "tz" in fields:
                e["tz"] = draw(st.sampled_from(ZONES))
            if "channels" in fields:
                e["channels"] = draw(st.sampled_from([["sms"], ["sms", "push"], ["push"], []]))
            if "overage" in fields:  # billing history
                e["overage_cycles"] = draw(st.integers(0, 6))
        elif kind == "purchase":
            e["amount"] = float(draw(st.integers(1, 100)))
        elif kind == "cart_add":
            e["item"] = "sku-1"
        elif kind == "offer_response":
            e["decision_id"] = "00000000000000aa"
            e["response"] = draw(st.sampled_from(["accepted", "declined"]))
        elif kind == "consent":
            e["channel"] = draw(st.sampled_from(["sms", "push", "email", "all"]))
            e["granted"] = draw(st.booleans())
        events.append(e)
    # arrival order: each event delayed by up to 1.5x the allowed lateness, so some are late
    delays = [
        draw(st.integers(0, LATENESS_MS * 3 // 2)) if draw(st.integers(0, 4)) == 0 else 0
        for _ in events
    ]
    arrival = [
        e
        for _, _, e in sorted(
            zip(
                [e["ts"] + d for e, d in zip(events, delays, strict=True)],
                range(n),
                events,
                strict=True,
            )
        )
    ]
    # duplicates: some events are sent twice, the copy right after the original
    out: list[dict[str, Any]] = []
    for e in arrival:
        out.append(e)
        if draw(st.integers(0, 9)) == 0:
            out.append(dict(e))
    return out


def run_engine(
    events: list[dict[str, Any]], shards: int, chunks: list[int], catalog: Catalog | None = None
) -> LocalEngine:
    settings = EngineSettings(
        shards=shards, allowed_lateness_s=LATENESS_MS / 1000, dedupe_window_s=2 * LATENESS_MS / 1000
    )
    engine = LocalEngine(settings, RULES, catalog, feature_scorer() if catalog else None)
    start = 0
    for size in [*chunks, len(events)]:
        part = events[start : start + size]
        if part:
            letters = engine.submit_rows(part)
            assert all(d.reason.startswith("late") for d in letters), letters
        start += size
        if start >= len(events):
            break
    engine.end_stream()
    return engine


def engine_triggers(
    events: list[dict[str, Any]], shards: int, chunks: list[int]
) -> list[dict[str, Any]]:
    engine = run_engine(events, shards, chunks)
    keys = {engine.ingestor.pseudonymizer.key_of(c): c for c in {e["customer_id"] for e in events}}
    rows = engine.trigger_table().to_pylist()
    return [
        {
            "rule_id": r["rule_id"],
            "customer_id": keys[r["customer_key"]],
            "event_id": r["event_id"],
            "values": dict(r["values"]),
        }
        for r in rows
    ]


def canonical(triggers: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((t["rule_id"], t["customer_id"], t["event_id"]) for t in triggers)


def assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert canonical(got) == canonical(want)
    by_key = {(t["rule_id"], t["event_id"]): t["values"] for t in want}
    for t in got:
        expected = by_key[(t["rule_id"], t["event_id"])]
        assert set(t["values"]) == set(expected)
        for name, value in t["values"].items():
            assert math.isclose(value, expected[name], rel_tol=1e-9, abs_tol=1e-9), (t, expected)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=streams(),
    shards=st.sampled_from([1, 2, 4]),
    chunks=st.lists(st.integers(1, 40), max_size=6),
)
def test_vectorized_rules_equal_per_event_reference(events, shards, chunks) -> None:
    want = ReferenceEngine(RULES, LATENESS_MS).run(events)
    assert_same(engine_triggers(events, shards, chunks), want)


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams(), chunks=st.lists(st.integers(1, 40), max_size=6))
def test_one_shard_and_four_shards_give_the_same_triggers(events, chunks) -> None:
    one = engine_triggers(events, 1, chunks)
    four = engine_triggers(events, 4, [])
    assert canonical(one) == canonical(four)


def decisions_of(engine: LocalEngine) -> list[tuple[Any, ...]]:
    rows = engine.decision_table().to_pylist()
    return sorted(
        (
            d["rule_id"],
            d["event_id"],
            d["action"],
            d["channel"],
            round(d["probability"], 12),
            d["explored"],
            d["control"],
            d["deliver_after"],
            tuple((c["offer_id"], c["excluded"], c["propensity"]) for c in d["candidates"]),
        )
        for d in rows
    )


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams(), chunks=st.lists(st.integers(1, 40), max_size=6))
def test_one_shard_and_four_shards_make_the_same_decisions(events, chunks) -> None:
    one = run_engine(events, 1, chunks, CATALOG)
    four = run_engine(events, 4, chunks, CATALOG)
    assert decisions_of(one) == decisions_of(four)
    assert len(decisions_of(one)) == sum(
        1 for t in one.trigger_table().column("rule_id").to_pylist() if CATALOG.answering(t)
    )


#: no rule reads an aggregate: write-back sums the counts per customer instead
LOCATION_ONLY = parse_rules_text("""
rules:
  - {id: away, type: location, min_distance_km: 100, cooldown: 24h}
""")


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=streams(),
    shards=st.sampled_from([1, 3]),
    chunks=st.lists(st.integers(1, 40), max_size=6),
    rules=st.sampled_from([RULES, LOCATION_ONLY]),
)
def test_golden_record_aggregates_equal_per_event_reference(events, shards, chunks, rules) -> None:
    reference = ReferenceEngine(rules, LATENESS_MS)
    reference.run(events)
    settings_ = EngineSettings(
        shards=shards, allowed_lateness_s=LATENESS_MS / 1000, dedupe_window_s=2 * LATENESS_MS / 1000
    )
    engine = LocalEngine(settings_, rules)
    start = 0
    for size in [*chunks, len(events)]:
        engine.submit_rows(events[start : start + size])
        start += size
    engine.end_stream()
    for customer_id, want in reference.customers.items():
        key, owner = engine.ingestor.owner_of(customer_id)
        record = engine.shards[owner].customer(key)
        assert record is not None
        for name in AGGREGATES:
            assert math.isclose(record[name], getattr(want, name), abs_tol=1e-6), (name, record)
        profile = {**want.profile, "last_lat": want.last_lat, "last_lon": want.last_lon}
        for name in ("plan_data_cap_mb", "home_lat", "home_lon", "last_lat", "last_lon"):
            expected, got = profile[name], record[name]
            if math.isnan(expected):
                assert got is None, (name, record)
            else:  # locations are kept as float32
                assert got is not None and math.isclose(got, expected, rel_tol=1e-6), (name, record)
        assert record["cycle_day"] == want.profile["cycle_day"]
        assert (record["tz"] or "UTC") == want.profile["tz"]
        assert set(record["channels"]) == want.channels
        assert record["consent_granted"] == bits(want.consent_granted)
        assert record["consent_withdrawn"] == bits(want.consent_withdrawn)


def bits(channels: frozenset[str]) -> int:
    return sum(1 << CHANNELS.index(c) for c in channels)
