"""The gateway: one named actor that runs the engine behind the HTTP API.

The API replicas (``deploy.service``) decode and coerce request bodies themselves, in
parallel, and hand the gateway Arrow batches. The gateway is the single ingest point (one
sequence, one watermark): it validates, dead-letters, and feeds its Router, which cuts
micro-batches *across* requests (a micro-batch closes on size or deadline) and makes one call
per shard per micro-batch, with bounded backpressure. A background thread closes micro-batches
whose deadline passed, releases the watermark when the stream goes quiet, and retrains the
ranker every N outcomes. Rules and catalog swaps go through the gateway's Supervisor.

Golden-record reads and inbound decisions do not pass through the gateway: the API replicas
call the owning shard directly (every process agrees on the shard map).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from pydantic import BaseModel, ConfigDict, Field

from actors.metrics import metrics
from actors.scorer import ServeScorer
from actors.supervisor import Supervisor
from engine.config import EngineSettings
from engine.decision.catalog import Catalog, parse_catalog
from engine.errors import EngineError, RuleError
from engine.events.deadletter import DeadLetter
from engine.events.schema import KIND_NAMES
from engine.rules.spec import load_rules, parse_rules
from models.deployment import RANKER_APP, RANKER_DEPLOYMENT

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).parent / "config"


class ServiceConfig(BaseModel):
    """How ``kairos serve`` (or ``serve run deploy/serve_config.yaml``) runs the engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("kairos", description="Prefix of the actor names (gateway, shards, sinks).")
    namespace: str = Field("kairos", description="Ray namespace of the named actors.")
    data_dir: str = Field("kairos-data/service", description="Logs, triggers and models.")
    rules: str = Field(str(CONFIG_DIR / "rules.yaml"), description="Rule file at start-up.")
    offers: str | None = Field(
        str(CONFIG_DIR / "offers.yaml"), description="Offer catalog at start-up (None: no offers)."
    )
    shards: int = Field(2, ge=1)
    shard_cpus: float = Field(0.25, gt=0)
    micro_batch_max_events: int = Field(16_384, ge=1)
    micro_batch_deadline_ms: float = Field(20.0, gt=0)
    allowed_lateness_s: float = Field(60.0, ge=0)
    idle_release_ms: float = Field(
        2_000.0, gt=0, description="Quiet for this long: release the watermark to the newest event."
    )
    max_body_bytes: int = Field(16 << 20, ge=1024, description="Larger bodies get 413.")
    retrain_every: int = Field(
        0, ge=0, description="Retrain the ranker every N new outcomes (0: never)."
    )
    ranker_cpus: float = Field(0.25, gt=0)

    def settings(self) -> EngineSettings:
        return EngineSettings(
            shards=self.shards,
            micro_batch_max_events=self.micro_batch_max_events,
            micro_batch_deadline_ms=self.micro_batch_deadline_ms,
            allowed_lateness_s=self.allowed_lateness_s,
            dedupe_window_s=max(3600.0, self.allowed_lateness_s),
            data_dir=Path(self.data_dir),
        )

    @property
    def gateway_name(self) -> str:
        return f"{self.name}-gateway"

    def shard_name(self, i: int) -> str:
        return f"{self.name}-shard-{i}"

    @property
    def decision_sink_name(self) -> str:
        return f"{self.name}-decisions"


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as the API reports it."""
    return {
        "index": letter.index,
        "event_id": letter.event_id,
        "kind": letter.kind,
        "field": letter.field,
        "value": letter.value,
        "reason": letter.reason,
    }


@ray.remote(max_concurrency=32)  # type: ignore[call-overload]
class GatewayActor:
    """Runs one engine: Supervisor (shards, router, sinks), its clock thread, its retrainer."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.settings = config.settings()
        root = Path(config.data_dir).resolve()
        rules = load_rules(config.rules)
        catalog: Catalog | None = None
        scorer = None
        if config.offers:
            from engine.decision.catalog import load_catalog

            catalog = load_catalog(config.offers)
            scorer = ServeScorer(RANKER_DEPLOYMENT, RANKER_APP)
        self.supervisor = Supervisor(
            self.settings,
            rules,
            trigger_uri=str(root / "triggers"),
            shard_cpus=config.shard_cpus,
            namespace_prefix=config.name,
            dead_letter_uri=str(root / "dead-letters"),
            catalog=catalog,
            scorer=scorer,
            decision_uri=str(root / "decisions") if catalog else None,
            outcome_uri=str(root / "outcomes") if catalog else None,
            observer=self._observe,
        )
        self.registry_uri = str(root / "models")
        self.model_version = self._start_ranker(rules, catalog) if catalog else None
        if catalog is not None:
            for problem in self.supervisor.connect_scorers():
                log.warning("a shard could not reach the ranker yet: %s", problem)
        self.lock = threading.RLock()
        self.last_input = time.monotonic()
        self.idle_released = True
        self.retrainer: Any = None
        self.retrain_error: str | None = None
        self._stop = threading.Event()
        self._clock = threading.Thread(target=self._tick, name="gateway-clock", daemon=True)
        self._clock.start()

    def _start_ranker(self, rules: Any, catalog: Catalog) -> str:
        """The registry's champion (trained on a simulated warm-up log when there is none),
        deployed as the ranker application; an unchanged running ranker is left alone."""
        from models.bootstrap import ensure_champion
        from models.deployment import deploy_ranker
        from models.ranker import RankerConfig
        from models.registry import ModelRegistry

        registry = ModelRegistry(self.registry_uri)
        version = ensure_champion(registry, rules, catalog)
        config = RankerConfig(registry=registry.uri, champion=version)
        deploy_ranker(config, num_cpus=self.config.ranker_cpus)
        return version

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

    def enable_retraining(self, every: int) -> None:
        """Retrain every ``every`` new outcomes and swap the winner into the running ranker."""
        from deploy.retrain import Retrainer
        from models.registry import ModelRegistry

        if self.supervisor.catalog is None:
            raise EngineError("retraining needs an offer catalog")
        with self.lock:
            self.retrainer = Retrainer(
                self.supervisor,
                ModelRegistry(self.registry_uri),
                self.supervisor.catalog,
                every=every,
            )

    def ready(self) -> dict[str, Any]:
        """Every shard and sink answers (raises if one does not)."""
        stats = self.supervisor.ready()
        return {"shards": len(stats), "customers": sum(s["customers"] for s in stats)}

    # -- events --------------------------------------------------------------------------------
    def submit(
        self, batch: pa.RecordBatch, positions: list[int], letters: list[DeadLetter]
    ) -> dict[str, Any]:
        """Ingest one request's events; ``letters`` are rows the replica could not coerce.

        Returns the counts and every rejected event's error, with its index in the request.
        """
        with self.lock:
            router = self.supervisor.router
            if letters:
                router.reject(letters)
            dead = router.submit(batch, np.asarray(positions, dtype=np.int64))
            self.last_input = time.monotonic()
            self.idle_released = False
        rejected = sorted([*letters, *dead], key=lambda d: d.index)
        accepted = batch.num_rows - len(dead)
        m = metrics()
        if accepted:
            kinds = batch.column("kind").to_numpy(zero_copy_only=False)
            ok = np.ones(batch.num_rows, dtype=bool)
            index = {p: i for i, p in enumerate(positions)}
            for d in dead:
                ok[index[d.index]] = False
            names, counts = np.unique(kinds[ok].astype(str), return_counts=True)
            m.count(m.ingested, dict(zip(names.tolist(), counts.tolist(), strict=True)), "kind")
        if rejected:
            by_kind: dict[str, int] = {}
            for d in rejected:
                kind = d.kind if d.kind in KIND_NAMES else "unknown"
                by_kind[kind] = by_kind.get(kind, 0) + 1
            m.count(m.rejected, by_kind, "kind")
        return {
            "accepted": accepted,
            "rejected": len(rejected),
            "errors": [letter_json(d) for d in rejected],
        }

    def _observe(self, shard: int, stats: dict[str, Any], latency_ms: float) -> None:
        m = metrics()
        m.micro_batch_ms.observe(latency_ms)
        m.count(m.triggers, stats["triggers_by_rule"], "rule")
        m.queue_depth.set(
            self.supervisor.router.queue_depth[shard] if hasattr(self, "supervisor") else 0,
            tags={"shard": str(shard)},
        )

    def _tick(self) -> None:
        """Deadlines, idle release and retraining, on the gateway's own clock."""
        period = max(self.settings.micro_batch_deadline_ms / 2000, 0.002)
        while not self._stop.wait(period):
            try:
                with self.lock:
                    router = self.supervisor.router
                    router.poll()
                    quiet = time.monotonic() - self.last_input
                    if not self.idle_released and quiet * 1000 >= self.config.idle_release_ms:
                        router.release_idle()
                        self.idle_released = True
                    for shard, depth in enumerate(router.queue_depth):
                        metrics().queue_depth.set(depth, tags={"shard": str(shard)})
                    retrainer = self.retrainer
                if retrainer is not None and retrainer.due():
                    self._retrain(retrainer)
            except Exception:  # the clock must keep going; the error is logged
                log.exception("gateway clock tick failed")

    def _retrain(self, retrainer: Any) -> None:
        try:
            with self.lock:
                result = retrainer.maybe_retrain()
            if result is not None:
                log.info("retrained: %s", result.reason)
            self.retrain_error = None
        except Exception as exc:
            self.retrain_error = str(exc)
            log.exception("retraining failed; the running model stays")

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
                if self.retrainer is not None:
                    self.retrainer.catalog = catalog
        except RuleError as exc:
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
        out["retrain_error"] = self.retrain_error
        if self.retrainer is not None:
            out["retrained"] = len(self.retrainer.history)
        return out

    def drain(self) -> dict[str, Any]:
        """Apply everything received so far (closing the watermark) and write the logs."""
        with self.lock:
            self.supervisor.router.release_idle()
            self.idle_released = True
            self.supervisor.router.flush_logs()
        return self.stats()

    def save(self) -> None:
        """Write what the sinks hold, applying nothing: called while Serve stops, when the
        ranker may be gone and a micro-batch may hold the lock waiting for it. The sink actors
        are flushed regardless; the in-process ones when the lock comes within a second."""
        router = self.supervisor.router
        sinks = [a for a in (router.decision_sink, router.sink) if a is not None]
        ray.get([a.flush.remote() for a in sinks])
        if self.lock.acquire(timeout=1.0):
            try:
                router.flush_logs()
            finally:
                self.lock.release()

    def shutdown(self) -> None:
        """Stop: apply every event received, write every log, stop the engine's actors."""
        self._stop.set()
        with self.lock:
            self.supervisor.router.release_idle()  # apply everything, even within lateness
            self.supervisor.router.flush_logs()
            self.supervisor.shutdown()
