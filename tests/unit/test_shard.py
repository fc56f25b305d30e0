"""Shard behaviour a user relies on, through the one-process engine."""

from __future__ import annotations

import numpy as np
import pytest

from engine.checkpoint import read_snapshot, write_snapshot
from engine.config import EngineSettings
from engine.errors import StateError
from engine.local import LocalEngine
from engine.rules.spec import parse_rules_text
from engine.shard import Recent, ShardLogic
from tests.conftest import ms

PROFILE = {
    "plan_data_cap_mb": 1000.0,
    "cycle_day": 5,
    "home_lat": 52.52,
    "home_lon": 13.405,
    "tz": "Europe/Berlin",
}


def run(settings, rules, rows):
    engine = LocalEngine(settings, rules)
    letters = engine.submit_rows(rows)
    engine.end_stream()
    return engine, engine.trigger_table().to_pylist(), letters


def fired(triggers, rule):
    return [t["event_id"] for t in triggers if t["rule_id"] == rule]


def test_threshold_fires_once_per_cycle_and_again_after_the_cycle_day(
    settings, rules, event
) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("usage", "c", ms(2026, 3, 2), mb=700.0),
        event("usage", "c", ms(2026, 3, 3), mb=100.0),  # 80 %: fires
        event("usage", "c", ms(2026, 3, 4), mb=300.0),  # 110 %: same cycle, silent
        event("usage", "c", ms(2026, 3, 4, 22, 59), mb=1.0),  # 23:59 Berlin, 4 March: same cycle
        event("usage", "c", ms(2026, 3, 4, 23, 30), mb=900.0),  # 00:30 Berlin, 5 March: new cycle
    ]
    _, triggers, _ = run(settings, rules, rows)
    assert fired(triggers, "data_cap_nearing") == [3, 6]
    first = dict(next(t for t in triggers if t["event_id"] == 3)["values"])
    assert first["pct_of_cap"] == pytest.approx(80.0)
    assert first["days_left"] == pytest.approx(1 + 23 / 24, abs=1e-6)  # 3 Mar 01:00 -> 5 Mar 00:00


def test_location_rule_fires_beyond_100_km_at_most_once_per_24h(settings, rules, event) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("location", "c", ms(2026, 3, 2, 8), lat=52.4, lon=13.1),  # Potsdam, near home
        event("location", "c", ms(2026, 3, 2, 9), lat=48.137, lon=11.575),  # Munich: fires
        event("location", "c", ms(2026, 3, 2, 20), lat=48.2, lon=11.6),  # within 24 h: silent
        event("location", "c", ms(2026, 3, 3, 9), lat=48.2, lon=11.6),  # exactly 24 h: fires
    ]
    _, triggers, _ = run(settings, rules, rows)
    assert fired(triggers, "away_from_home") == [3, 5]
    assert dict(triggers[0]["values"])["distance_km"] == pytest.approx(504.4, abs=1.0)


def test_duplicates_apply_once_and_late_events_are_dead_lettered(settings, rules, event) -> None:
    usage = event("usage", "c", ms(2026, 3, 2), mb=500.0)
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        usage,
        dict(usage),
        event("usage", "c", ms(2026, 3, 3), mb=10.0),
        event("usage", "c", ms(2026, 3, 2, 23), mb=5.0),
    ]  # an hour older than the newest: late
    engine, triggers, letters = run(settings, rules, rows)
    assert [d.index for d in letters] == [4] and letters[0].reason.startswith("late")
    key = engine.ingestor.pseudonymizer.key_of("c")
    record = next(r for s in engine.shards if (r := s.customer(key)) is not None)
    assert record["cycle_usage_mb"] == 510.0 and record["event_count"] == 3
    assert sum(s.counters["duplicates"] for s in engine.shards) == 1
    assert triggers == []


def test_out_of_order_events_within_lateness_are_applied_in_event_time_order(
    settings, event
) -> None:
    rules = parse_rules_text("""
rules:
  - {id: first_big, type: threshold, on: usage, value: cycle_usage_mb, threshold: 100,
     emit: {mb: mb}}
""")
    rows = [
        event("usage", "c", ms(2026, 3, 2, 12, 0, 30), mb=60.0),
        event("usage", "c", ms(2026, 3, 2, 12, 0, 0), mb=50.0),
    ]  # 30 s older: on time
    _, triggers, letters = run(settings, rules, rows)
    assert letters == []
    assert [dict(t["values"])["mb"] for t in triggers] == [60.0]  # 50 first, then 60 crosses 100


