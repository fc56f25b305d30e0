"""Shard snapshots on storage, and whole checkpoints of an engine, via pyarrow.fs.

A shard snapshot is a folder: one Arrow IPC file per table and ``manifest.json`` with the
snapshot's metadata and the SHA-256 of every file, written last; a folder without it is an
incomplete snapshot and is refused, and so is a file whose digest does not match.

A checkpoint is one snapshot per shard of an aligned cut (the router drained: no micro-batch in
flight) under ``<root>/chk-<epoch>/shard-<i>``, then ``<root>/chk-<epoch>/CHECKPOINT.json``
(shard folders with their key ranges and digests, the caller's source positions and versions),
then ``<root>/CURRENT`` naming the folder, replaced atomically. Readers follow ``CURRENT`` only,
so a checkpoint that did not finish is never used. The last ``keep`` checkpoints are kept.
A shard writes its snapshot with a ``SnapshotWriter``, in the background while it goes on.

The manifest also records the running rules and offer catalog (``config_entry``): a restore
brings back what was set at run time, unless the process was started with edited files
(``restored_config``).

``rescale`` turns the snapshots of N shards into snapshots for M shards (other key-group
ranges): every row goes to the shard that owns its customer's key group.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from pyarrow import ipc

from engine.errors import StateError
from engine.faults import crash_point
from engine.partition import key_groups_of
from engine.sink import resolve
from engine.snapshot import TABLES, ShardSnapshot
from engine.state.store import STRING_COLUMNS, StringPool

MANIFEST = "manifest.json"
CHECKPOINT = "CHECKPOINT.json"
CURRENT = "CURRENT"


class _Digesting:
    """A file-like object that passes what is written on to ``out`` and digests it (SHA-256),
    for ``pa.PythonFile``: an Arrow IPC file is written and digested in one pass, piece by
    piece, without the whole file in memory (a shard's golden records are 100+ MB; a buffer
    that size is fresh memory, which page-faults at about 0.4 s per 100 MB on this VM)."""

    def __init__(self, out: pa.NativeFile) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.out.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def _write_table(fs: pafs.FileSystem, path: str, table: pa.Table) -> str:
    """Write ``table`` as an Arrow IPC file at ``path``; returns its SHA-256."""
    with fs.open_output_stream(path) as out:
        digesting = _Digesting(out)
        with ipc.new_file(pa.PythonFile(digesting, mode="w"), table.schema) as writer:
            writer.write_table(table)
    return digesting.digest.hexdigest()


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as source:
        return bytes(source.read())


def write_snapshot(snapshot: ShardSnapshot, uri: str) -> str:
    """Write ``snapshot`` under ``uri`` (a folder), its manifest with digests last; returns it."""
    _write_snapshot(snapshot, uri)
    return uri


def _write_snapshot(snapshot: ShardSnapshot, uri: str) -> bytes:
    """``write_snapshot``; returns the manifest's bytes (a checkpoint digests them)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    digests = {}
    for name, table in snapshot.tables.items():
        digests[name] = _write_table(fs, f"{path}/{name}.arrow", table)
    manifest = json.dumps({**snapshot.metadata, "sha256": digests}).encode()
    _write_bytes(fs, f"{path}/{MANIFEST}", manifest)
    return manifest


def read_snapshot(uri: str) -> ShardSnapshot:
    """The snapshot under ``uri``; StateError when it is incomplete, altered or of another
    format."""
    fs, path = resolve(uri)
    try:
        metadata = json.loads(_read_bytes(fs, f"{path}/{MANIFEST}"))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise StateError(f"{uri}: no complete snapshot ({MANIFEST} missing)") from exc
    digests = metadata.get("sha256", {})
    tables = {}
    for name in TABLES:
        try:
            data = _read_bytes(fs, f"{path}/{name}.arrow")
        except (FileNotFoundError, OSError) as exc:
            raise StateError(f"{uri}: snapshot table {name} cannot be read: {exc}") from exc
        if digests.get(name) != hashlib.sha256(data).hexdigest():
            raise StateError(f"{uri}: snapshot table {name} does not match its digest")
        try:
            tables[name] = ipc.open_file(pa.BufferReader(data)).read_all()
        except pa.ArrowInvalid as exc:  # pragma: no cover (the digest matched)
            raise StateError(f"{uri}: snapshot table {name} cannot be read: {exc}") from exc
    try:
        return ShardSnapshot.from_parts(metadata, tables)
    except StateError as exc:
        raise StateError(f"{uri}: {exc}") from exc


