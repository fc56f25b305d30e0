"""Parquet output through pyarrow.fs: a local folder or object storage, the same code."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and path for a local path or a URI such as s3://bucket/prefix."""
    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    return fs, path


class ParquetSink:
    """Buffers tables; writes a Parquet file per ``rows_per_file`` rows, and when asked."""

    def __init__(self, uri: str, rows_per_file: int = 200_000, prefix: str = "part") -> None:
        self.fs, self.path = resolve(uri)
        self.fs.create_dir(self.path, recursive=True)
        self.rows_per_file = rows_per_file
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0
        self.files: list[str] = []

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        if self._buffered >= self.rows_per_file:
            self.write_buffered()

    def write_buffered(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        name = f"{self.path}/{self.prefix}-{len(self.files):05d}.parquet"
        with self.fs.open_output_stream(name) as out:
            pq.write_table(table, out)
        self.files.append(name)
        self._buffer, self._buffered = [], 0


class DayPartitionedSink:
    """A ParquetSink per UTC day of the ``ts`` column, under ``<uri>/day=YYYY-MM-DD``."""

    def __init__(self, uri: str, rows_per_file: int = 200_000, prefix: str = "part") -> None:
        self.uri = uri.rstrip("/")
        self.rows_per_file = rows_per_file
        self.prefix = prefix
        self.sinks: dict[str, ParquetSink] = {}
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        days = pc.strftime(table.column("ts"), format="%Y-%m-%d")
        for day in pc.unique(days).to_pylist():
            sink = self.sinks.get(day)
            if sink is None:
                sink = ParquetSink(f"{self.uri}/day={day}", self.rows_per_file, self.prefix)
                self.sinks[day] = sink
            sink.write(table.filter(pc.equal(days, day)))
        self.rows += table.num_rows

    def write_buffered(self) -> None:
        for sink in self.sinks.values():
            sink.write_buffered()

    @property
    def files(self) -> list[str]:
        return [f for sink in self.sinks.values() for f in sink.files]