def test_overage_counts_only_cycles_strictly_over_the_cap(settings, event) -> None:
    rules = parse_rules_text("""
rules:
  - {id: over, type: condition, on: checkout, when: "overage_cycles >= 0",
     emit: {n: overage_cycles}}
""")
    rows = [
        event("profile_update", "c", ms(2026, 1, 1), **PROFILE),
        event("usage", "c", ms(2026, 1, 10), mb=1000.0),  # exactly the cap: not over
        event("usage", "c", ms(2026, 2, 10), mb=1000.5),  # over
        event("checkout", "c", ms(2026, 3, 10)),
    ]
    _, triggers, _ = run(settings, rules, rows)
    assert dict(triggers[0]["values"])["n"] == 1.0


def test_replacing_rules_keeps_state_of_kept_rules(settings, rules, event) -> None:
    engine = LocalEngine(settings, rules)
    engine.submit_rows(
        [
            event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
            event("usage", "c", ms(2026, 3, 2), mb=900.0),
        ]
    )
    engine.end_stream()
    assert len(engine.trigger_table()) == 1
    only_cap = parse_rules_text(
        "rules:\n  - {id: data_cap_nearing, type: threshold, on: usage, "
        "value: cycle_usage_mb, threshold: 0.8 * plan_data_cap_mb}"
    )
    engine.set_rules(only_cap)
    engine.submit_rows([event("usage", "c", ms(2026, 3, 3), mb=50.0)])
    engine.end_stream()
    assert len(engine.trigger_table()) == 1  # same cycle, already fired: state survived the swap


def test_snapshot_round_trips_state_pending_events_and_seen_ids(tmp_path, rules, event) -> None:
    settings = EngineSettings(shards=1, allowed_lateness_s=3600, dedupe_window_s=7200)
    engine = LocalEngine(settings, rules)
    first = event("usage", "c", ms(2026, 3, 2, 10), mb=700.0)
    engine.submit_rows(
        [
            event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
            first,
            event("usage", "c", ms(2026, 3, 2, 12), mb=50.0),
        ]
    )  # held: within lateness
    shard = engine.shards[0]
    assert shard.buffer.pending_rows > 0
    write_snapshot(shard.snapshot(), str(tmp_path / "s0"))
    restored = ShardLogic(0, settings, rules, shard.key_range)
    restored.restore(read_snapshot(str(tmp_path / "s0")))
    before, after = shard.store.to_arrow(), restored.store.to_arrow()
    assert before.schema.equals(after.schema, check_metadata=True)
    for name in before.column_names:  # NaN-aware equality, column by column
        np.testing.assert_array_equal(after.column(name).to_numpy(), before.column(name).to_numpy())
    assert restored.buffer.pending_rows == shard.buffer.pending_rows
    engine.shards[0] = restored
    engine.submit_rows([dict(first), event("usage", "c", ms(2026, 3, 2, 13), mb=60.0)])
    engine.end_stream()
    key = engine.ingestor.pseudonymizer.key_of("c")
    assert restored.customer(key)["cycle_usage_mb"] == 810.0  # the re-sent event was not doubled
    assert fired(engine.trigger_table().to_pylist(), "data_cap_nearing") != []


def test_restoring_a_snapshot_of_other_key_groups_is_refused(tmp_path, settings, rules) -> None:
    engine = LocalEngine(settings, rules)
    write_snapshot(engine.shards[0].snapshot(), str(tmp_path / "s"))
    with pytest.raises(StateError, match="key groups"):
        engine.shards[1].restore(read_snapshot(str(tmp_path / "s")))
    with pytest.raises(StateError, match="manifest"):
        read_snapshot(str(tmp_path / "nothing"))


def test_state_is_columnar_and_small(settings, rules) -> None:
    engine = LocalEngine(settings, rules)
    keys = np.arange(1, 5001, dtype=np.uint64)
    engine.shards[0].store.slots_for(keys)
    assert engine.shards[0].store.live_nbytes_per_customer() <= 300


def test_a_quiet_stream_closes_its_watermark_so_nothing_waits_forever(rules, event) -> None:
    settings = EngineSettings(shards=1, allowed_lateness_s=3600, dedupe_window_s=7200)
    engine = LocalEngine(settings, rules)
    engine.submit_rows(
        [
            event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
            event("usage", "c", ms(2026, 3, 2, 10), mb=850.0),
        ]
    )
    assert engine.trigger_table().num_rows == 0  # held: within the hour of lateness
    assert engine.release_watermark() == ms(2026, 3, 2, 10)
    assert fired(engine.trigger_table().to_pylist(), "data_cap_nearing") != []
    # from now on an event older than the newest seen is late, however small the gap
    letters = engine.submit_rows([event("usage", "c", ms(2026, 3, 2, 9, 59), mb=1.0)])
    assert len(letters) == 1 and letters[0].reason.startswith("late")
    assert engine.submit_rows([event("usage", "c", ms(2026, 3, 2, 10, 1), mb=1.0)]) == []


