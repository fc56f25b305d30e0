"""Sink actors: triggers and the decision log, written as Parquet through pyarrow.fs."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray

from engine.sink import DayPartitionedSink, ParquetSink


class _SinkActor:
    """What both sink actors do with their ``sink``: write, count, write what is buffered."""

    sink: ParquetSink | DayPartitionedSink

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

    def summary(self) -> dict[str, Any]:
        """Rows taken and the files written so far."""
        return {"rows": self.sink.rows, "files": list(self.sink.files)}


@ray.remote
class TriggerSinkActor(_SinkActor):
    """Buffers triggers and writes a Parquet file whenever enough have gathered, and when asked."""

    def __init__(self, uri: str, rows_per_file: int = 200_000) -> None:
        self.sink = ParquetSink(uri, rows_per_file=rows_per_file)


@ray.remote
class DecisionSinkActor(_SinkActor):
    """Writes the decision log, partitioned by day of decision (``day=YYYY-MM-DD/``)."""

    def __init__(self, uri: str, rows_per_file: int = 200_000) -> None:
        self.sink = DayPartitionedSink(uri, rows_per_file=rows_per_file, prefix="decisions")
