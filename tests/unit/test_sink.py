"""The sinks' two-phase commit: rows become visible only when their checkpoint is CURRENT, and
a recovery keeps exactly the rows of the epochs up to CURRENT."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from engine.sink import DayPartitionedSink, ParquetSink, pending_epoch


def _rows(folder: Path) -> list[int]:
    """What a reader of the folder sees (pending files start with ``_``: readers skip them)."""
    if not folder.exists():
        return []
    table = ds.dataset(str(folder), format="parquet", partitioning="hive").to_table()
    return sorted(table.column("n").to_pylist()) if table.num_rows else []


def _t(*ns: int) -> pa.Table:
    return pa.table(
        {"n": pa.array(ns, pa.int64()), "ts": pa.array([0] * len(ns), pa.timestamp("ms", "UTC"))}
    )


def test_rows_are_visible_once_their_checkpoint_commits(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path), rows_per_file=2)
    sink.write(_t(1, 2, 3))  # over rows_per_file: a pending file now
    assert _rows(tmp_path) == []
    assert sink.precommit(1) == 3
    assert _rows(tmp_path) == []
    sink.write(_t(4))  # epoch 2
    assert sink.commit(1)
    assert _rows(tmp_path) == [1, 2, 3]
    sink.precommit(2)
    sink.commit(2)
    assert _rows(tmp_path) == [1, 2, 3, 4]


@pytest.mark.parametrize("current", [0, 1, 2])
def test_recovery_keeps_the_epochs_up_to_current(tmp_path: Path, current: int) -> None:
    """Crash after precommit(2) (before or after CURRENT moved): a new sink settles the
    folder; then the replayed rows come again, and nothing is there twice."""
    sink = ParquetSink(str(tmp_path))
    sink.write(_t(1))
    sink.precommit(1)
    if current >= 1:
        sink.commit(1)
    sink.write(_t(2))
    sink.precommit(2)  # crash here: epoch 2 is pending; CURRENT is `current`
    sink.write(_t(3))  # buffered only: lost with the process

    again = ParquetSink(str(tmp_path))
    again.recover(current)
    kept = {0: [], 1: [1], 2: [1, 2]}[current]
    assert _rows(tmp_path) == kept
    assert not [p for p in tmp_path.iterdir() if pending_epoch(p.name) is not None]
    replayed = {0: [1, 2, 3], 1: [2, 3], 2: [3]}[current]
    again.write(_t(*replayed))
    again.precommit(current + 1)
    again.commit(current + 1)
    assert _rows(tmp_path) == [1, 2, 3]


def test_day_partitions_commit_and_recover_the_same_way(tmp_path: Path) -> None:
    sink = DayPartitionedSink(str(tmp_path), prefix="decisions")
    day = 86_400_000
    table = pa.table({"n": [1, 2], "ts": pa.array([0, day], pa.timestamp("ms", "UTC"))})
    sink.write(table)
    sink.precommit(1)
    sink.commit(1)
    sink.write(pa.table({"n": [3], "ts": pa.array([2 * day], pa.timestamp("ms", "UTC"))}))
    sink.precommit(2)  # crash: CURRENT is 1
    again = DayPartitionedSink(str(tmp_path), prefix="decisions")
    again.recover(1)
    assert _rows(tmp_path) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "day=1970-01-01",
        "day=1970-01-02",
        "day=1970-01-03",
    ]
