"""Checkpoints on storage: CURRENT only ever names a complete checkpoint, files are checked
against their digests, and old checkpoints are pruned."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.checkpoint import (
    CURRENT,
    config_entry,
    document_digest,
    read_checkpoint,
    read_snapshot,
    restored_config,
    write_checkpoint,
)
from engine.config import EngineSettings
from engine.errors import StateError
from engine.local import LocalEngine
from tests.conftest import ms

PROFILE = {"plan_data_cap_mb": 1000.0, "cycle_day": 5, "tz": "Europe/Berlin"}


def engine_after(rules, event, n: int) -> LocalEngine:
    engine = LocalEngine(EngineSettings(shards=2, allowed_lateness_s=3600), rules)
    rows = [event("profile_update", f"c{i}", ms(2026, 3, 1), **PROFILE) for i in range(n)]
    rows += [event("usage", f"c{i}", ms(2026, 3, 2, 10), mb=850.0) for i in range(n)]
    engine.submit_rows(rows)
    return engine


def test_a_checkpoint_round_trips_and_current_names_the_newest(tmp_path, rules, event) -> None:
    root = str(tmp_path / "chk")
    engine = engine_after(rules, event, 20)
    snapshots = [s.snapshot() for s in engine.shards]
    write_checkpoint(root, 1, snapshots, {"position": engine.ingestor.position()})
    engine.submit_rows([event("usage", "c1", ms(2026, 3, 2, 11), mb=1.0)])
    write_checkpoint(root, 2, [s.snapshot() for s in engine.shards], {"position": {"x": 2}})
    document, restored = read_checkpoint(root)
    assert document["epoch"] == 2 and document["position"] == {"x": 2}
    assert [s.key_range for s in restored] == [s.key_range for s in engine.shards]
    assert sum(s.customers.num_rows for s in restored) == 20
    assert sum(s.pending.num_rows for s in restored) == 1  # the 11:00 event, within lateness


def test_an_interrupted_checkpoint_is_never_used(tmp_path, rules, event) -> None:
    root = str(tmp_path / "chk")
    engine = engine_after(rules, event, 5)
    write_checkpoint(root, 1, [s.snapshot() for s in engine.shards])
    # a crash after the shard snapshots of epoch 2, before its manifest and CURRENT
    from engine.checkpoint import write_snapshot

    write_snapshot(engine.shards[0].snapshot(), f"{root}/chk-{2:012d}/shard-0")
    document, _ = read_checkpoint(root)
    assert document["epoch"] == 1
    assert (Path(root) / CURRENT).read_text() == f"chk-{1:012d}"


def test_a_damaged_file_is_refused(tmp_path, rules, event) -> None:
    root = str(tmp_path / "chk")
    engine = engine_after(rules, event, 5)
    folder = write_checkpoint(root, 1, [s.snapshot() for s in engine.shards])
    customers = Path(folder) / "shard-0" / "customers.arrow"
    data = bytearray(customers.read_bytes())
    data[len(data) // 2] ^= 0xFF
    customers.write_bytes(bytes(data))
    with pytest.raises(StateError, match="digest"):
        read_checkpoint(root)
    with pytest.raises(StateError, match="digest"):
        read_snapshot(str(Path(folder) / "shard-0"))


def test_no_checkpoint_is_a_state_error_and_old_ones_are_pruned(tmp_path, rules, event) -> None:
    root = str(tmp_path / "chk")
    with pytest.raises(StateError, match="no complete checkpoint"):
        read_checkpoint(root)
    engine = engine_after(rules, event, 3)
    for epoch in range(1, 6):
        write_checkpoint(root, epoch, [s.snapshot() for s in engine.shards], keep=2)
    kept = sorted(p.name for p in Path(root).iterdir() if p.name.startswith("chk-"))
    assert kept == [f"chk-{4:012d}", f"chk-{5:012d}"]
    assert read_checkpoint(root)[0]["epoch"] == 5
    # an attempt that failed (its shard folders, no manifest) is not counted among the kept
    # ones and goes once a later checkpoint is CURRENT; its number is not used again
    (Path(root) / f"chk-{6:012d}" / "shard-0").mkdir(parents=True)
    write_checkpoint(root, 7, [s.snapshot() for s in engine.shards], keep=2)
    kept = sorted(p.name for p in Path(root).iterdir() if p.name.startswith("chk-"))
    assert kept == [f"chk-{5:012d}", f"chk-{7:012d}"]


def test_a_checkpoint_brings_back_run_time_configuration_unless_the_files_were_edited() -> None:
    started = {"rules": [{"id": "a", "threshold": 1}]}
    changed = {"rules": [{"id": "a", "threshold": 2}]}  # a PUT /v1/rules while running
    manifest = {"config": {"rules": config_entry(changed, document_digest(started))}}
    # restarted with the same file: the change made at run time is back
    assert restored_config(manifest, "rules", document_digest(started)) == changed
    # restarted with an edited file: the edit wins
    edited = {"rules": [{"id": "a", "threshold": 3}]}
    assert restored_config(manifest, "rules", document_digest(edited)) is None
    # key order is not an edit; an older checkpoint without the record restores nothing
    assert document_digest({"b": 1, "a": [1, 2]}) == document_digest({"a": [1, 2], "b": 1})
    assert restored_config({}, "rules", document_digest(started)) is None
    assert restored_config(manifest, "offers", None) is None


def test_a_checkpoint_whose_storage_fails_keeps_the_previous_one(tmp_path, rules, event) -> None:
    """The storage of periodic checkpoints fails: the pipeline goes on, says why, keeps the
    previous checkpoint CURRENT and releases nothing behind it; the next one after the storage
    is back succeeds and clears the error."""
    import pyarrow as pa

    from engine.clock import ManualClock
    from engine.pipeline import Pipeline
    from engine.source import TableSource

    rows = [event("usage", f"c{i % 7}", ms(2026, 3, 2, 10) + i, mb=1.0) for i in range(300)]
    table = pa.Table.from_pylist(rows)
    root = tmp_path / "chk"
    engine = LocalEngine(EngineSettings(shards=2), rules, checkpoint_root=str(root))
    clock = ManualClock()
    served = {"model_version": "v0001"}
    pipeline = Pipeline(
        TableSource(table, "usage"), engine, 10.0, clock, chunk=100,
        manifest_extra=lambda: dict(served),
    )  # fmt: skip
    pipeline.start()  # checkpoint 1 of the empty engine
    clock.advance(11)
    pipeline.step()  # rows 0..99; checkpoint 2 begun (its cut: position 100)
    assert pipeline.epoch == 1 and pipeline.checkpoint_in_flight
    pipeline.step()  # rows 100..199; checkpoint 2 completed
    assert pipeline.epoch == 2 and pipeline.checkpoint_error is None
    assert read_checkpoint(str(root))[0]["source"]["position"] == 100
    root.rename(tmp_path / "away")
    root.write_text("not a folder")  # the storage fails (even for root)
    clock.advance(11)
    pipeline.step()  # rows 200..299; checkpoint 3 begun
    pipeline.step()  # nothing to read; checkpoint 3 fails
    assert pipeline.epoch == 2 and pipeline.checkpoint_error is not None
    assert not pipeline.checkpoint_in_flight
    pipeline.step()  # not retried at once
    assert pipeline.source.position == 300 and pipeline.epoch == 2
    root.unlink()
    (tmp_path / "away").rename(root)
    assert read_checkpoint(str(root))[0]["source"]["position"] == 100  # still CURRENT
    clock.advance(11)
    served["model_version"] = "v0002"
    pipeline.step()  # nothing to read; a checkpoint begun
    pipeline.step()  # and completed: epoch 4 (3 failed and is not used again)
    assert pipeline.epoch == 4 and pipeline.checkpoint_error is None
    manifest = read_checkpoint(str(root))[0]
    assert manifest["source"]["position"] == 300 and manifest["model_version"] == "v0002"


def test_a_recovery_that_gives_up_reads_nothing_more_until_one_succeeds(
    tmp_path, rules, event
) -> None:
    """A stretch fails and recovery fails ``max_attempts`` times in a row: the pipeline gives up
    (raises, says why, is not ready) but never reads past the failed stretch; the next step
    recovers first, and in the end every event is applied once."""
    import pyarrow as pa

    from engine.clock import ManualClock
    from engine.errors import WorkerLostError
    from engine.pipeline import Pipeline
    from engine.source import TableSource

    rows = [event("usage", f"c{i % 7}", ms(2026, 3, 2, 10) + i, mb=1.0) for i in range(300)]
    engine = LocalEngine(EngineSettings(shards=2), rules, checkpoint_root=str(tmp_path / "chk"))
    source = TableSource(pa.Table.from_pylist(rows), "usage")
    pipeline = Pipeline(source, engine, None, ManualClock(), chunk=100, max_attempts=2)
    pipeline.start()
    pipeline.step()  # rows 0..99 applied
    apply, recover = engine.shards[1].apply, engine.recover
    failures = {"recover": 3}

    def failing_apply(*args, **kwargs):
        raise RuntimeError("a call timed out")

    def failing_recover():
        if failures["recover"]:
            failures["recover"] -= 1
            if failures["recover"] == 2:
                raise OSError("the checkpoint storage does not answer")
            raise WorkerLostError("a shard is still restarting")
        return recover()

    engine.shards[1].apply, engine.recover = failing_apply, failing_recover
    with pytest.raises(WorkerLostError, match="gave up after 2"):
        pipeline.step()  # rows 100..199 fail; 2 recoveries fail
    assert pipeline.unrecovered is not None and source.position == 200
    engine.shards[1].apply = apply
    pipeline.step()  # recovers (the third failure, then success) before reading anything
    while not source.exhausted:
        pipeline.step()
    engine.end_stream()
    assert sum(s.counters["applied"] for s in engine.shards) == 300
    assert pipeline.unrecovered is None


def test_a_snapshot_writer_writes_in_the_background_one_at_a_time(
    tmp_path, rules, event, monkeypatch
) -> None:
    """``result`` is None while the write runs and the entry once it is done; a failed write's
    error is raised by ``result``; ``begin`` and ``abandon`` wait for a running write, so an
    abandoned one never lands after a later one; an epoch not begun is refused."""
    import threading

    from engine import checkpoint
    from engine.checkpoint import SnapshotWriter

    engine = engine_after(rules, event, 20)
    snapshot = engine.shards[0].snapshot(detached=True)
    gate, order = threading.Event(), []
    write = checkpoint.write_shard

    def slow_write(*args, **kwargs):
        gate.wait(10)
        order.append(args[2])
        return write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_shard", slow_write)
    writer = SnapshotWriter()
    root = str(tmp_path / "chk")
    writer.begin(snapshot, root, 1, 0)
    assert writer.result(1) is None  # still writing
    with pytest.raises(StateError, match="checkpoint 2"):
        writer.result(2)
    threading.Timer(0.2, gate.set).start()
    writer.begin(snapshot, root, 2, 0)  # waits for epoch 1's write to end first
    assert order == [1]
    entry = writer.result(2, wait=True)
    assert order == [1, 2] and entry is not None and entry["folder"] == "shard-0"
    written = read_snapshot(f"{root}/chk-{2:012d}/shard-0").customers
    for column in ("customer_key", "event_count", "cycle_usage_mb"):
        assert written.column(column).equals(snapshot.customers.column(column))
    with pytest.raises(StateError):
        writer.result(1)  # abandoned by the begin of 2

    def failing_write(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "write_shard", failing_write)
    writer.begin(snapshot, root, 3, 0)
    with pytest.raises(OSError, match="No space"):
        writer.result(3, wait=True)
    deferred = SnapshotWriter(background=False)  # writes at its first ``result``
    monkeypatch.setattr(checkpoint, "write_shard", slow_write)
    order.clear()
    deferred.begin(snapshot, root, 4, 0)
    assert order == []
    assert deferred.result(4) is not None and order == [4]


def test_a_detached_snapshot_keeps_the_cut_while_the_shard_goes_on(rules, event) -> None:
    """The golden records of ``snapshot(detached=True)`` do not change with later steps; those
    of a plain snapshot share the store's memory (why an asynchronous checkpoint detaches)."""
    engine = engine_after(rules, event, 5)
    shard = next(s for s in engine.shards if s.customers)
    detached, shared = shard.snapshot(detached=True), shard.snapshot()
    before = detached.customers.column("event_count").to_pylist()
    assert shared.customers.column("event_count").to_pylist() == before
    engine.submit_rows([event("usage", f"c{i}", ms(2026, 3, 2, 11), mb=1.0) for i in range(5)])
    assert detached.customers.column("event_count").to_pylist() == before
    assert shared.customers.column("event_count").to_pylist() != before


