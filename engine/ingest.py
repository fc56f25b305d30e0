"""Ingest: raw batches in, routed batches out (validated, pseudonymized, sequenced, on time).

The ingestor is the single place that sees the whole stream in arrival order. It gives every
event a sequence number and decides lateness by the running maximum of event time, so the
same stream yields the same routed events whatever the batching and the number of shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.clock import ms_to_datetime
from engine.config import EngineSettings
from engine.events.deadletter import DeadLetter
from engine.events.schema import (
    PAYLOAD_FIELDS,
    ROUTED_SCHEMA,
    TS_TYPE,
    empty_batch,
)
from engine.events.validation import conform, validate
from engine.governance.pseudonym import Pseudonymizer
from engine.partition import ShardMap, key_groups_of

#: the watermark before any event: nothing is late
NO_WATERMARK = np.iinfo(np.int64).min // 2


@dataclass
class IngestResult:
    """What one raw batch became: a routed batch per owning shard, and dead letters."""

    parts: dict[int, pa.RecordBatch] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    accepted: int = 0

    @property
    def routed(self) -> pa.Table:
        """Every accepted event in one table (shard by shard; columns absent in a part are
        null)."""
        if not self.parts:
            return pa.Table.from_batches([empty_batch()])
        tables = [pa.Table.from_batches([p]) for p in self.parts.values()]
        return pa.concat_tables(tables, promote_options="default")


#: what stands in for the identifier of an event that comes with its customer key
_KEYED = "~"


def keyed(batch: pa.RecordBatch, pseudonymizer: Pseudonymizer) -> pa.RecordBatch:
    """``batch`` (valid events) with its identifiers replaced by their customer keys: what an
    API replica writes to the ingest log, so the log holds no raw identifier (``ingest``
    takes it as it would the identifiers)."""
    keys = pseudonymizer.keys_of(batch.column("customer_id"))
    out = batch.drop_columns(["customer_id"])
    return out.append_column("customer_key", pa.array(keys, type=pa.uint64()))


def _split_keys(batch: pa.RecordBatch | pa.Table) -> tuple[pa.RecordBatch | pa.Table, Any]:
    """(the batch with identifiers for validation, its ``customer_key`` column or None).

    A keyed event's identifier is a constant placeholder (dictionary-encoded: no copy per
    event); events with both (a log stretch from before keys, concatenated) keep theirs."""
    if "customer_key" not in batch.schema.names:
        return batch, None
    given = batch.column("customer_key")
    if isinstance(given, pa.ChunkedArray):
        given = given.combine_chunks()
    rest = batch.drop_columns(["customer_key"])
    n = rest.num_rows
    placeholder = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(n, dtype=np.int32)), pa.array([_KEYED])
    )
    if "customer_id" not in rest.schema.names:
        return rest.append_column("customer_id", placeholder), given
    ids = rest.column("customer_id")
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    filled = pc.if_else(given.is_valid(), pa.scalar(_KEYED), ids)
    column = rest.schema.get_field_index("customer_id")
    return rest.set_column(column, "customer_id", filled), given


class Ingestor:
    """Validate, pseudonymize, assign key groups and sequence numbers, dead-letter late events."""

    def __init__(
        self, settings: EngineSettings, pseudonymizer: Pseudonymizer | None = None
    ) -> None:
        self.settings = settings
        #: wire kind -> ids of the rules that listen to it, named in a late event's letter
        self.listeners: dict[str, tuple[str, ...]] = {}
        self.pseudonymizer = pseudonymizer or Pseudonymizer(settings.pseudonym_key)
        self.shard_map = ShardMap(settings.key_groups, settings.shards)
        self._owner = self.shard_map.owner_table()
        self._next_seq = 0
        self._max_ts = NO_WATERMARK
        #: raised by ``close_idle``: nothing older may enter any more
        self._floor = NO_WATERMARK
        self.late_count = 0
        self.invalid_count = 0

    def position(self) -> dict[str, int]:
        """Where the stream stands (sequence, newest event time, idle floor, counts): what a
        checkpoint keeps so ingest resumes exactly where it was (``resume``)."""
        return {
            "next_seq": self._next_seq,
            "max_ts": self._max_ts,
            "floor": self._floor,
            "late_count": self.late_count,
            "invalid_count": self.invalid_count,
        }

    def resume(self, position: dict[str, int]) -> None:
        """Continue from a ``position`` (taken with any number of shards)."""
        self._next_seq = int(position["next_seq"])
        self._max_ts = int(position["max_ts"])
        self._floor = int(position["floor"])
        self.late_count = int(position.get("late_count", 0))
        self.invalid_count = int(position.get("invalid_count", 0))

    @property
    def watermark_ms(self) -> int:
        """Events older than this are late; events up to it may be released in order."""
        if self._max_ts == NO_WATERMARK:
            return NO_WATERMARK
        return max(self._max_ts - self.settings.allowed_lateness_ms, self._floor)

    def close_idle(self) -> int:
        """The stream went quiet: move the watermark up to the newest event time seen.

        A live source may stop for a while; without new events the watermark would stand
        still and the last events would wait for it forever. After this, everything seen so far
        can be applied, and an event older than the newest one is late (dead-lettered, not
        applied out of order). Returns the new watermark.
        """
        self._floor = max(self._floor, self._max_ts)
        return self.watermark_ms

    def ingest(
        self, batch: pa.RecordBatch | pa.Table, positions: np.ndarray | list[int] | None = None
    ) -> IngestResult:
        """Turn one raw batch into a routed batch; invalid and late events become dead letters.

        A batch may name customers by pseudonym already (a ``customer_key`` column, as the
        API replicas publish them to the ingest log, see ``keyed``) instead of identifiers."""
        batch, given = _split_keys(batch)
        checked = validate(conform(batch), positions)
        raw = checked.batch
        keep = checked.keep
        letters = list(checked.dead_letters)
        self.invalid_count += len(letters)
        ts = raw.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(keep)
        late, seen_before = self._late_mask(ts[rows])
        if late.any():
            letters.extend(
                self._late_letters(raw, checked.positions, ts, rows[late], seen_before[late])
            )
            letters.sort(key=lambda d: d.index)
            rows = rows[~late]
        if rows.size == 0:
            return IngestResult({}, letters)
        keys = self._keys(raw.column("customer_id"), given, rows)
        groups = key_groups_of(keys, self.settings.key_groups)
        seq = np.arange(self._next_seq, self._next_seq + rows.size, dtype=np.uint64)
        self._next_seq += rows.size
        # one copy of the payload, a batch per owning shard (arrival order within a shard):
        # each owns its buffers, so it travels to its shard without another copy
        owner = self._owner[groups]
        by_shard = np.argsort(owner.astype(np.uint16), kind="stable")  # radix sort
        take = rows[by_shard]
        header = {
            "event_id": raw.column("event_id").to_numpy()[take],
            "customer_key": keys[by_shard],
            "key_group": groups[by_shard].astype(np.uint16),
            "seq": seq[by_shard],
            "kind": checked.kinds[take].astype(np.int8),
            "ts": ts[take],
        }
        names = [name for name in PAYLOAD_FIELDS if raw.column(name).null_count < raw.num_rows]
        counts = np.bincount(owner, minlength=self.shard_map.shards)
        bounds = np.concatenate(([0], np.cumsum(counts)))
        parts: dict[int, pa.RecordBatch] = {}
        for shard in np.flatnonzero(counts).tolist():
            lo, hi = int(bounds[shard]), int(bounds[shard + 1])
            arrays = {name: pa.array(values[lo:hi]) for name, values in header.items()}
            arrays["ts"] = arrays["ts"].cast(TS_TYPE)
            indices = pa.array(take[lo:hi])
            for name in names:
                column = raw.column(name).take(indices)
                if column.null_count < len(column):  # an all-null column still costs
                    arrays[name] = column
            schema = pa.schema([ROUTED_SCHEMA.field(n) for n in arrays])
            parts[shard] = pa.RecordBatch.from_arrays(list(arrays.values()), schema=schema)
        return IngestResult(parts, letters, int(rows.size))

    def _keys(self, ids: pa.Array, given: pa.Array | None, rows: np.ndarray) -> np.ndarray:
        """The customer keys of ``rows``: given, or the pseudonyms of the identifiers."""
        if given is None:
            return self.pseudonymizer.keys_of(ids)[rows]
        keys = given.fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64)[rows]
        named = ~np.asarray(given.is_valid().to_numpy(zero_copy_only=False), dtype=bool)[rows]
        if named.any():  # identifiers beside keys (a stretch of the log from before keys)
            keys[named] = self.pseudonymizer.keys_of(ids.take(pa.array(rows[named])))
        return keys

    def _late_mask(self, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """late[i]: ts[i] is older than the max event time seen before it, less the lateness.

        Also returns that max per event, for the dead letters' reasons.
        """
        running = np.maximum.accumulate(np.concatenate(([self._max_ts], ts)))
        before = running[:-1]
        self._max_ts = int(running[-1])
        late = ts < np.maximum(before - self.settings.allowed_lateness_ms, self._floor)
        late &= before != NO_WATERMARK
        self.late_count += int(late.sum())
        return late, before

    def _late_letters(
        self,
        raw: pa.RecordBatch,
        positions: np.ndarray,
        ts: np.ndarray,
        late_rows: np.ndarray,
        seen_before: np.ndarray,
    ) -> list[DeadLetter]:
        ids = raw.column("event_id")
        kinds = raw.column("kind")
        lateness = self.settings.allowed_lateness_s
        out = []
        for i, seen in zip(late_rows.tolist(), seen_before.tolist(), strict=True):
            value = ms_to_datetime(int(ts[i])).isoformat()
            unseen = self.listeners.get(kinds[i].as_py(), ())
            missed = f"; rules that could not see it: {', '.join(unseen)}" if unseen else ""
            out.append(
                DeadLetter(
                    int(positions[i]),
                    f"late: event time {value} is more than {lateness:g}s older than the newest "
                    f"event already seen ({ms_to_datetime(seen).isoformat()}){missed}",
                    "ts",
                    value,
                    ids[i].as_py(),
                    kinds[i].as_py(),
                )
            )
        return out

    def listen(self, rule_kinds: Mapping[str, Sequence[str]]) -> None:
        """Which rules listen to which event kinds (rule id -> wire kinds), so a late event's
        dead letter names the rules that could not see it."""
        by_kind: dict[str, list[str]] = {}
        for rule_id, kinds in rule_kinds.items():
            for kind in kinds:
                by_kind.setdefault(kind, []).append(rule_id)
        self.listeners = {k: tuple(v) for k, v in by_kind.items()}

    def owner_of(self, customer_id: str) -> tuple[int, int]:
        """(customer key, owning shard) of an external customer identifier."""
        key = self.pseudonymizer.key_of(customer_id)
        group = key_groups_of(np.array([key], dtype=np.uint64), self.settings.key_groups)
        return key, int(self._owner[group[0]])
