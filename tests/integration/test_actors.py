"""The engine on a real local Ray: actors give exactly what the one-process engine gives."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import pytest
import ray

from actors.supervisor import Supervisor
from engine.config import EngineSettings
from engine.errors import RuleError, StateError
from engine.events.codec import rows_to_batch
from engine.local import LocalEngine
from engine.reference import ReferenceDataError, load_reference
from engine.rules.spec import parse_rules_text
from engine.synthetic.telco import events, population
from tests.conftest import ROOT

pytestmark = pytest.mark.integration
SHIPPED = load_reference(ROOT / "deploy" / "config" / "reference.yaml")


@pytest.fixture(scope="module")
def stream():
    return events(population(3_000, seed=3), 40_000, days=30, seed=3)


def _keys(table):
    return sorted(
        zip(table.column("rule_id").to_pylist(), table.column("event_id").to_pylist(), strict=True)
    )


def _replay(supervisor, table, chunk=7_000):
    for start in range(0, table.num_rows, chunk):
        supervisor.router.submit(table.slice(start, chunk))
    return supervisor.router.end_stream()


def test_actors_give_the_same_triggers_as_the_local_engine_with_1_and_4_shards(
    ray_cluster, stream, rules, tmp_path
) -> None:
    local = LocalEngine(EngineSettings(shards=1, allowed_lateness_s=10), rules, reference=SHIPPED)
    for start in range(0, stream.num_rows, 5_000):
        local.submit(stream.slice(start, 5_000))
    local.end_stream()
    want = _keys(local.trigger_table())
    assert len(want) > 100
    fired = {rule for rule, _ in want}  # the shipped moments, reference data and deadlines too
    assert {"recalled_device_in_use", "cart_left_while_browsing", "away_from_home"} <= fired
    for shards in (1, 4):
        settings = EngineSettings(
            shards=shards, allowed_lateness_s=10, micro_batch_max_events=2_000
        )
        sup = Supervisor(
            settings,
            rules,
            trigger_uri=str(tmp_path / f"t{shards}"),
            shard_cpus=0.25,
            namespace_prefix=f"it-{shards}",
            dead_letter_uri=str(tmp_path / f"d{shards}"),
            reference=SHIPPED,
        )
        try:
            written = _replay(sup, stream)
            got = pq.read_table(written["files"]).combine_chunks() if written["files"] else None
            assert got is not None and _keys(got) == want
            assert sup.router.stats.micro_batches > shards  # many micro-batches, not one call
            assert sup.router.stats.rejected == len(local.dead_letters)
            dead = pq.read_table(sup.router.dead_letter_sink.files)
            assert dead.num_rows == sup.router.stats.rejected > 0
            assert all(r.startswith("late") for r in dead.column("reason").to_pylist())
        finally:
            sup.shutdown()


def test_micro_batches_cut_from_a_routed_batch_carry_the_watermark_from_before_it(
    ray_cluster, stream, rules, tmp_path
) -> None:
    """A routed batch larger than a micro-batch goes to a shard in several calls: all but the
    last must carry the watermark from before the batch. With the watermark from after it,
    the shard fired a cart's 30-minute deadline before the page views and checkouts of the
    next piece that came before it (found as 9,416 against 9,425 carts in a 2M-event replay)."""
    local = LocalEngine(EngineSettings(shards=1, allowed_lateness_s=10), rules, reference=SHIPPED)
    local.submit(stream)
    local.end_stream()
    want = _keys(local.trigger_table())
    assert sum(rule == "cart_left_while_browsing" for rule, _ in want) > 20
    settings = EngineSettings(shards=1, allowed_lateness_s=10, micro_batch_max_events=100)
    sup = Supervisor(
        settings, rules, trigger_uri=str(tmp_path / "t"), shard_cpus=0.25,
        namespace_prefix="it-pieces", reference=SHIPPED,
    )  # fmt: skip
    try:
        written = _replay(sup, stream)
        assert _keys(pq.read_table(written["files"]).combine_chunks()) == want
    finally:
        sup.shutdown()


def test_rules_are_replaced_while_running_and_a_bad_document_changes_nothing(
    ray_cluster, stream, rules
) -> None:
    sup = Supervisor(
        EngineSettings(shards=2, allowed_lateness_s=10),
        rules,
        shard_cpus=0.25,
        namespace_prefix="it-swap",
    )
    try:
        half = stream.num_rows // 2
        sup.router.submit(stream.slice(0, half))
        with pytest.raises(RuleError, match="unknown name 'nope'"):
            sup.set_rules(
                {"rules": [{"id": "x", "type": "condition", "on": "usage", "when": "nope"}]}
            )
        assert sup.rules is rules
        extra = parse_rules_text("""
