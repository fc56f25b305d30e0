"""GatewayActor: one named actor that runs the engine behind the HTTP API (a thin wrapper).

The API replicas (``deploy.api``) decode and coerce request bodies themselves, in parallel, and
hand the gateway Arrow batches. The gateway is the single ingest point (one sequence, one
watermark): its ``engine.gateway.GatewayLogic`` validates, dead-letters and feeds the Router,
which cuts micro-batches *across* requests. A clock thread ticks the logic (deadlines, idle
release, retraining). Rules and catalog swaps go through the Supervisor.

Golden-record reads and inbound decisions do not pass through the gateway: the API replicas
call the owning shard directly (every process agrees on the shard map).

The ranker and the retrainer come in as callables from ``deploy``: actors never import
``models``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from actors.metrics import metrics
from actors.scorer import ServeScorer
from actors.supervisor import Supervisor
from engine.config import EngineSettings
from engine.decision.catalog import Catalog, load_catalog, parse_catalog
from engine.errors import CatalogError, RuleError
from engine.events.deadletter import DeadLetter
from engine.gateway import GatewayLogic, Retrainer
from engine.rules.spec import RuleSet, load_rules, parse_rules

log = logging.getLogger(__name__)

#: deploys the ranker for (rules, catalog); returns the model version it serves
StartRanker = Callable[[RuleSet, Catalog], str]
#: a retrainer for the running engine (its supervisor) under a catalog
MakeRetrainer = Callable[[Supervisor, Catalog], Retrainer]


@dataclass(frozen=True)
class GatewayConfig:
    """What one gateway runs: its engine settings, files, names and where data goes."""

    settings: EngineSettings
    data_dir: str
    rules_file: str
    offers_file: str | None
    name: str = "kairos"
    shard_cpus: float = 0.25
    idle_release_ms: float = 2_000.0

    @property
    def gateway_name(self) -> str:
        return f"{self.name}-gateway"

    def shard_name(self, i: int) -> str:
        return f"{self.name}-shard-{i}"

    @property
    def decision_sink_name(self) -> str:
        return f"{self.name}-decisions"


@ray.remote(max_concurrency=32)  # type: ignore[call-overload]
class GatewayActor:
    """Runs one engine: Supervisor (shards, router, sinks), its clock thread, its retrainer."""

    def __init__(
        self,
        config: GatewayConfig,
        start_ranker: StartRanker | None = None,
        make_retrainer: MakeRetrainer | None = None,
    ) -> None:
        self.config = config
        self.settings = config.settings
        root = Path(config.data_dir).resolve()
        rules = load_rules(config.rules_file)
        catalog = load_catalog(config.offers_file) if config.offers_file else None
        self.supervisor = Supervisor(
            self.settings,
            rules,
            trigger_uri=str(root / "triggers"),
            shard_cpus=config.shard_cpus,
            namespace_prefix=config.name,
            dead_letter_uri=str(root / "dead-letters"),
            catalog=catalog,
            scorer=ServeScorer() if catalog else None,
            decision_uri=str(root / "decisions") if catalog else None,
            response_uri=str(root / "responses") if catalog else None,
            observer=self._observe,
            idle_release_ms=config.idle_release_ms,
        )
        self.model_version = None
        if catalog is not None and start_ranker is not None:
            self.model_version = start_ranker(rules, catalog)
            for problem in self.supervisor.connect_scorers():
                log.warning("a shard could not reach the ranker yet: %s", problem)
        retrainer = None
        if catalog is not None and make_retrainer is not None:
            retrainer = make_retrainer(self.supervisor, catalog)
        self.logic = GatewayLogic(self.supervisor.router, retrainer)
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._clock = threading.Thread(target=self._tick, name="gateway-clock", daemon=True)
        self._clock.start()

    # -- wiring ------------------------------------------------------------------------------
    def routing(self) -> dict[str, Any]:
        """What an API replica needs to reach shards and sinks directly."""
        return {
            "settings": self.settings,
            "shards": [self.config.shard_name(i) for i in range(self.settings.shards)],
            "decision_sink": self.config.decision_sink_name
            if self.supervisor.decision_sink is not None
            else None,
            "namespace": ray.get_runtime_context().namespace,
        }

    def ready(self) -> dict[str, Any]:
        """Every shard and sink answers (raises if one does not)."""
        stats = self.supervisor.ready()
        return {"shards": len(stats), "customers": sum(s["customers"] for s in stats)}

    # -- events --------------------------------------------------------------------------------
    def submit(
        self, batch: pa.RecordBatch, positions: list[int], letters: list[DeadLetter]
    ) -> dict[str, Any]:
        """Ingest one request's events; ``letters`` are rows the replica could not coerce.
        Returns the counts and every rejected event's error, with its index in the request."""
        with self.lock:
            done = self.logic.submit(batch, positions, letters)
        m = metrics()
        m.count(m.ingested, done.accepted_by_kind, "kind")
        m.count(m.rejected, done.rejected_by_kind, "kind")
        return done.report

    def _observe(self, shard: int, stats: dict[str, Any], latency_ms: float) -> None:
        m = metrics()
        m.micro_batch_ms.observe(latency_ms)
        m.count(m.triggers, stats["triggers_by_rule"], "rule")
        failed = stats.get("failed")
        if failed is not None and failed.num_rows:
            kinds = failed.column("kind").to_pylist()
            m.count(m.failed, {k: kinds.count(k) for k in set(kinds)}, "kind")

    def _tick(self) -> None:
        """Deadlines, idle release and retraining, on the gateway's own clock."""
        period = max(self.settings.micro_batch_deadline_ms / 2000, 0.002)
        while not self._stop.wait(period):
            try:
                with self.lock:
                    depths = self.logic.tick()
                for shard, depth in enumerate(depths):
                    metrics().queue_depth.set(depth, tags={"shard": str(shard)})
                if self.logic.retrain_due():
                    with self.lock:
                        result = self.logic.retrain()
                    if self.logic.retrain_error:
                        log.error("retraining failed; the running model stays: %s",
                                  self.logic.retrain_error)  # fmt: skip
                    elif result is not None:
                        log.info("retrained: %s", result.reason)
            except Exception:  # the clock must keep going; the error is logged
                log.exception("gateway clock tick failed")

    # -- run-time configuration ---------------------------------------------------------------
    def rules(self) -> dict[str, Any]:
        return dict(self.supervisor.rules.document)

    def offers(self) -> dict[str, Any] | None:
        catalog = self.supervisor.catalog
        return dict(catalog.document) if catalog else None

    def set_rules(self, document: Any) -> dict[str, Any]:
        """Validate and swap the rules; an invalid document changes nothing.

        Returns {"ok": True, "rules": n} or {"ok": False, "errors": [...]}.
        """
        try:
            parse_rules(document, "rules")  # before taking the lock: a bad one costs nothing
            with self.lock:
                rules = self.supervisor.set_rules(document, "rules")
        except RuleError as exc:
            return {"ok": False, "errors": exc.problems}
        return {"ok": True, "rules": len(rules.rules)}

    def set_offers(self, document: Any) -> dict[str, Any]:
        if self.supervisor.catalog is None:
            return {"ok": False, "errors": ["decisions are off: the service runs without offers"]}
        try:
            parse_catalog(document, "offers")
            with self.lock:
                catalog = self.supervisor.set_catalog(document, "offers")
                if self.logic.retrainer is not None:  # train for the offers now served
                    self.logic.retrainer.set_catalog(catalog)
        except CatalogError as exc:
            return {"ok": False, "errors": exc.problems}
        return {"ok": True, "offers": len(catalog.offers)}

    # -- reading -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Router counters and shard counters; ``pending`` events wait for the watermark."""
        with self.lock:
            router = self.supervisor.router
            out = router.stats.as_dict()
            out["queue_depth"] = router.queue_depth
            out["watermark_ms"] = self.supervisor.ingestor.watermark_ms
        shards = self.supervisor.shard_stats()
        out["pending"] = sum(s["pending"] for s in shards)
        out["customers"] = sum(s["customers"] for s in shards)
        out["shard_decisions"] = sum(s["decisions"] for s in shards)
        out["retrain_error"] = self.logic.retrain_error
        if self.logic.retrainer is not None:
            out["retrained"] = len(self.logic.retrained)
        return out

    def drain(self) -> dict[str, Any]:
        """Apply everything received so far (closing the watermark) and write the logs."""
        with self.lock:
            self.supervisor.router.release_watermark()
            self.supervisor.router.write_logs()
        return self.stats()

    def save(self) -> None:
        """Write what the sinks hold, applying nothing: called while Serve stops, when the
        ranker may be gone and a micro-batch may hold the lock waiting for it. The sink actors
        write regardless; the in-process ones when the lock comes within a second."""
        router = self.supervisor.router
        sinks = [a for a in (router.decision_sink, router.sink) if a is not None]
        ray.get([a.write_buffered.remote() for a in sinks])
        if self.lock.acquire(timeout=1.0):
            try:
                router.write_logs()
            finally:
                self.lock.release()

    def shutdown(self) -> None:
        """Stop: apply every event received, write every log, stop the engine's actors."""
        self._stop.set()
        with self.lock:
            self.supervisor.router.release_watermark()  # apply everything, even within lateness
            self.supervisor.router.write_logs()
            self.supervisor.shutdown()