# -- checkpoints of a whole engine --------------------------------------------------------------
def write_checkpoint(
    root: str,
    epoch: int,
    snapshots: Sequence[ShardSnapshot],
    extra: Mapping[str, Any] | None = None,
    keep: int = 3,
) -> str:
    """Write an aligned cut's snapshots as checkpoint ``epoch`` and make it CURRENT.

    ``extra`` (source positions, rule, catalog and model versions) goes into the checkpoint's
    manifest. Returns the checkpoint folder's URI. The previous CURRENT stays valid until the
    last step, the atomic replacement of CURRENT."""
    entries = [write_shard(s, root, epoch, i) for i, s in enumerate(snapshots)]
    return commit_checkpoint(root, epoch, entries, extra, keep)


def write_shard(snapshot: ShardSnapshot, root: str, epoch: int, index: int) -> dict[str, Any]:
    """Write shard ``index``'s snapshot into checkpoint ``epoch`` under ``root``; returns its
    entry for ``commit_checkpoint``. Shards call this themselves, in parallel, so a checkpoint's
    state never travels through the coordinator."""
    folder = f"shard-{index}"
    manifest = _write_snapshot(snapshot, f"{root.rstrip('/')}/{_name(epoch)}/{folder}")
    return {
        "folder": folder,
        "shard_id": snapshot.shard_id,
        "key_range": list(snapshot.key_range),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }


