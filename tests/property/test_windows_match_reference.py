"""Window rules: the value every rule reads equals a per-event reference's, whatever the cut.

Session, tumbling and sliding windows (counts and sums, and a count of the local days with a
heavy usage event among the last three: a calendar bucket, counted once) over random streams,
read as of each
event by a rule that fires on every event and emits them; micro-batches of 1, 7 and 65,536
events, 1 or 3 shards, and a snapshot and restore in the middle give the same values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineSettings
from engine.local import LocalEngine
from engine.rules.spec import parse_rules_text
from engine.shard import ShardLogic
from tests.property.test_pattern_invariance import accepted
from tests.property.test_rules_match_reference import LATENESS_MS, streams
from tests.pure import QUICK, examples

HOUR = 3_600_000
RULES = parse_rules_text("""
rules:
  - {id: busy, type: window, on: usage, session: 1h}
  - {id: carts, type: window, on: cart_add, session: 90m}
  - {id: mb_3h, type: window, on: usage, sum: mb, tumbling: 3h}
  - {id: mb_2h, type: window, on: usage, sum: mb, sliding: 2h, every: 30m}
  - {id: buys_2h, type: window, on: purchase, when: amount > 20, sliding: 2h, every: 2h}
  - {id: heavy_days, type: window, on: usage, when: mb > 100, sliding: 3, every: day,
     distinct: true}
  - id: every_event
    type: condition
    on: [usage, location, purchase, cart_add, checkout, profile_update, offer_response, consent]
    when: 1 == 1
    emit: {busy: busy, carts: carts, mb_3h: mb_3h, mb_2h: mb_2h, buys_2h: buys_2h,
           heavy_days: heavy_days}
""")


def reference(events: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Event id -> the windows as of it, one event at a time."""
    out: dict[int, dict[str, float]] = {}
    state: dict[str, dict[str, Any]] = {}
    for e in sorted(accepted(events), key=lambda e: e["ts"]):  # stable: arrival order of ties
        s = state.setdefault(e["customer_id"], {"busy": None, "carts": None, "mb3": None,
                                                  "mb2": [], "buys": [], "tz": "UTC",
                                                  "day": None, "days": set()})  # fmt: skip
        t, kind = e["ts"], e["kind"]
        if kind == "profile_update" and "tz" in e:
            s["tz"] = e["tz"]
        # the customer's local day, never going back (a time zone changed westwards)
        day = local_day(t, s["tz"])
        s["day"] = day if s["day"] is None else max(s["day"], day)
        if kind == "usage" and e["mb"] > 100:
            s["days"].add(s["day"])
        values = {}
        for name, on, gap in (("busy", "usage", HOUR), ("carts", "cart_add", 90 * 60_000)):
            if kind == on:
                last, total = s[name] or (None, 0.0)
                total = 1.0 if last is None or t - last > gap else total + 1.0
                s[name] = (t, total)
            last, total = s[name] or (None, 0.0)
            values[name] = total if last is not None and t - last <= gap else 0.0
        period = t // (3 * HOUR)
        if kind == "usage":
            p, total = s["mb3"] or (period, 0.0)
            s["mb3"] = (period, (total if p == period else 0.0) + e["mb"])
        p, total = s["mb3"] or (None, 0.0)
        values["mb_3h"] = total if p == period else 0.0
        if kind == "usage":
            s["mb2"].append((t // (HOUR // 2), e["mb"]))
        if kind == "purchase" and e["amount"] > 20:
            s["buys"].append((t // (2 * HOUR), 1.0))
        values["mb_2h"] = sum(v for b, v in s["mb2"] if b > t // (HOUR // 2) - 4)
        values["buys_2h"] = sum(v for b, v in s["buys"] if b > t // (2 * HOUR) - 1)
        values["heavy_days"] = float(sum(1 for d in s["days"] if d > s["day"] - 3))
        out[e["event_id"]] = values
    return out


def local_day(ts: int, tz: str) -> int:
    moment = datetime.fromtimestamp(ts / 1000, ZoneInfo(tz))
    offset = moment.utcoffset()
    return (ts + int(offset.total_seconds() * 1000 if offset else 0)) // (24 * HOUR)


def _run(events: list[dict[str, Any]], shards: int, size: int, cut: int | None) -> LocalEngine:
    config = EngineSettings(
        shards=shards, allowed_lateness_s=LATENESS_MS / 1000, dedupe_window_s=2 * LATENESS_MS / 1000
    )
    engine = LocalEngine(config, RULES)
    for start in range(0, len(events), size):
        engine.submit_rows(events[start : start + size])
        if cut is not None and start < cut <= start + size:
            for k, shard in enumerate(engine.shards):
                fresh = ShardLogic(k, shard.settings, RULES, shard.key_range)
                fresh.restore(shard.snapshot())
                engine.shards[k] = fresh
    engine.end_stream()
    assert not engine.failed
    return engine


def emitted(engine: LocalEngine) -> dict[int, dict[str, float]]:
    return {t["event_id"]: dict(t["values"]) for t in engine.trigger_table().to_pylist()}


@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams(), shards=st.sampled_from([1, 3]), cut=st.integers(0, 120))
def test_windows_equal_the_per_event_reference_however_the_stream_is_cut(
    events: list[dict[str, Any]], shards: int, cut: int
) -> None:
    want = reference(events)
    for size in (7,) if QUICK else (1, 7, 65_536):
        got = emitted(_run(events, shards, size, cut if size == 7 else None))
        assert set(got) == set(want)
        for event_id, values in want.items():
            assert got[event_id] == values, (event_id, size)


def test_a_calendar_bucket_never_goes_back_when_the_time_zone_moves_west() -> None:
    """Heavy usage on the local 15 November (Lord Howe Island, UTC+11), the time zone changed
    to New York (UTC-5), heavy usage again three hours later: the 14th there, but the day has
    already been the 15th, so it counts in the 15th's bucket (one day, not two); on the 16th,
    two days (the 15th and the 16th). The events
    are further apart than the allowed lateness, so in micro-batches of one the first is
    applied in a step of its own and the floor comes from the stored registers."""
    t0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
    hour = 3_600_000
    events: list[dict[str, Any]] = [
        {"event_id": 1, "customer_id": "c0", "kind": "profile_update", "ts": t0 - 60_000,
         "tz": "Australia/Lord_Howe"},
        {"event_id": 2, "customer_id": "c0", "kind": "usage", "ts": t0, "mb": 200.0},
        {"event_id": 3, "customer_id": "c0", "kind": "profile_update", "ts": t0 + 5 * hour // 2,
         "tz": "America/New_York"},
        {"event_id": 4, "customer_id": "c0", "kind": "usage", "ts": t0 + 3 * hour, "mb": 200.0},
        {"event_id": 5, "customer_id": "c0", "kind": "usage", "ts": t0 + 51 * hour, "mb": 200.0},
    ]  # fmt: skip
    assert 5 * hour // 2 > LATENESS_MS
    want = reference(events)
    assert [want[i]["heavy_days"] for i in (2, 4, 5)] == [1.0, 1.0, 2.0]
    for size, cut in ((1, None), (1, 2), (4, None)):
        assert emitted(_run(events, 1, size, cut)) == want, (size, cut)
