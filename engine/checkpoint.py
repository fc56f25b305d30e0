"""Shard snapshots on storage: one Arrow IPC file per table and a manifest, via pyarrow.fs.

A local folder by default; object storage works the same. The manifest is written last: a
folder without one is an incomplete snapshot and is refused.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
from pyarrow import ipc

from engine.errors import StateError
from engine.sink import resolve
from engine.snapshot import TABLES, ShardSnapshot

MANIFEST = "manifest.json"


def _write(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    with fs.open_output_stream(path) as out, ipc.new_file(out, table.schema) as writer:
        writer.write_table(table)


def _read(fs: pafs.FileSystem, path: str) -> pa.Table:
    with fs.open_input_file(path) as source:
        return ipc.open_file(source).read_all()


def write_snapshot(snapshot: ShardSnapshot, uri: str) -> str:
    """Write ``snapshot`` under ``uri`` (a folder); returns the URI."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    for name, table in snapshot.tables.items():
        _write(fs, f"{path}/{name}.arrow", table)
    with fs.open_output_stream(f"{path}/{MANIFEST}") as out:
        out.write(json.dumps(snapshot.metadata).encode())
    return uri


def read_snapshot(uri: str) -> ShardSnapshot:
    """The snapshot under ``uri``; StateError when it is incomplete or of another format."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as src:
            metadata = json.loads(src.read())
    except (FileNotFoundError, OSError) as exc:
        raise StateError(f"{uri}: no complete snapshot ({MANIFEST} missing)") from exc
    try:
        tables = {name: _read(fs, f"{path}/{name}.arrow") for name in TABLES}
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise StateError(f"{uri}: a snapshot table cannot be read: {exc}") from exc
    try:
        return ShardSnapshot.from_parts(metadata, tables)
    except StateError as exc:
        raise StateError(f"{uri}: {exc}") from exc
