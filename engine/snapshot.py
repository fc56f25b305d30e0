"""ShardSnapshot: everything one shard holds, as Arrow tables plus a little metadata.

A value, not a file: ``ShardLogic.snapshot()`` makes one and ``ShardLogic.restore()`` takes
one; ``engine.checkpoint`` writes and reads them through pyarrow.fs. Keeping the value apart
from the I/O lets a checkpoint coordinator ship snapshots through Ray's object store, digest
them, or write them anywhere, without the shard knowing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from engine.errors import StateError

FORMAT_VERSION = 2

#: the tables of a snapshot, in the order they are written
TABLES = ("customers", "pending", "seen", "recent_triggers", "recent_decisions")


@dataclass(frozen=True)
class ShardSnapshot:
    """One shard's state at a cut of the stream.

    ``customers`` holds the golden records with rule and decision state (``CustomerStore``),
    ``pending`` the events waiting for the watermark, ``seen`` the event ids inside the dedupe
    window, ``recent_triggers`` / ``recent_decisions`` the windows golden-record reads show.
    """

    shard_id: int
    key_range: tuple[int, int]
    watermark_ms: int
    counters: Mapping[str, int]
    customers: pa.Table
    pending: pa.Table
    seen: pa.Table
    recent_triggers: pa.Table
    recent_decisions: pa.Table
    #: ids of inbound decisions applied to the contact state whose log record is still to be
    #: read (``ShardLogic.record_inbound`` skips them); few, and carried whole on a rescale
    inbound: tuple[int, ...] = ()
    #: the version (digest) of the reference tables the shard ran with (``engine.reference``);
    #: the checkpoint's manifest holds the tables themselves
    reference_version: str = ""
    format: int = field(default=FORMAT_VERSION)

    @property
    def tables(self) -> dict[str, pa.Table]:
        return {name: getattr(self, name) for name in TABLES}

    @property
    def metadata(self) -> dict[str, Any]:
        """The scalar part, as JSON-ready values (a checkpoint's manifest holds it)."""
        return {
            "format": self.format,
            "shard_id": self.shard_id,
            "key_range": list(self.key_range),
            "watermark_ms": self.watermark_ms,
            "counters": dict(self.counters),
            "customers": self.customers.num_rows,
            "inbound": list(self.inbound),
            "reference_version": self.reference_version,
        }

    @classmethod
    def from_parts(
        cls, metadata: Mapping[str, Any], tables: Mapping[str, pa.Table]
    ) -> ShardSnapshot:
        """The inverse of (``metadata``, ``tables``); refuses another format or missing parts."""
        if metadata.get("format") != FORMAT_VERSION:
            raise StateError(
                f"snapshot format {metadata.get('format')} is not {FORMAT_VERSION} "
                "(written by another version of Kairos)"
            )
        missing = [name for name in TABLES if name not in tables]
        if missing:
            raise StateError(f"snapshot lacks the table(s) {missing}")
        start, stop = metadata["key_range"]
        return cls(
            shard_id=int(metadata["shard_id"]),
            key_range=(int(start), int(stop)),
            watermark_ms=int(metadata["watermark_ms"]),
            counters={str(k): int(v) for k, v in metadata.get("counters", {}).items()},
            inbound=tuple(int(i) for i in metadata.get("inbound", ())),
            reference_version=str(metadata.get("reference_version", "")),
            **{name: tables[name] for name in TABLES},
        )

    def check_owner(self, key_range: tuple[int, int]) -> None:
        """Refuse to restore onto a shard that owns other key groups."""
        if tuple(self.key_range) != tuple(key_range):
            raise StateError(
                f"snapshot holds key groups {list(self.key_range)}, the shard owns "
                f"{list(key_range)}"
            )
