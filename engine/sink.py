"""Parquet output through pyarrow.fs (a local folder or object storage, the same code), written
once per row however often a stretch of the stream is replayed.

A sink buffers the tables it is given and writes them as *pending* files
(``_pending-e<epoch>-...parquet``: a leading underscore, so Parquet dataset readers skip them)
for the epoch being filled. A checkpoint is a two-phase commit, as Flink's
``TwoPhaseCommitSinkFunction``: ``precommit(epoch)`` writes what is buffered and closes the
epoch before the checkpoint's manifest is written; ``commit(epoch)`` renames the epoch's pending
files to their final names once the checkpoint is CURRENT. After a crash, ``recover(epoch)``
(the CURRENT checkpoint's epoch) commits the pending files of epochs up to it (the crash came
between CURRENT and the rename) and deletes the later ones: the stream is replayed from that
checkpoint and writes those rows again, with the same content (the engine is deterministic).

A sink that no checkpoint coordinates (a plain replay, a test) calls ``write_buffered`` to write
and commit at once.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.faults import crash_point

PENDING = "_pending-"
_PENDING_NAME = re.compile(r"_pending-e(\d{12})-(.+\.parquet)$")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and path for a local path or a URI such as s3://bucket/prefix."""
    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    return fs, path


@dataclass(frozen=True)
class _Pending:
    epoch: int
    path: str
    final: str
    rows: int


def pending_epoch(name: str) -> int | None:
    """The epoch of a pending file's base name (None: not a pending file)."""
    match = _PENDING_NAME.match(name)
    return int(match.group(1)) if match else None


def settle(fs: pafs.FileSystem, folder: str, committed: int) -> tuple[list[str], int]:
    """Pending files under ``folder`` (recursively): commit those of epochs up to ``committed``,
    delete the later ones. Returns (the files committed, the number deleted)."""
    selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    committed_files, deleted = [], 0
    for info in fs.get_file_info(selector):
        match = _PENDING_NAME.match(info.base_name)
        if match is None or info.type != pafs.FileType.File:
            continue
        if int(match.group(1)) <= committed:
            final = f"{info.path.rsplit('/', 1)[0]}/e{match.group(1)}-{match.group(2)}"
            fs.move(info.path, final)
            committed_files.append(final)
        else:
            fs.delete_file(info.path)
            deleted += 1
    return committed_files, deleted


class ParquetSink:
    """Buffers tables; writes a pending file per ``rows_per_file`` rows and at each
    ``precommit``; makes them visible at ``commit`` (see the module's docstring)."""

    def __init__(self, uri: str, rows_per_file: int = 200_000, prefix: str = "part") -> None:
        self.fs, self.path = resolve(uri)
        self.fs.create_dir(self.path, recursive=True)
        self.rows_per_file = rows_per_file
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self._crash_point = f"sink:{prefix}:during_commit"
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._pending: list[_Pending] = []
        self._written = 0
        #: the epoch the rows taken now belong to (the next checkpoint's)
        self.epoch = 1
        #: rows taken since this sink started or recovered
        self.rows = 0
        #: committed files
        self.files: list[str] = []

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        if self._buffered >= self.rows_per_file:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        base = f"e{self.epoch:012d}-{self.prefix}-{self._written:05d}.parquet"
        self._written += 1
        path = f"{self.path}/{PENDING}{base}"
        with self.fs.open_output_stream(path) as out:
            pq.write_table(table, out)
        self._pending.append(_Pending(self.epoch, path, f"{self.path}/{base}", table.num_rows))
        self._buffer, self._buffered = [], 0

    def precommit(self, epoch: int) -> int:
        """Phase one of checkpoint ``epoch``: write what is buffered as pending files of the
        epoch, and start the next. Returns the rows pending."""
        self.epoch = epoch
        self._write_pending()
        self.epoch = epoch + 1
        return sum(p.rows for p in self._pending)

    def commit(self, epoch: int) -> list[str]:
        """Phase two: checkpoint ``epoch`` is CURRENT; make its pending files (and those of
        earlier epochs) visible. Returns the files committed."""
        done = [p for p in self._pending if p.epoch <= epoch]
        for pending in done:
            self.fs.move(pending.path, pending.final)
            self.files.append(pending.final)
            crash_point(self._crash_point)
        self._pending = [p for p in self._pending if p.epoch > epoch]
        return [p.final for p in done]

    def recover(self, committed: int) -> None:
        """After a crash: settle every pending file under this sink's folder (this sink's or a
        previous incarnation's) against the CURRENT epoch ``committed``, drop what is buffered;
        the next rows belong to epoch ``committed + 1``."""
        files, _ = settle(self.fs, self.path, committed)
        self.files.extend(files)
        self._buffer, self._buffered, self._pending = [], 0, []
        self.epoch = committed + 1
        self.rows = 0

    def write_buffered(self) -> None:
        """Write and commit everything taken so far (no checkpoint coordinates this sink)."""
        self._write_pending()
        self.commit(self.epoch)


class DayPartitionedSink:
    """A ParquetSink per UTC day of the ``ts`` column, under ``<uri>/day=YYYY-MM-DD``."""

    def __init__(self, uri: str, rows_per_file: int = 200_000, prefix: str = "part") -> None:
        self.uri = uri.rstrip("/")
        self.rows_per_file = rows_per_file
        self.prefix = prefix
        self.sinks: dict[str, ParquetSink] = {}
        self.rows = 0
        self.epoch = 1

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        days = pc.strftime(table.column("ts"), format="%Y-%m-%d")
        for day in pc.unique(days).to_pylist():
            sink = self.sinks.get(day)
            if sink is None:
                sink = ParquetSink(f"{self.uri}/day={day}", self.rows_per_file, self.prefix)
                sink.epoch = self.epoch
                self.sinks[day] = sink
            sink.write(table.filter(pc.equal(days, day)))
        self.rows += table.num_rows

    def precommit(self, epoch: int) -> int:
        self.epoch = epoch + 1
        return sum(sink.precommit(epoch) for sink in self.sinks.values())

    def commit(self, epoch: int) -> list[str]:
        return [f for sink in self.sinks.values() for f in sink.commit(epoch)]

    def recover(self, committed: int) -> None:
        fs, path = resolve(self.uri)
        settle(fs, path, committed)
        self.sinks = {}
        self.rows = 0
        self.epoch = committed + 1

    def write_buffered(self) -> None:
        for sink in self.sinks.values():
            sink.write_buffered()

    @property
    def files(self) -> list[str]:
        return [f for sink in self.sinks.values() for f in sink.files]