rules:
  - {id: data_cap_nearing, type: threshold, on: usage, value: cycle_usage_mb,
     threshold: 0.8 * plan_data_cap_mb}
  - {id: big_session, type: condition, on: usage, when: mb > 1500}
""").document
        sup.set_rules(dict(extra))
        sup.router.submit(stream.slice(half))
        sup.router.end_stream()
        by_rule = sup.router.stats.triggers_by_rule
        assert by_rule["big_session"] > 0 and by_rule["data_cap_nearing"] > 0
        stats = sup.shard_stats()
        assert sum(s["applied"] for s in stats) == sup.router.stats.applied
    finally:
        sup.shutdown()


def test_customer_record_is_read_from_its_owning_shard_and_checkpoints_restore_on_any_shards(
    ray_cluster, stream, rules, tmp_path
) -> None:
    settings = EngineSettings(shards=2, allowed_lateness_s=10)
    sup = Supervisor(
        settings,
        rules,
        shard_cpus=0.25,
        namespace_prefix="it-snap",
        checkpoint_root=str(tmp_path / "chk"),
    )
    try:
        _replay(sup, stream)
        someone = stream.column("customer_id")[0].as_py()
        record = sup.customer(someone)
        assert record is not None and record["event_count"] >= 1
        assert record["plan_data_cap_mb"] > 0 and record["tz"].startswith("Europe/")
        assert sup.customer("+490000000000") is None
        sup.checkpoint(1, {})
        before = sup.shard_stats()
        position = sup.ingestor.position()
    finally:
        sup.shutdown()
    for shards in (2, 4):  # the same shard count, and a rescale from 2 onto 4
        fresh = Supervisor(
            EngineSettings(shards=shards, allowed_lateness_s=10),
            rules,
            shard_cpus=0.25,
            namespace_prefix=f"it-restore-{shards}",
        )
        try:
            assert fresh.restore(str(tmp_path / "chk")) == sum(s["customers"] for s in before)
            assert fresh.customer(someone) == record
            assert fresh.ingestor.position() == position
        finally:
            fresh.shutdown()


def test_an_asynchronous_checkpoint_holds_the_cut_while_the_shards_go_on(
    ray_cluster, stream, rules, tmp_path
) -> None:
    """Checkpoint 2 is begun after the first half and completed after the second half has been
    applied (the shards write their snapshots meanwhile): restored, it holds the first half's
    golden records and ingest position, not the second's. A checkpoint begun and not completed
    before a recovery is never used."""
    root = str(tmp_path / "chk")
    half = stream.num_rows // 2
    settings = EngineSettings(shards=2, allowed_lateness_s=10)
    local = LocalEngine(settings, rules, reference=SHIPPED)
    local.submit(stream.slice(0, half))
    sup = Supervisor(
        settings,
        rules,
        trigger_uri=str(tmp_path / "triggers"),
        shard_cpus=0.25,
        namespace_prefix="it-async",
        checkpoint_root=root,
        reference=SHIPPED,
    )
    try:
        sup.recover()
        sup.checkpoint(1, {})
        for start in range(0, half, 7_000):
            sup.router.submit(stream.slice(start, min(7_000, half - start)))
        sup.begin_checkpoint(2, {})
        at_cut = sup.ingestor.position()
        assert sup.checkpoint_in_flight == 2
        with pytest.raises(StateError, match="still being written"):
            sup.begin_checkpoint(3, {})
        _replay(sup, stream.slice(half))
        assert sup.finish_checkpoint(wait=True) is not None
        assert sup.checkpoint_in_flight is None and sup.checkpoint_times[-1]["epoch"] == 2
        customers = {r for r in stream.column("customer_id").to_pylist()[:2_000]}
        after = {c: sup.customer(c) for c in customers}
        sup.begin_checkpoint(3, {})  # never completed: the engine recovers first
        assert sup.recover()["epoch"] == 2
        assert sup.ingestor.position() == at_cut
        restored = {c: sup.customer(c) for c in customers}
    finally:
        sup.shutdown()
    assert restored == {c: local.customer(c) for c in customers}
    assert restored != after  # the second half changed them, and is not in the checkpoint


def test_a_micro_batch_closes_on_its_deadline_and_calls_in_flight_stay_bounded(
    ray_cluster, stream, rules
) -> None:
    from engine.clock import ManualClock

    settings = EngineSettings(
        shards=2,
        allowed_lateness_s=10,
        micro_batch_max_events=50_000,
        micro_batch_deadline_ms=5,
        max_in_flight_per_shard=1,
    )
    sup = Supervisor(settings, rules, shard_cpus=0.25, namespace_prefix="it-deadline")
    clock = ManualClock()
    sup.router.batcher.clock = clock
    try:
        sup.router.submit(stream.slice(0, 1_000))  # far below the size limit: stays open
        assert sum(sup.router.queue_depth) == 0
        clock.advance(0.004)
        sup.router.poll()
        assert sum(sup.router.queue_depth) == 0  # 4 ms: still open
        clock.advance(0.002)
        sup.router.poll()
        assert sum(sup.router.queue_depth) + sup.router.stats.micro_batches == 2
        for start in range(1_000, 20_000, 1_000):  # one call in flight per shard, never more
            sup.router.submit(stream.slice(start, 1_000))
            clock.advance(0.01)
            sup.router.poll()
            assert all(d <= 1 for d in sup.router.queue_depth)
        sup.router.end_stream()
        assert (
            sup.router.stats.applied + sup.router.stats.rejected + sup.router.stats.duplicates
            == 20_000
        )
    finally:
        sup.shutdown()


def test_reference_tables_set_at_run_time_are_checkpointed_and_restored_on_any_shards(
    ray_cluster, stream, rules, tmp_path
) -> None:
    """A stock table swapped at run time (after a refused one changed nothing) goes into the
    checkpoint; an engine started again from the shipped files restores it with the customers,
    on 2 shards and rescaled onto 3, and its shards decide with it: a recalled phone next to
    the stores that sold out gets no recall moment."""
    settings = EngineSettings(shards=2, allowed_lateness_s=10)
    stock = SHIPPED.tables["stock"]
    sold_out = stock.filter(pa.compute.not_equal(stock.column("product"), "Nimbus X3"))
    sup = Supervisor(settings, rules, shard_cpus=0.25, namespace_prefix="it-ref",
                     checkpoint_root=str(tmp_path / "chk"), reference=SHIPPED)  # fmt: skip
    try:
        _replay(sup, stream.slice(0, 10_000))
        unknown = pa.table({"store_id": ["NOWHERE"], "product": ["x"], "quantity": [1]})
        with pytest.raises(ReferenceDataError, match="NOWHERE"):
            sup.set_reference("stock", unknown)
        assert sup.reference is SHIPPED
        swapped = sup.set_reference("stock", sold_out)
        sup.checkpoint(1, {})
    finally:
        sup.shutdown()
    held = {r["store_id"] for r in stock.to_pylist() if r["product"] == "Nimbus X3"}
    shop = next(s for s in SHIPPED.tables["stores"].to_pylist() if s["store_id"] in held)
    assert SHIPPED.nearest_store_km("Nimbus X3", shop["lat"], shop["lon"]) < 1e-6  # it had one
    t = 1_800_000_000_000
    recall = [
        {"event_id": 1, "customer_id": "it-recall", "kind": "profile_update", "ts": t,
         "device_model": "Nimbus X2"},
        {"event_id": 2, "customer_id": "it-recall", "kind": "location", "ts": t + 1,
         "lat": shop["lat"], "lon": shop["lon"]},
    ]  # fmt: skip
    for shards in (2, 3):
        fresh = Supervisor(EngineSettings(shards=shards, allowed_lateness_s=10), rules,
                           shard_cpus=0.25, namespace_prefix=f"it-ref-{shards}",
                           reference=SHIPPED)  # fmt: skip
        try:
            assert fresh.restore(str(tmp_path / "chk")) > 0
            assert fresh.reference.version == swapped.version != SHIPPED.version
            batch, positions, letters = rows_to_batch(recall)
            assert letters == []
            fresh.router.submit(batch, positions)
            fresh.router.end_stream()
            assert fresh.router.stats.triggers_by_rule.get("recalled_device_in_use", 0) == 0
            assert fresh.router.stats.applied == 2
        finally:
            fresh.shutdown()


@pytest.mark.parametrize("after_start", [False, True])
def test_shard_actors_start_with_the_allocator_settings_and_spares_load_their_code_first(
    ray_cluster, rules, tmp_path, after_start
) -> None:
    """No ``runtime_env`` (its setup costs a new actor 1-1.5 s): a shard's process still runs
    with Arrow's mimalloc purge delay in its environment before pyarrow loaded; at the first
    start every shard has its pattern loop and store search loaded before the engine answers,
    and the spares load theirs in the background: started with the shards, or (the service's
    way) once the shards have started and loaded."""
    sup = Supervisor(EngineSettings(shards=2), rules, shard_cpus=0.25, namespace_prefix="it-env",
                     checkpoint_root=str(tmp_path / "chk"), reference=SHIPPED,
                     spares_after_start=after_start)  # fmt: skip
    try:
        assert len(sup.spares) == (0 if after_start else 2)
        sup.recover()
        assert len(sup.spares) == 2
        assert ray.get([a.loaded.remote(0.0) for a in sup.shards]) == [True] * 2  # done, not begun
        everyone = [*sup.shards, *sup.spares]
        assert ray.get([a.loaded.remote(10.0) for a in sup.spares]) == [True] * 2

        def probe(actor):
            import os
            import sys

            return os.environ.get("MIMALLOC_PURGE_DELAY"), sorted(
                m for m in ("numba", "scipy.spatial") if m in sys.modules
            )

        assert any(r.pattern is not None for r in rules.rules)
        for actor in everyone:
            assert ray.get(actor.__ray_call__.remote(probe)) == ("1000", ["numba", "scipy.spatial"])
    finally:
        sup.shutdown()


def test_run_time_changes_reach_the_spares_and_a_dead_spare_is_replaced_not_an_error(
    ray_cluster, rules, tmp_path
) -> None:
    """A spare takes a rule, catalog or table change as the shards do (so one taking over has
    what the new rules need loaded); a spare that died meanwhile does not fail the change: it
    is replaced by one built with the current configuration."""
    sup = Supervisor(EngineSettings(shards=2), rules, shard_cpus=0.25, namespace_prefix="it-spr",
                     checkpoint_root=str(tmp_path / "chk"), reference=SHIPPED)  # fmt: skip
    try:
        sup.recover()
        ray.kill(sup.spares[0])
        stock = SHIPPED.tables["stock"]
        fewer = stock.filter(pa.compute.not_equal(stock.column("product"), "Nimbus X3"))
        version = sup.set_reference("stock", fewer).version
        assert len(sup.spares) == 2

        def seen(actor):
            return actor.logic.reference.version, sorted(r.id for r in actor.logic.rules.rules)

        ids = sorted(r.id for r in rules.rules)
        assert [ray.get(s.__ray_call__.remote(seen)) for s in sup.spares] == [(version, ids)] * 2
        ray.kill(sup.spares[1])
        document = dict(rules.document)
        document["rules"] = [r for r in document["rules"] if r["id"] != "away_from_home"]
        sup.set_rules(document)
        fewer_ids = [i for i in ids if i != "away_from_home"]
        assert len(sup.spares) == 2
        assert [ray.get(s.__ray_call__.remote(seen)) for s in sup.spares] == [
            (version, fewer_ids)
        ] * 2
    finally:
        sup.shutdown()
