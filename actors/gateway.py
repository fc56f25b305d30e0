"""GatewayActor: one named actor that runs the engine behind the HTTP API (a thin wrapper).

The API replicas (``deploy.api``) decode, coerce and validate request bodies themselves, in
parallel, and publish each request's valid events to the durable ingest log (NATS JetStream,
``actors.ingestlog``); a 202 means JetStream acknowledged them. The gateway is the log's single
reader: an ``engine.pipeline.Pipeline`` from the log (a ``LogSource``) into its ``Supervisor``
(one sequence, one watermark; the router cuts micro-batches *across* requests), with a
checkpoint every ``checkpoint_every_s`` and one on a clean stop. On start it restores the CURRENT
checkpoint and reads the log from its position; ``ready`` answers once it has caught up with the
log as it was at start. A lost shard is replaced and every shard restored without a human; a
lost gateway is restarted by Ray (``max_restarts``) and does the same from the checkpoint.

Golden-record reads and inbound decisions do not pass through the gateway: the API replicas
call the owning shard directly (``routing``; its ``generation`` changes when a shard actor is
replaced). The ranker and the retrainer come in as callables from ``deploy``: actors never
import ``models``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import ray

from actors.ingestlog import LogConfig, LogSource
from actors.metrics import metrics
from actors.ratelimit import RateLimiterActor
from actors.scorer import ServeScorer
from actors.supervisor import Supervisor
from engine.checkpoint import checkpoints
from engine.config import EngineSettings
from engine.decision.catalog import Catalog, load_catalog, parse_catalog
from engine.errors import CatalogError, RuleError
from engine.gateway import ApiActivity, GatewayLogic, Retrainer
from engine.pipeline import Pipeline
from engine.reference import EMPTY, ReferenceDataError, load_reference
from engine.rules.spec import RuleSet, load_rules, parse_rules

log = logging.getLogger(__name__)


#: deploys the ranker for (rules, catalog); returns the model version it serves
class StartRanker(Protocol):
    """Deploys the ranker for ``catalog`` serving ``version`` (None: the registry's champion,
    trained first if there is none); returns the version served."""

    def __call__(self, rules: RuleSet, catalog: Catalog, *, version: str | None = None) -> str: ...


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
    #: the reference tables at start-up (None: none; ``PUT /v1/reference/{name}`` sets them)
    reference_file: str | None = None
    shard_cpus: float = 0.25
    idle_release_ms: float = 2_000.0
    #: the ingest log (None: ``submit`` feeds the engine directly, nothing is durable)
    log: LogConfig | None = None
    checkpoint_every_s: float = 10.0
    #: where checkpoints go (default: ``<data_dir>/checkpoints``; any pyarrow.fs URI)
    checkpoint_uri: str | None = None

    @property
    def gateway_name(self) -> str:
        return f"{self.name}-gateway"


@ray.remote(max_concurrency=32)  # type: ignore[call-overload]
class GatewayActor:
    """Runs one engine: Supervisor (shards, router, sinks), its log reader, its retrainer."""

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
        reference = load_reference(config.reference_file) if config.reference_file else EMPTY
        #: per-key rate limits across API replicas (``routing()`` hands it to them)
        self.limiter = RateLimiterActor.remote()
        self.supervisor = Supervisor(
            self.settings,
            rules,
            trigger_uri=str(root / "triggers"),
            shard_cpus=config.shard_cpus,
            namespace_prefix=f"{config.name}-{time.time_ns():x}",
            dead_letter_uri=str(root / "dead-letters"),
            catalog=catalog,
            scorer=ServeScorer() if catalog else None,
            decision_uri=str(root / "decisions") if catalog else None,
            response_uri=str(root / "responses") if catalog else None,
            observer=self._observe,
            idle_release_ms=config.idle_release_ms,
            checkpoint_root=config.checkpoint_uri or str(root / "checkpoints"),
            reference=reference,
            spares_after_start=True,  # ready sooner: spares start once the shards are up
        )
        self.lock = threading.RLock()
        #: whether events made before now may still come from API replicas (Ray restarted
        #: this actor: they told its predecessor of the requests under way)
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._api_activity = ApiActivity(restarted=restarted)
        self._busy_lock = threading.Lock()
        self._stop = threading.Event()
        self.source: LogSource | None = None
        self.pipeline: Pipeline | None = None
        #: the log's end when this gateway started: ready once read up to it
        self._catch_up_to = 0
        # the ranker (training a first model on a fresh registry) starts while the engine
        # restores; again below if the checkpoint brings back another catalog
        ranker = None
        #: the model version serving decisions; the last checkpoint's, after a restart (the
        #: stretch of the log replayed after it is decided by the model that decided it)
        self.model_version = self._checkpointed_model_version()
        if catalog is not None and start_ranker is not None:
            pool = ThreadPoolExecutor(1, "ranker")
            ranker = pool.submit(self._start_ranker, start_ranker, rules, catalog)
            pool.shutdown(wait=False)  # the thread ends with its task
        if config.log is not None:
            # the log is read once the ranker is up
            self.source = LogSource(config.log, wait_s=min(0.05, self._period))
            # a quiet spell is written to the log and released when read back: a replay
            # makes the same events late
            self.supervisor.router.on_idle = self._mark_idle
            self.pipeline = Pipeline(
                self.source,
                self.supervisor,
                config.checkpoint_every_s,
                chunk=1_000_000,
                manifest_extra=lambda: {"model_version": self.model_version},
            )
            restored = self.pipeline.start()
            self._catch_up_to = self.source.position + self.source.lag()
            log.warning(
                "gateway started from %s; reading the log from %d (end %d)",
                f"checkpoint {restored['epoch']}" if restored else "an empty engine",
                self.source.position, self._catch_up_to,
            )  # fmt: skip
        if ranker is not None and start_ranker is not None:
            self.model_version = ranker.result()
            running = self.supervisor.catalog
            if running is not None and catalog is not None and running.document != catalog.document:
                self.model_version = self._start_ranker(
                    start_ranker, self.supervisor.rules, running
                )
            for problem in self.supervisor.connect_scorers():
                log.warning("a shard could not reach the ranker yet: %s", problem)
        catalog = self.supervisor.catalog
        retrainer = None
        if catalog is not None and make_retrainer is not None:
            retrainer = make_retrainer(self.supervisor, catalog)
        self.logic = GatewayLogic(self.supervisor.router, retrainer)
        self._clock = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._clock.start()

    def _checkpointed_model_version(self) -> str | None:
        if self.config.log is None or self.supervisor.checkpoint_root is None:
            return None
        kept = checkpoints(self.supervisor.checkpoint_root)
        version = kept[-1].get("model_version") if kept else None
        return str(version) if version else None

    def _start_ranker(self, start: StartRanker, rules: RuleSet, catalog: Catalog) -> str:
        """The ranker serving the checkpointed model version if there is one (the registry's
        champion if that version is gone or was trained for other offers)."""
        if self.model_version is not None:
            try:
                return start(rules, catalog, version=self.model_version)
            except Exception as exc:  # any failure: serve the champion instead
                log.error("the checkpoint's model %s cannot be served (%s); serving the "
                          "registry's champion", self.model_version, exc)  # fmt: skip
        return start(rules, catalog)

    @property
    def _period(self) -> float:
        return max(self.settings.micro_batch_deadline_ms / 2000, 0.002)

    # -- wiring ------------------------------------------------------------------------------
    def routing(self) -> dict[str, Any]:
        """What an API replica needs to reach shards and sinks directly; ``generation``
        changes whenever a shard actor is replaced (read it again then)."""
        return {
            "settings": self.settings,
            "shards": list(self.supervisor.shards),
            "decision_sink": self.supervisor.decision_sink,
            "generation": self.supervisor.generation,
            "limiter": self.limiter,
        }

    def ready(self) -> dict[str, Any]:
        """Every shard and sink answers and the log is read up to where it ended at start
        (raises NotReadyError otherwise)."""
        if self.source is not None and self.source.position < self._catch_up_to:
            behind = self._catch_up_to - self.source.position
            raise NotReadyError(f"replaying the ingest log: {behind} messages to go")
        if self.pipeline is not None and self.pipeline.unrecovered is not None:
            raise NotReadyError(f"recovering, and failing: {self.pipeline.unrecovered}")
        stats = self.supervisor.ready()
        return {"shards": len(stats), "customers": sum(s["customers"] for s in stats)}

    def api_busy(self, replica: str, seq: int, hold_s: float) -> None:
        """An API replica's events may still come for ``hold_s`` seconds (0: none are under
        way); see ``ApiActivity``."""
        with self._busy_lock:
            self._api_activity.report(replica, seq, hold_s)

    def _mark_idle(self) -> bool:
        """The log has been quiet for ``idle_release_ms``: mark it there, unless events made
        before may still come from the API replicas (after the mark they would be late)."""
        with self._busy_lock:
            quiet = self._api_activity.quiet()
        return quiet and self.source is not None and self.source.mark_idle()

    def pid(self) -> int:
        """This actor's process id (tests measure its memory)."""
        import os

        return os.getpid()

    def backlog(self) -> dict[str, Any]:
        """What the API sheds load on: ``lag``, the messages in the log the engine has not read
        yet, and ``checkpoint_error``, why the last checkpoint failed (None: it did not)."""
        if self.source is None or self.pipeline is None:
            return {"lag": 0, "checkpoint_error": None}
        return {"lag": self.source.lag(), "checkpoint_error": self.pipeline.checkpoint_error}

    # -- the engine's clock ------------------------------------------------------------------------
    def _observe(self, shard: int, stats: dict[str, Any], latency_ms: float) -> None:
        m = metrics()
        m.micro_batch_ms.observe(latency_ms)
        m.count(m.triggers, stats["triggers_by_rule"], "rule")
        failed = stats.get("failed")
        if failed is not None and failed.num_rows:
            kinds = failed.column("kind").to_pylist()
            m.count(m.failed, {k: kinds.count(k) for k in set(kinds)}, "kind")

    def _run(self) -> None:
        """Read the log (or tick, without one), checkpoint when due, retrain when due."""
        while not self._stop.is_set():
            try:
                with self.lock:
                    if self.pipeline is not None:
                        read = self.pipeline.step()
                    else:
                        read = 0
                        self.logic.tick()
                    depths = self.supervisor.router.queue_depth
                for shard, depth in enumerate(depths):
                    metrics().queue_depth.set(depth, tags={"shard": str(shard)})
                if self.logic.retrain_due():
                    with self.lock:
                        result = self.logic.retrain()
                        promoted = getattr(result, "artifact", None) if result else None
                        if getattr(result, "promoted", False) and promoted is not None:
                            # decided by the new model from here on: a checkpoint now, so a
                            # replay never decides an earlier stretch with it
                            self.model_version = promoted.version
                            if self.pipeline is not None:
                                self.pipeline.checkpoint()
                    if self.logic.retrain_error:
                        log.error("retraining failed; the running model stays: %s",
                                  self.logic.retrain_error)  # fmt: skip
                    elif result is not None:
                        log.info("retrained: %s", result.reason)
                if not read:
                    self._stop.wait(self._period if self.pipeline is None else 0.0)
            except Exception:  # the clock must keep going; the error is logged
                log.exception("gateway step failed")
                self._stop.wait(0.5)

    # -- events without a log (tests, a quick try) ------------------------------------------------
    def submit(self, batch: Any, positions: list[int], letters: list[Any]) -> dict[str, Any]:
        """Ingest one request's events straight into the engine (no log: nothing durable)."""
        with self.lock:
            done = self.logic.submit(batch, positions, letters)
        return done.report

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
                self._make_durable(
                    lambda: self.supervisor.rules.document == rules.document,
                    lambda: self.supervisor.set_rules(document, "rules"),
                )
        except RuleError as exc:
            return {"ok": False, "errors": exc.problems}
        return {"ok": True, "rules": len(rules.rules)}

    def _make_durable(self, running: Callable[[], bool], set_again: Callable[[], Any]) -> None:
        """A checkpoint right after a change of rules or offers, so the change is answered
        only once a restart would keep it (the manifest holds the running documents). A
        recovery inside that checkpoint restores the one before: set it again and retry."""
        if self.pipeline is None:
            return
        for _ in range(3):
            self.pipeline.checkpoint()
            if running():
                return
            log.warning("a recovery undid a configuration change; setting it again")
            set_again()
        raise RuntimeError("the configuration change could not be checkpointed")

    def set_offers(self, document: Any) -> dict[str, Any]:
        if self.supervisor.catalog is None:
            return {"ok": False, "errors": ["decisions are off: the service runs without offers"]}
        try:
            parse_catalog(document, "offers")
            with self.lock:
                catalog = self.supervisor.set_catalog(document, "offers")
                self._make_durable(
                    lambda: (
                        self.supervisor.catalog is not None
                        and self.supervisor.catalog.document == catalog.document
                    ),
                    lambda: self.supervisor.set_catalog(document, "offers"),
                )
                if self.logic.retrainer is not None:  # train for the offers now served
                    self.logic.retrainer.set_catalog(catalog)
        except CatalogError as exc:
            return {"ok": False, "errors": exc.problems}
        return {"ok": True, "offers": len(catalog.offers)}

    def reference(self) -> dict[str, Any]:
        """The reference tables' version and rows (``GET /v1/reference``)."""
        return self.supervisor.reference.summary()

    def reference_table(self, name: str) -> list[dict[str, Any]]:
        """The rows of reference table ``name`` (``GET /v1/reference/{name}``)."""
        rows: list[dict[str, Any]] = self.supervisor.reference.tables[name].to_pylist()
        return rows

    def set_reference(self, name: str, table: pa.Table) -> dict[str, Any]:
        """Validate reference table ``name`` whole, with the others, and broadcast it to every
        shard; an invalid one changes nothing. Returns {"ok": True, "version": ..., "rows": n}
        or {"ok": False, "errors": [...]}."""
        try:
            self.supervisor.reference.replaced(name, table)  # before the lock: costs nothing
            with self.lock:
                reference = self.supervisor.set_reference(name, table)
                self._make_durable(
                    lambda: self.supervisor.reference.version == reference.version,
                    lambda: self.supervisor.set_reference(name, table),
                )
        except ReferenceDataError as exc:
            return {"ok": False, "errors": exc.problems}
        return {"ok": True, "version": reference.version, "rows": table.num_rows}

    # -- reading -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Router counters and shard counters; ``pending`` events wait for the watermark;
        ``log``: where the engine is in the ingest log, its checkpoints and recoveries."""
        with self.lock:
            router = self.supervisor.router
            out = router.stats.as_dict()
            out["queue_depth"] = router.queue_depth
            out["watermark_ms"] = self.supervisor.ingestor.watermark_ms
            if self.pipeline is not None and self.source is not None:
                out["log"] = {
                    "position": self.source.position,
                    "lag": self.source.lag(),
                    "checkpoint": self.pipeline.epoch,
                    "recoveries": len(self.pipeline.recoveries),
                    "checkpoint_error": self.pipeline.checkpoint_error,
                    "unrecovered": self.pipeline.unrecovered,
                }
        shards = self.supervisor.shard_stats()
        out["pending"] = sum(s["pending"] for s in shards)
        out["customers"] = sum(s["customers"] for s in shards)
        out["shard_decisions"] = sum(s["decisions"] for s in shards)
        out["retrain_error"] = self.logic.retrain_error
        if self.logic.retrainer is not None:
            out["retrained"] = len(self.logic.retrained)
        return out

    def drain(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Read the log to its end, apply everything (closing the watermark) and commit the
        logs (a checkpoint; without a log, write them)."""
        deadline = time.monotonic() + timeout_s
        while self.source is not None and self.source.lag() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.lock:
            self.supervisor.router.release_watermark()
            if self.pipeline is not None:
                self.pipeline.checkpoint()
            else:
                self.supervisor.router.write_logs()
        return self.stats()

    def checkpoint(self) -> int:
        """Take a checkpoint now; returns its epoch."""
        if self.pipeline is None:
            raise RuntimeError("this gateway runs without a log: there are no checkpoints")
        with self.lock:
            self.pipeline.checkpoint()
            return self.pipeline.epoch

    def save(self) -> None:
        """Called while Serve stops: take a checkpoint if the engine is free within a second
        (it commits the logs); without a log, write what the sinks hold. Nothing after
        ``shutdown``: it took the last checkpoint and stopped the engine's actors."""
        if self._stop.is_set() or not self.lock.acquire(timeout=1.0):
            return
        if self._stop.is_set():  # shut down while this waited for the lock
            self.lock.release()
            return
        try:
            if self.pipeline is not None:
                self.pipeline.checkpoint()
            else:
                self.supervisor.router.write_logs()
        finally:
            self.lock.release()

    def shutdown(self) -> None:
        """A clean stop: a last checkpoint (pending events and all), the engine's actors
        stopped. Without a log: apply everything and write the logs."""
        self._stop.set()
        self._clock.join(timeout=10)
        with self.lock:
            if self.pipeline is not None:
                self.pipeline.checkpoint()
            else:
                self.supervisor.router.release_watermark()
                self.supervisor.router.write_logs()
            self.supervisor.shutdown()
            if self.source is not None:
                self.source.close()


class NotReadyError(RuntimeError):
    """The gateway is up but not ready (still replaying the log)."""
