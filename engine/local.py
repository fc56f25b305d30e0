"""The whole engine in one process, without Ray: ingest, split by shard, shard logic.

For tests, for trying rules on a file, and as the executable definition of what the Ray
deployment does: the same stream through LocalEngine and through the actors gives the same
triggers. With a ``checkpoint_root`` it is an ``engine.pipeline.Engine``: checkpoints go to
storage like the actors', and its outputs (triggers, decisions, dead letters) are kept per
epoch like the sinks' files, so ``recover`` drops what came after CURRENT.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from engine.checkpoint import (
    SnapshotWriter,
    checkpoints,
    commit_checkpoint,
    read_checkpoint,
    rescale,
)
from engine.config import EngineSettings
from engine.decision.catalog import Catalog
from engine.decision.log import DECISION_SCHEMA
from engine.decision.scorer import OfferScorer
from engine.errors import StateError
from engine.events.codec import rows_to_batch
from engine.events.deadletter import DeadLetter
from engine.ingest import Ingestor
from engine.reference import EMPTY, ReferenceData
from engine.rules.spec import RuleSet
from engine.shard import ApplyResult, ShardLogic
from engine.trigger import TRIGGER_SCHEMA


class LocalEngine:
    """Ingestor plus one ShardLogic per shard, driven synchronously."""

    def __init__(
        self,
        settings: EngineSettings,
        rules: RuleSet,
        catalog: Catalog | None = None,
        scorer: OfferScorer | None = None,
        checkpoint_root: str | None = None,
        reference: ReferenceData = EMPTY,
    ) -> None:
        self.settings = settings
        self.rules = rules
        self.reference = reference
        self.catalog = catalog
        self.scorer = scorer
        self.ingestor = Ingestor(settings)
        self.shards: list[ShardLogic] = []
        self.lose_state()
        #: where checkpoints go (None: ``checkpoint`` and ``recover`` are not available)
        self.checkpoint_root = checkpoint_root
        #: the outputs' lengths at each checkpoint: what ``recover`` keeps
        self._marks: dict[int, tuple[int, int, int, int]] = {}
        self.triggers: list[pa.Table] = []
        self.decisions: list[pa.Table] = []
        self.dead_letters: list[DeadLetter] = []
        #: dead letters of shard steps that failed (see ``ShardLogic._step``)
        self.failed: list[pa.Table] = []

    def lose_state(self) -> None:
        """Forget everything held in memory (ingest position, every shard), as a crash of the
        process would; outputs, like files, stay. Then ``recover`` restores from CURRENT."""
        self.ingestor = Ingestor(self.settings)
        self.ingestor.listen(self.rules.listening)
        #: a checkpoint begun and not finished: (epoch, outputs' lengths at it, manifest extra)
        self._in_flight: tuple[int, tuple[int, int, int, int], dict[str, Any]] | None = None
        self._writers: dict[int, SnapshotWriter] = {}
        self.shards = [
            ShardLogic(
                i,
                self.settings,
                self.rules,
                self.ingestor.shard_map.range_of(i),
                self.catalog,
                self.scorer,
            )
            for i in range(self.settings.shards)
        ]
        for shard in self.shards:
            shard.set_reference(self.reference)

    def submit(
        self, batch: pa.RecordBatch | pa.Table, positions: np.ndarray | None = None
    ) -> list[DeadLetter]:
        """Ingest one raw batch and apply it; returns its dead letters."""
        result = self.ingestor.ingest(batch, positions)
        self.dead_letters.extend(result.dead_letters)
        parts = result.parts
        watermark = self.ingestor.watermark_ms
        for shard_id, shard in enumerate(self.shards):
            self._collect(shard.apply(parts.get(shard_id), watermark))
        return result.dead_letters

    def submit_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[DeadLetter]:
        """Ingest wire-style rows (dicts); rows that cannot be coerced are dead-lettered too."""
        batch, positions, letters = rows_to_batch(rows)
        result = self.ingestor.ingest(batch, positions)
        self.dead_letters.extend(letters)
        self.dead_letters.extend(result.dead_letters)
        parts = result.parts
        for shard_id, shard in enumerate(self.shards):
            self._collect(shard.apply(parts.get(shard_id), self.ingestor.watermark_ms))
        return [*letters, *result.dead_letters]

    def reject(self, letters: list[DeadLetter]) -> None:
        """Dead-letter records that could not be read (``engine.pipeline.Engine``)."""
        self.dead_letters.extend(letters)

    def poll(self, source_idle: bool | None = None) -> None:
        """Nothing waits: every submit applies at once (``engine.pipeline.Engine``)."""

    # -- checkpoints (engine.pipeline.Engine) --------------------------------------------------
    def _root(self) -> str:
        if self.checkpoint_root is None:
            raise StateError("this LocalEngine has no checkpoint_root")
        return self.checkpoint_root

    def checkpoint(self, epoch: int, extra: Mapping[str, Any]) -> Mapping[str, Any]:
        """Checkpoint ``epoch``: every shard's snapshot and the ingest position, CURRENT
        replaced; the outputs so far are committed. Returns the oldest kept one's ``extra``."""
        self.begin_checkpoint(epoch, extra)
        done = self.finish_checkpoint(wait=True)
        assert done is not None
        return done

    def begin_checkpoint(self, epoch: int, extra: Mapping[str, Any]) -> None:
        """The barrier of checkpoint ``epoch``: every shard's snapshot taken now, detached
        from its state, and the outputs' lengths; written by ``finish_checkpoint``, after
        whatever is applied meanwhile (the asynchronous checkpoint of ``Supervisor``, written
        at a deterministic point)."""
        root = self._root()
        self._in_flight = (epoch, self._lengths(), {"position": self.ingestor.position(), **extra})
        for shard in self.shards:
            self._writers.setdefault(shard.shard_id, SnapshotWriter(background=False)).begin(
                shard.snapshot(detached=True), root, epoch, shard.shard_id
            )

    def finish_checkpoint(self, wait: bool = False) -> Mapping[str, Any] | None:
        """Write the snapshots of the checkpoint begun, its manifest and CURRENT; the outputs
        up to its barrier are committed. Returns the oldest kept checkpoint's ``extra``."""
        if self._in_flight is None:
            raise StateError("no checkpoint was begun")
        (epoch, lengths, document), self._in_flight = self._in_flight, None
        entries = [self._writers[shard.shard_id].result(epoch, wait) for shard in self.shards]
        commit_checkpoint(self._root(), epoch, entries, document)  # type: ignore[arg-type]
        self._marks[epoch] = lengths
        kept = checkpoints(self._root())
        return kept[0] if kept else {}

    def _lengths(self) -> tuple[int, int, int, int]:
        return len(self.triggers), len(self.decisions), len(self.dead_letters), len(self.failed)

    def recover(self) -> Mapping[str, Any] | None:
        """Restore every shard and the ingest position from CURRENT (rescaled if it was taken
        on another shard count) and drop the outputs made after it. None: no checkpoint."""
        self._in_flight = None  # a checkpoint begun is not completed
        for writer in self._writers.values():
            writer.abandon()
        try:
            document, snapshots = read_checkpoint(self._root())
        except StateError:
            if self.checkpoint_root is not None and not checkpoints(self.checkpoint_root):
                return None
            raise
        ranges = [shard.key_range for shard in self.shards]
        if [tuple(s.key_range) for s in snapshots] != ranges:
            snapshots = rescale(snapshots, ranges, self.settings.key_groups)
        self.ingestor.resume(document["position"])
        for shard, snapshot in zip(self.shards, snapshots, strict=True):
            shard.restore(snapshot)
        triggers, decisions, letters, failed = self._marks.get(int(document["epoch"]), (0,) * 4)
        del self.triggers[triggers:], self.decisions[decisions:]
        del self.dead_letters[letters:], self.failed[failed:]
        return document

    def release_watermark(self) -> int:
        """The input went quiet: close the watermark up to the newest event and apply what it
        releases (``Router.release_watermark`` on Ray); returns the new watermark."""
        watermark = self.ingestor.close_idle()
        for shard in self.shards:
            self._collect(shard.apply(None, watermark))
        return watermark

    def end_stream(self) -> None:
        """End of stream: apply everything still waiting for the watermark."""
        for shard in self.shards:
            self._collect(shard.end_stream())

    def set_rules(self, rules: RuleSet) -> None:
        self.rules = rules
        self.ingestor.listen(rules.listening)
        for shard in self.shards:
            shard.set_rules(rules)

    def set_reference(self, reference: ReferenceData) -> None:
        """Swap the reference tables on every shard (between steps)."""
        self.reference = reference
        for shard in self.shards:
            shard.set_reference(reference)

    def set_catalog(self, catalog: Catalog | None, scorer: OfferScorer | None = None) -> None:
        for shard in self.shards:
            shard.set_catalog(catalog, scorer)

    def decide_inbound(
        self,
        customer_id: str,
        channel: str,
        ts_ms: int,
        request_id: int,
        page: str | None = None,
        logged: bool = False,
    ) -> dict[str, Any]:
        """An inbound decision (``POST /v1/decide``) from the owning shard, logged like others
        (``logged``: it reaches the decision log through ``record_decisions``, as a service's
        comes back from the ingest log)."""
        key, owner = self.ingestor.owner_of(customer_id)
        shard = self.shards[owner]
        decided = shard.counters["decisions"]
        table = shard.decide_inbound(
            np.array([key], dtype=np.uint64), [channel], np.array([ts_ms]),
            np.array([request_id], dtype=np.uint64), [page], logged=logged,
        )  # fmt: skip
        if not logged and shard.counters["decisions"] > decided:  # not a retried request's
            self.decisions.append(table)
        return dict(table.to_pylist()[0])

    def record_decisions(self, decisions: pa.Table) -> None:
        """Inbound decisions read back from a log (``engine.pipeline.Engine``)."""
        for owner, part in self.ingestor.shard_map.split(decisions).items():
            new = self.shards[owner].record_inbound(part)
            if new.num_rows:
                self.decisions.append(new)

    def customer(self, customer_id: str) -> dict[str, Any] | None:
        key, owner = self.ingestor.owner_of(customer_id)
        return self.shards[owner].customer(key)

    def _collect(self, result: ApplyResult) -> None:
        if result.triggers.num_rows:
            self.triggers.append(result.triggers)
        if result.decisions.num_rows:
            self.decisions.append(result.decisions)
        if result.failed.num_rows:
            self.failed.append(result.failed)

    def decision_table(self) -> pa.Table:
        """Every decision so far, sorted by (event time, decision id)."""
        if not self.decisions:
            return DECISION_SCHEMA.empty_table()
        table = pa.concat_tables(self.decisions)
        return table.sort_by([("ts", "ascending"), ("decision_id", "ascending")])

    def trigger_table(self) -> pa.Table:
        """Every trigger so far, sorted by (event time, arrival, rule)."""
        if not self.triggers:
            return TRIGGER_SCHEMA.empty_table()
        table = pa.concat_tables(self.triggers)
        return table.sort_by([("ts", "ascending"), ("seq", "ascending"), ("rule_id", "ascending")])

    def run(self, batches: Iterable[pa.RecordBatch | pa.Table]) -> pa.Table:
        for batch in batches:
            self.submit(batch)
        self.end_stream()
        return self.trigger_table()