def test_a_micro_batch_of_several_routed_batches_equals_one_batch(settings, rules, event) -> None:
    from engine.events.codec import rows_to_batch
    from engine.ingest import Ingestor
    from engine.shard import ShardLogic

    rows = [event("profile_update", f"c{i}", ms(2026, 3, 1), **PROFILE) for i in range(5)]
    rows += [event("usage", f"c{i % 5}", ms(2026, 3, 2, i), mb=300.0) for i in range(20)]
    rows += [dict(rows[-1])]  # a duplicate, in a later batch than its original

    def shard0_triggers(groups: list[list[dict]]) -> list[tuple]:
        ingestor = Ingestor(settings.model_copy(update={"shards": 1}))
        parts = [ingestor.ingest(rows_to_batch(g)[0]).parts[0] for g in groups]
        shard = ShardLogic(0, ingestor.settings, rules)
        result = shard.apply(parts, ingestor.watermark_ms)
        done = shard.end_stream()
        out = [*result.triggers.to_pylist(), *done.triggers.to_pylist()]
        return sorted((t["rule_id"], t["event_id"]) for t in out), result.duplicates

    one = shard0_triggers([rows])
    three = shard0_triggers([rows[:9], rows[9:25], rows[25:]])
    assert one == three and one[1] == 1 and len(one[0]) == 5


def test_a_micro_batch_with_one_malformed_batch_is_refused_whole(settings, rules, event) -> None:
    import pyarrow as pa

    from engine.errors import EngineError
    from engine.events.codec import rows_to_batch
    from engine.ingest import Ingestor
    from engine.shard import ShardLogic

    two = settings.model_copy(update={"shards": 2})
    ingestor = Ingestor(two)
    rows = [event("usage", f"c{i}", ms(2026, 3, 2), mb=1.0) for i in range(40)]
    parts = ingestor.ingest(rows_to_batch(rows)[0]).parts
    shard = ShardLogic(0, two, rules, ingestor.shard_map.range_of(0))
    foreign = parts[1]  # shard 1's events, sent to shard 0 by a stale router
    with pytest.raises(EngineError, match="owns key groups"):
        shard.apply([parts[0], foreign], ingestor.watermark_ms)
    assert shard.buffer.pending_rows == 0 and shard.counters["received"] == 0
    broken = parts[0].drop_columns(["seq"])
    with pytest.raises(EngineError, match="no 'seq' column"):
        shard.apply([parts[0], broken], ingestor.watermark_ms)
    assert isinstance(parts[0], pa.RecordBatch) and shard.buffer.pending_rows == 0


def test_a_recent_window_of_many_small_tables_stays_few_and_in_order() -> None:
    """One row per inbound decision: the window merges its tables now and then (lookups loop
    over them), and keeps exactly the newest rows in order."""
    import pyarrow as pa

    schema = pa.schema([("decision_id", pa.uint64()), ("customer_key", pa.uint64())])
    recent = Recent(schema, limit=500)
    for i in range(2_000):
        recent.add(pa.table({"decision_id": [i], "customer_key": [i % 7]}, schema=schema))
    assert len(recent.tables) <= 65 and recent.rows == 500
    ids = recent.to_table().column("decision_id").to_pylist()
    assert ids == list(range(1_500, 2_000))
    found = recent.holding("decision_id", np.array([1_499, 1_500, 1_999], dtype=np.uint64))
    assert found.column("decision_id").to_pylist() == [1_500, 1_999]
    newest = recent.of(3, ["decision_id"], 3)
    assert [r["decision_id"] for r in newest] == [1_998, 1_991, 1_984]


def test_a_snapshot_from_before_a_column_was_added_restores_it_at_its_default() -> None:
    """Golden records written before ``customer_value`` existed restore with it unset (the
    catalog's value applies); a snapshot missing any other column is refused."""
    import pyarrow as pa

    from engine.errors import StateError
    from engine.state.store import CustomerStore

    store = CustomerStore(capacity=16)
    slots = store.slots_for(np.array([7, 9], dtype=np.uint64))
    store.cols["customer_value"][slots] = [120.0, 80.0]
    store.cols["tenure_months"][slots] = [3, 4]
    table = store.to_arrow()
    old = table.drop_columns(["customer_value"])
    restored = CustomerStore.from_arrow(old)
    assert np.isnan(restored.cols["customer_value"][: restored.size]).all()
    np.testing.assert_array_equal(restored.cols["tenure_months"][:2], [3, 4])
    with pytest.raises(StateError, match="no column 'tenure_months'"):
        CustomerStore.from_arrow(table.drop_columns(["tenure_months"]))
    assert isinstance(old, pa.Table)
