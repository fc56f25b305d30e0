"""Sink actors: triggers and the decision log, written as Parquet through pyarrow.fs, committed
per checkpoint (``engine.sink``)."""

from __future__ import annotations

import uuid
from typing import Any

import pyarrow as pa
import ray

from actors.runtime import tune_allocator
from engine.sink import DayPartitionedSink, ParquetSink


class _SinkActor:
    """What both sink actors do with their ``sink``: write, count, write what is buffered."""

    sink: ParquetSink | DayPartitionedSink
    #: new at every start: a sink restarted by Ray lost what it buffered (see ``precommit``)
    incarnation: str = ""

    def _started(self) -> None:
        tune_allocator()  # each write allocates and frees a file's worth
        self.incarnation = uuid.uuid4().hex

    def write(self, table: pa.Table) -> int:
        self.sink.write(table)
        return self.sink.rows

    def rows(self) -> int:
        """Rows written so far (also: the actor is up)."""
        return self.sink.rows

    def write_buffered(self) -> dict[str, Any]:
        """Write every buffered row to files now; returns ``summary()``."""
        self.sink.write_buffered()
        return self.summary()

    def precommit(self, epoch: int) -> str:
        """Phase one of checkpoint ``epoch``; returns this actor's incarnation, so the
        coordinator sees a restart that lost buffered rows and recovers instead."""
        self.sink.precommit(epoch)
        return self.incarnation

    def commit(self, epoch: int) -> list[str]:
        return self.sink.commit(epoch)

    def recover(self, committed: int) -> str:
        """Settle the folder against CURRENT's epoch; returns this actor's incarnation."""
        self.sink.recover(committed)
        return self.incarnation

    def summary(self) -> dict[str, Any]:
        """Rows taken and the files written so far."""
        return {"rows": self.sink.rows, "files": list(self.sink.files)}


@ray.remote
class TriggerSinkActor(_SinkActor):
    """Buffers triggers and writes a Parquet file whenever enough have gathered, and when asked."""

    def __init__(self, uri: str, rows_per_file: int = 200_000) -> None:
        self.sink = ParquetSink(uri, rows_per_file=rows_per_file)
        self._started()


@ray.remote
class DecisionSinkActor(_SinkActor):
    """Writes the decision log, partitioned by day of decision (``day=YYYY-MM-DD/``)."""

    def __init__(self, uri: str, rows_per_file: int = 200_000) -> None:
        self.sink = DayPartitionedSink(uri, rows_per_file=rows_per_file, prefix="decisions")
        self._started()