def test_a_stop_s_checkpoint_goes_on_after_the_one_being_written_failed(
    tmp_path, rules, event, monkeypatch
) -> None:
    """A clean stop while a periodic checkpoint is being written completes that one first; if
    it fails (a transient storage error), the stop's own checkpoint is taken all the same."""
    import pyarrow as pa

    from engine import checkpoint
    from engine.clock import ManualClock
    from engine.pipeline import Pipeline
    from engine.source import TableSource

    rows = [event("usage", f"c{i % 7}", ms(2026, 3, 2, 10) + i, mb=1.0) for i in range(100)]
    root = tmp_path / "chk"
    engine = LocalEngine(EngineSettings(shards=2), rules, checkpoint_root=str(root))
    pipeline = Pipeline(TableSource(pa.Table.from_pylist(rows), "usage"), engine, None,
                        ManualClock(), chunk=100)  # fmt: skip
    pipeline.start()
    pipeline.step()
    pipeline.begin_checkpoint()  # epoch 2, its cut at row 100, written at the next step
    write, failures = checkpoint.write_shard, []

    def once(*args, **kwargs):
        if not failures:
            failures.append(args[2])
            raise OSError("Input/output error")
        return write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_shard", once)
    pipeline.checkpoint()  # a stop now: checkpoint 2 fails, 3 is taken
    assert failures == [2] and pipeline.epoch == 3 and pipeline.checkpoint_error is None
    assert read_checkpoint(str(root))[0]["epoch"] == 3