class SnapshotWriter:
    """Writes one shard's snapshots for checkpoints, one at a time, in a background thread (an
    asynchronous checkpoint: the shard takes a detached snapshot at the barrier, in tens of
    milliseconds, and goes on applying while the copy is serialized, digested and written;
    Arrow's IPC writer, hashlib and file writes release the GIL) or, with ``background``
    False, at the first ``result`` (deterministic: a Ray-free engine under test).

    Only the latest snapshot begun is tracked: ``begin`` and ``abandon`` first wait for a
    write still running, so two writes never run at once and an abandoned one (a recovery
    restores this shard while it writes) cannot land in a folder a later attempt of the same
    epoch writes.
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._epoch: int | None = None
        self._future: Future[dict[str, Any]] | None = None
        self._deferred: Callable[[], dict[str, Any]] | None = None

    def begin(self, snapshot: ShardSnapshot, root: str, epoch: int, index: int) -> None:
        """Start writing ``snapshot`` (detached from the shard's live state) as shard
        ``index`` of checkpoint ``epoch`` under ``root``."""
        self.abandon()
        self._epoch = epoch

        def write() -> dict[str, Any]:
            return write_shard(snapshot, root, epoch, index)

        if not self.background:
            self._deferred = write
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="kairos-snapshot")
        self._future = self._executor.submit(write)

    def result(self, epoch: int, wait: bool = False) -> dict[str, Any] | None:
        """The manifest entry of checkpoint ``epoch``'s snapshot once written; None while it
        is being written (and ``wait`` is False). Raises what the write raised (storage
        failing), or StateError when no write of ``epoch`` was begun (this shard restarted
        since: the checkpoint cannot complete)."""
        if self._epoch != epoch:
            raise StateError(f"no snapshot of checkpoint {epoch} is being written here")
        if self._deferred is not None:
            write, self._deferred = self._deferred, None
            self._future = Future()
            try:
                self._future.set_result(write())
            except BaseException as exc:  # kept for the caller, as a thread's would be
                self._future.set_exception(exc)
        assert self._future is not None
        if not wait and not self._future.done():
            return None
        return self._future.result()

    def abandon(self) -> None:
        """Forget the snapshot being written, after its write (if running) has ended."""
        if self._future is not None:
            wait([self._future])
        self._epoch, self._future, self._deferred = None, None, None


def _name(epoch: int) -> str:
    return f"chk-{epoch:012d}"


def commit_checkpoint(
    root: str,
    epoch: int,
    entries: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
    keep: int = 3,
) -> str:
    """Complete checkpoint ``epoch`` whose shards were written (``write_shard``): its
    manifest, then CURRENT replaced atomically; the last ``keep`` checkpoints are kept."""
    fs, path = resolve(root)
    name = _name(epoch)
    document = {**dict(extra or {}), "epoch": epoch, "shards": [dict(e) for e in entries]}
    crash_point("checkpoint:before_manifest")
    _write_bytes(fs, f"{path}/{name}/{CHECKPOINT}", json.dumps(document).encode())
    crash_point("checkpoint:before_current")
    _replace(fs, f"{path}/{CURRENT}", name.encode())
    _forget_old(fs, path, keep, current=name)
    return f"{root.rstrip('/')}/{name}"


def _replace(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``path`` so a reader sees the old or the new content, never a part: a temporary
    file renamed over it locally (rename is atomic); one PUT on object storage (atomic too)."""
    if isinstance(fs, pafs.LocalFileSystem):
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        _write_bytes(fs, temporary, data)
        fs.move(temporary, path)
    else:
        _write_bytes(fs, path, data)


def _forget_old(fs: pafs.FileSystem, path: str, keep: int, current: str) -> None:
    """Keep the last ``keep`` complete checkpoints up to ``current``; delete older ones and
    the incomplete folders below ``current`` (attempts that failed, whose epochs are not
    used again)."""
    selector = pafs.FileSelector(path, allow_not_found=True)
    folders = sorted(
        info.base_name
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory
        and info.base_name.startswith("chk-")
        and info.base_name <= current
    )
    manifests = fs.get_file_info([f"{path}/{name}/{CHECKPOINT}" for name in folders])
    complete = [
        name
        for name, info in zip(folders, manifests, strict=True)
        if info.type == pafs.FileType.File
    ]
    kept = set(complete[-keep:]) | {current}
    for name in folders:
        if name not in kept:
            fs.delete_dir(f"{path}/{name}")


def checkpoints(root: str) -> list[dict[str, Any]]:
    """The manifests of the complete checkpoints kept under ``root``, oldest first, up to
    CURRENT (a later, unfinished one is not complete). The oldest one's source position is as
    far back as a recovery may need the source."""
    fs, path = resolve(root)
    try:
        current = _read_bytes(fs, f"{path}/{CURRENT}").decode().strip()
    except (FileNotFoundError, OSError):
        return []
    selector = pafs.FileSelector(path, allow_not_found=True)
    names = sorted(
        info.base_name
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory and info.base_name.startswith("chk-")
    )
    out = []
    for name in names:
        if name > current:
            continue
        try:
            out.append(json.loads(_read_bytes(fs, f"{path}/{name}/{CHECKPOINT}")))
        except (FileNotFoundError, OSError, ValueError):
            continue  # an unfinished checkpoint
    return out


def read_checkpoint(root: str) -> tuple[dict[str, Any], list[ShardSnapshot]]:
    """The CURRENT checkpoint under ``root``: its manifest and its snapshots, every file
    checked against its digest. StateError when there is none or it is damaged."""
    fs, path = resolve(root)
    try:
        name = _read_bytes(fs, f"{path}/{CURRENT}").decode().strip()
        document = json.loads(_read_bytes(fs, f"{path}/{name}/{CHECKPOINT}"))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise StateError(f"{root}: no complete checkpoint ({CURRENT} missing or broken)") from exc
    snapshots = []
    for shard in document["shards"]:
        folder = f"{path}/{name}/{shard['folder']}"
        try:
            manifest = _read_bytes(fs, f"{folder}/{MANIFEST}")
        except (FileNotFoundError, OSError) as exc:
            raise StateError(f"{root}: {name}/{shard['folder']} has no manifest") from exc
        if hashlib.sha256(manifest).hexdigest() != shard["manifest_sha256"]:
            raise StateError(f"{root}: {name}/{shard['folder']} does not match the checkpoint")
        snapshots.append(read_snapshot(f"{root.rstrip('/')}/{name}/{shard['folder']}"))
    return document, snapshots


# -- rescaling ------------------------------------------------------------------------------------
def rescale(
    snapshots: Sequence[ShardSnapshot], ranges: Sequence[tuple[int, int]], key_groups: int
) -> list[ShardSnapshot]:
    """Snapshots for shards owning ``ranges`` of key groups, from snapshots of any other split.

    Golden records, pending events and recent rows go to the shard owning their customer's key
    group. Seen event ids carry no customer: every new shard gets all of them (event ids are
    unique per event, so the extra ids never match another customer's event); so do the ids of
    inbound decisions awaiting their log record. Each new shard
    starts at the lowest watermark of the old ones (nothing is released early) and with its
    counters at zero (the old totals are the sum of the old snapshots' counters).
    """
    covered = sorted((int(a), int(b)) for s in snapshots for a, b in [s.key_range])
    if (
        covered[0][0] != 0
        or covered[-1][1] != key_groups
        or any(prev[1] != nxt[0] for prev, nxt in itertools.pairwise(covered))
    ):
        raise StateError(f"the snapshots cover key groups {covered}, not 0..{key_groups}")
    merged = {name: pa.concat_tables([s.tables[name] for s in snapshots]) for name in TABLES}
    customers = _unify_pool(snapshots)
    watermark = min(s.watermark_ms for s in snapshots)
    inbound = tuple(sorted({i for s in snapshots for i in s.inbound}))
    versions = {s.reference_version for s in snapshots}
    if len(versions) > 1:
        raise StateError(f"the snapshots ran with different reference data: {sorted(versions)}")
    out = []
    for shard_id, (start, stop) in enumerate(ranges):

        def mine(table: pa.Table, start: int = start, stop: int = stop) -> pa.Table:
            keys = np.asarray(table.column("customer_key").to_numpy(), dtype=np.uint64)
            groups = key_groups_of(keys, key_groups)
            return table.filter(pa.array((groups >= start) & (groups < stop)))

        out.append(
            ShardSnapshot(
                shard_id=shard_id,
                key_range=(start, stop),
                watermark_ms=watermark,
                counters={},
                customers=mine(customers),
                pending=mine(merged["pending"]),
                seen=merged["seen"],
                recent_triggers=mine(merged["recent_triggers"]),
                recent_decisions=mine(merged["recent_decisions"]),
                inbound=inbound,
                reference_version=versions.pop() if len(versions) == 1 else "",
            )
        )
    return out


def _unify_pool(snapshots: Sequence[ShardSnapshot]) -> pa.Table:
    """The customers of every snapshot in one table. Each shard interns its text columns (time
    zone, device model) in its own string pool: ids are translated into one merged pool."""
    pool = StringPool()
    parts = []
    for snapshot in snapshots:
        table = snapshot.customers
        meta = table.schema.metadata or {}
        values = meta.get(b"kairos.strings", b"UTC\x1f").decode().split("\x1f")
        for column in STRING_COLUMNS:
            ids = np.asarray(table.column(column).to_numpy())
            strings = np.array(values, dtype=object)[ids]
            table = table.set_column(
                table.column_names.index(column),
                column,
                pa.array(pool.ids_of(list(strings)), type=table.schema.field(column).type),
            )
        parts.append(table.replace_schema_metadata(None))
    merged = pa.concat_tables(parts)
    return merged.replace_schema_metadata({b"kairos.strings": "\x1f".join(pool.values).encode()})


def document_digest(document: Mapping[str, Any] | None) -> str | None:
    """A stable digest of a configuration document (rules, offers)."""
    if document is None:
        return None
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def config_entry(running: Mapping[str, Any] | None, started: str | None) -> dict[str, Any]:
    """A checkpoint's record of one configuration document: the one running (it may have been
    replaced at run time, ``PUT /v1/rules``) and the digest of the one the run started from."""
    return {"document": None if running is None else dict(running), "started_from": started}


def restored_config(
    manifest: Mapping[str, Any], name: str, started: str | None
) -> Mapping[str, Any] | None:
    """The running document ``name`` a checkpoint recorded, if the run that took it started
    from the same document as this one (``started``, a ``document_digest``); None if not: the
    configuration a process starts with was edited since, and the edit wins over what the
    earlier run changed at run time."""
    entry = manifest.get("config", {}).get(name)
    if not entry or entry.get("started_from") != started:
        return None
    document = entry.get("document")
    return None if document is None else dict(document)
