"""Shard snapshots: golden records, pending events and seen ids as Arrow IPC files.

Files go through pyarrow.fs (a local folder by default, object storage alike). The manifest
is written last: a folder without one is an incomplete snapshot and is refused.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from pyarrow import ipc

from engine.config import EngineSettings
from engine.errors import StateError
from engine.rules.spec import RuleSet
from engine.shard import ShardLogic
from engine.sink import resolve
from engine.state.buffer import EventBuffer
from engine.state.store import CustomerStore

FORMAT_VERSION = 1


def _write(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    with fs.open_output_stream(path) as out, ipc.new_file(out, table.schema) as writer:
        writer.write_table(table)


def _read(fs: pafs.FileSystem, path: str) -> pa.Table:
    with fs.open_input_file(path) as source:
        return ipc.open_file(source).read_all()


def write_snapshot(shard: ShardLogic, uri: str) -> str:
    """Write the shard's state under ``uri``; returns the URI."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pending, seen = shard.buffer.to_arrow()
    _write(fs, f"{path}/customers.arrow", shard.store.to_arrow())
    _write(fs, f"{path}/pending.arrow", pending)
    _write(fs, f"{path}/seen.arrow", seen)
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "shard_id": shard.shard_id,
        "key_range": list(shard.key_range),
        "watermark_ms": shard.watermark_ms,
        "counters": shard.counters,
        "customers": shard.store.size,
    }
    with fs.open_output_stream(f"{path}/manifest.json") as out:
        out.write(json.dumps(manifest).encode())
    return uri


def read_snapshot(
    uri: str, settings: EngineSettings, rules: RuleSet, shard_id: int, key_range: tuple[int, int]
) -> ShardLogic:
    """Rebuild a ShardLogic from a snapshot; refuses one taken for other key groups."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(f"{path}/manifest.json") as src:
            manifest = json.loads(src.read())
    except (FileNotFoundError, OSError) as exc:
        raise StateError(f"{uri}: no complete snapshot (manifest.json missing)") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise StateError(f"{uri}: snapshot format {manifest.get('format')} is not {FORMAT_VERSION}")
    if tuple(manifest["key_range"]) != tuple(key_range):
        raise StateError(
            f"{uri}: snapshot holds key groups {manifest['key_range']}, shard {shard_id} owns "
            f"{list(key_range)}"
        )
    shard = ShardLogic(shard_id, settings, rules, key_range)
    shard.store = CustomerStore.from_arrow(_read(fs, f"{path}/customers.arrow"))
    shard.store.ensure_rules([r.state_key for r in rules.rules])
    shard.buffer = EventBuffer.from_arrow(
        settings.dedupe_window_ms,
        _read(fs, f"{path}/pending.arrow"),
        _read(fs, f"{path}/seen.arrow"),
    )
    shard.watermark_ms = int(manifest["watermark_ms"])
    shard.counters.update(manifest.get("counters", {}))
    return shard
