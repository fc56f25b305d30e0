"""Sink actors: triggers and the decision log, written as Parquet through pyarrow.fs."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray

from engine.sink import DayPartitionedSink, ParquetSink


@ray.remote
class TriggerSinkActor:
    """Buffers triggers and writes a Parquet file whenever enough have gathered, and on flush."""

    def __init__(self, uri: str, rows_per_file: int = 200_000) -> None:
        self.sink = ParquetSink(uri, rows_per_file=rows_per_file)

    def write(self, triggers: pa.Table) -> int:
        self.sink.write(triggers)
        return self.sink.rows

    def rows(self) -> int:
        """Rows written so far (also: the actor is up)."""
        return self.sink.rows

    def flush(self) -> dict[str, Any]:
        self.sink.flush()
        return {"rows": self.sink.rows, "files": list(self.sink.files)}


@ray.remote
class DecisionSinkActor:
    """Writes the decision log, partitioned by day of decision (``day=YYYY-MM-DD/``)."""

    def __init__(self, uri: str, rows_per_file: int = 200_000) -> None:
        self.sink = DayPartitionedSink(uri, rows_per_file=rows_per_file, prefix="decisions")

    def write(self, decisions: pa.Table) -> int:
        self.sink.write(decisions)
        return self.sink.rows

    def rows(self) -> int:
        """Rows written so far (also: the actor is up)."""
        return self.sink.rows

    def flush(self) -> dict[str, Any]:
        self.sink.flush()
        return {"rows": self.sink.rows, "files": self.sink.files}
