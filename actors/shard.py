"""ShardActor: a thin Ray wrapper around engine.shard.ShardLogic."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.metrics import metrics
from actors.runtime import peak_rss_mb, tune_allocator
from engine import preload
from engine.checkpoint import SnapshotWriter
from engine.config import EngineSettings
from engine.decision.catalog import parse_catalog
from engine.decision.scorer import OfferScorer, RemoteScorer, ScorerUnavailableError
from engine.reference import EMPTY, ReferenceData
from engine.rules.spec import parse_rules
from engine.shard import ApplyResult, ShardLogic
from engine.snapshot import ShardSnapshot


def _stats(result: ApplyResult, started: float, incarnation: str) -> dict[str, Any]:
    return {
        "incarnation": incarnation,
        "received": result.received,
        "applied": result.applied,
        "duplicates": result.duplicates,
        "pending": result.pending,
        "triggers": result.triggers.num_rows,
        "triggers_by_rule": result.triggers_by_rule,
        "decisions": result.decisions.num_rows,
        "decide_ms": result.decide_ms,
        "decide_ms_parts": result.decide_ms_parts,
        "apply_ms": (time.perf_counter() - started) * 1000,
        #: dead letters of failed steps (usually empty): the router writes them
        "failed": result.failed,
    }


@ray.remote
class ShardActor:
    """Owns key groups [start, stop): their golden records, event buffer and rule state."""

    def __init__(
        self,
        shard_id: int,
        settings: EngineSettings,
        rules_document: dict[str, Any],
        key_range: tuple[int, int],
        catalog_document: dict[str, Any] | None = None,
        scorer: OfferScorer | None = None,
        reference: ReferenceData = EMPTY,
    ) -> None:
        tune_allocator()  # each micro-batch allocates and frees tens of MB
        rules = parse_rules(rules_document, "rules")
        catalog = parse_catalog(catalog_document, "offers") if catalog_document else None
        self.logic = ShardLogic(shard_id, settings, rules, key_range, catalog, scorer)
        self.logic.set_reference(reference)
        self._catalog, self._scorer = catalog, scorer
        self.writer = SnapshotWriter()
        #: new at every start (Ray restarts a dead shard empty): the router notices a restart
        #: that came between two calls by this changing, and the engine recovers
        self.incarnation = uuid.uuid4().hex

    def reassign(self, shard_id: int, key_range: tuple[int, int]) -> None:
        """Become shard ``shard_id`` over ``key_range``, empty (a spare taking over a dead
        shard; ``restore`` and the current rules and catalog follow)."""
        self.writer.abandon()
        logic = self.logic
        catalog = self._catalog if logic.decider is not None else None
        self.logic = ShardLogic(
            shard_id, logic.settings, logic.rules, key_range, catalog, self._scorer
        )
        self.logic.set_reference(logic.reference)

    def connect_scorer(self) -> str | None:
        """Connect the scorer ahead of the first decision; None when ready (or no scorer),
        else why not (the shard still works: decisions fall back until the model answers)."""
        decider = self.logic.decider
        if decider is None or not isinstance(decider.scorer, RemoteScorer):
            return None
        try:
            decider.scorer.connect()
            decider.warm_up()
        except ScorerUnavailableError as exc:
            return str(exc)
        return None

    @ray.method(num_returns=3)
    def apply(
        self, batch: pa.RecordBatch | list[pa.RecordBatch] | None, watermark_ms: int
    ) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
        """Apply one micro-batch (a routed batch or a list of them, in arrival order); returns
        (triggers, decisions, stats) as three objects."""
        started = time.perf_counter()
        result = self.logic.apply(batch, watermark_ms)
        self._observe(result.decisions)
        return result.triggers, result.decisions, _stats(result, started, self.incarnation)

    def _observe(self, decisions: pa.Table) -> None:
        m = metrics()
        m.pending.set(self.logic.buffer.pending_rows, tags={"shard": str(self.logic.shard_id)})
        if decisions.num_rows == 0:
            return
        pairs = pc.binary_join_element_wise(
            decisions.column("action"), decisions.column("reason"), "|"
        )
        counts = pc.value_counts(pairs.combine_chunks())
        by = {
            tuple(str(v).split("|", 1)): int(n)
            for v, n in zip(
                counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
            )
        }
        m.count_pairs(m.decisions, by, ("offer", "reason"))

    def decide_inbound(
        self,
        customer_keys: np.ndarray,
        channels: list[str],
        ts_ms: np.ndarray,
        request_ids: np.ndarray,
        pages: list[str | None],
        logged: bool = False,
    ) -> pa.Table:
        """Inbound decisions (``POST /v1/decide``), a batch per call; see ShardLogic."""
        decisions = self.logic.decide_inbound(
            customer_keys, channels, ts_ms, request_ids, pages, logged=logged
        )
        self._observe(decisions)
        return decisions

    def record_inbound(self, decisions: pa.Table) -> pa.Table:
        """Inbound decisions read back from the ingest log; the rows new to the decision log
        (see ShardLogic)."""
        return self.logic.record_inbound(decisions)

    @ray.method(num_returns=3)
    def end_stream(self) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
        """The stream ended: apply every pending event; returns what ``apply`` returns."""
        started = time.perf_counter()
        result = self.logic.end_stream()
        self._observe(result.decisions)
        return result.triggers, result.decisions, _stats(result, started, self.incarnation)

    def set_catalog(self, catalog_document: dict[str, Any] | None) -> int:
        """Replace the offer catalog (validated by the caller; again here); contacts are kept."""
        catalog = parse_catalog(catalog_document, "offers") if catalog_document else None
        self.logic.set_catalog(catalog)
        return len(catalog.offers) if catalog else 0

    def set_rules(self, rules_document: dict[str, Any]) -> int:
        """Replace the rules (already validated by the caller; validated again here)."""
        self.logic.set_rules(parse_rules(rules_document, "rules"))
        return len(self.logic.rules)

    def set_reference(self, reference: ReferenceData) -> str:
        """Replace the reference tables (validated by the caller); returns their version."""
        self.logic.set_reference(reference)
        return reference.version

    def customer(self, customer_key: int) -> dict[str, Any] | None:
        return self.logic.customer(customer_key)

    def loaded(self, timeout_s: float = 30.0) -> bool:
        """Wait until the code the rules and tables need is loaded (``engine.preload``)."""
        return preload.loaded(timeout_s)

    def stats(self) -> dict[str, Any]:
        store = self.logic.store
        decider = self.logic.decider
        return {
            "incarnation": self.incarnation,
            "node": ray.get_runtime_context().get_node_id(),
            "peak_rss_mb": peak_rss_mb(),
            "shard": self.logic.shard_id,
            "customers": store.size,
            "state_bytes": store.nbytes(),
            "state_bytes_per_customer": store.live_nbytes_per_customer(),
            "pending": self.logic.buffer.pending_rows,
            "watermark_ms": self.logic.watermark_ms,
            "model_unavailable_batches": decider.unavailable if decider else 0,
            "model_unavailable_last": decider.last_unavailable if decider else None,
            **(decider.scoring if decider else {}),
            **self.logic.counters,
        }

    def snapshot(self) -> ShardSnapshot:
        """Everything this shard holds, as a value (the caller drained its calls first)."""
        return self.logic.snapshot()

    def begin_snapshot(self, root: str, epoch: int) -> None:
        """The checkpoint barrier: take a detached snapshot now (the caller drained its calls)
        and write it into checkpoint ``epoch`` under ``root`` in the background, while the
        next micro-batches are applied (``snapshot_written`` tells when it is on storage)."""
        self.writer.begin(self.logic.snapshot(detached=True), root, epoch, self.logic.shard_id)

    def snapshot_written(self, epoch: int, wait: bool = False) -> dict[str, Any] | None:
        """Checkpoint ``epoch``'s entry for its manifest once this shard's snapshot is written,
        None while it is being written; raises what the write raised."""
        return self.writer.result(epoch, wait)

    def restore(self, snapshot: ShardSnapshot) -> int:
        """Take ``snapshot``'s state (for this shard's key groups); returns its customers."""
        self.writer.abandon()  # a checkpoint being written is not completed after a restore
        self.logic.restore(snapshot)
        return self.logic.customers
