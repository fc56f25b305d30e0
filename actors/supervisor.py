"""Supervisor: creates the shard actors over key-group ranges, the sinks and the router.

Also the one place that broadcasts rule changes and coordinates checkpoints across shards. With a
``checkpoint_root`` it is an ``engine.pipeline.Engine``: ``begin_checkpoint`` takes an aligned
cut (the router drained), every shard writes a detached snapshot in the background and the
sinks pre-commit; ``finish_checkpoint``, once the snapshots are written, writes the manifest and
CURRENT, then commits the sinks; ``recover`` waits for restarted actors (shards and sinks restart
by themselves, empty), restores every shard from CURRENT (rescaled when it was taken on another
shard count), settles the sinks and resets the router. Ray errors of lost actors become
``WorkerLostError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from actors.router import Router
from actors.shard import ShardActor
from actors.sink import DecisionSinkActor, TriggerSinkActor
from engine.checkpoint import (
    checkpoints,
    commit_checkpoint,
    config_entry,
    document_digest,
    read_checkpoint,
    rescale,
    restored_config,
)
from engine.config import EngineSettings
from engine.decision.catalog import Catalog, parse_catalog
from engine.decision.scorer import OfferScorer
from engine.errors import CatalogError, RuleError, StateError, WorkerLostError
from engine.events.deadletter import DeadLetter
from engine.faults import crash_point
from engine.ingest import Ingestor
from engine.reference import EMPTY, ReferenceData, ReferenceDataError
from engine.rules.spec import RuleSet, parse_rules
from engine.sink import ParquetSink
from engine.snapshot import ShardSnapshot

log = logging.getLogger(__name__)
#: sinks come back after a crash (empty: ``recover`` settles them); a call that was in flight
#: is not retried, the pipeline replays from the checkpoint instead
_RESTART = {"max_restarts": -1, "max_task_retries": 0}
#: how long ``recover`` waits for restarted actors
RECOVERY_TIMEOUT_S = 60.0
_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@contextmanager
def lost_workers(what: str) -> Iterator[None]:
    """Ray's errors of a dead or restarting actor as WorkerLostError."""
    try:
        yield
    except _LOST as exc:
        raise WorkerLostError(f"{what}: {type(exc).__name__}: {exc}"[:500]) from exc


#: how often a checkpoint being written asks the shards whether their snapshots are written
_POLL_S = 0.05


@dataclass
class _InFlight:
    """A checkpoint begun (``Supervisor.begin_checkpoint``) whose snapshots are being written.

    Its shards are asked (``snapshot_written``, an ordinary call behind the micro-batches sent
    since) at most every ``_POLL_S``; a shard still writing answers None and is asked again."""

    epoch: int
    root: str
    document: dict[str, Any]
    shards: list[Any]
    begun: list[Any]
    precommits: list[Any]
    started: float
    aligned_s: float = 0.0
    written: list[dict[str, Any] | None] = field(default_factory=list)
    asked: list[Any] = field(default_factory=list)
    asked_at: float = 0.0

    def poll(self, now: float) -> None:
        if not self.written:
            self.written = [None] * len(self.shards)
            self.asked = [None] * len(self.shards)
        for i, shard in enumerate(self.shards):
            if self.written[i] is None and self.asked[i] is None:
                self.asked[i] = shard.snapshot_written.remote(self.epoch)
        self.asked_at = now

    def entries(self, wait: bool) -> list[dict[str, Any]] | None:
        """Every shard's manifest entry; None while one is still being written (``wait``:
        block until they are)."""
        if wait:
            ray.get(self.begun)
            for i, shard in enumerate(self.shards):
                if self.written[i] is None:
                    if self.asked[i] is not None:
                        self.written[i] = ray.get(self.asked[i])
                    if self.written[i] is None:
                        self.written[i] = ray.get(shard.snapshot_written.remote(self.epoch, True))
            return list(self.written)  # type: ignore[arg-type]
        pending = [ref for ref in self.asked if ref is not None]
        ready = ray.wait(pending, num_returns=len(pending), timeout=0)[0] if pending else []
        ready_ids = {ref.hex() for ref in ready}
        for i, ref in enumerate(self.asked):
            if ref is not None and ref.hex() in ready_ids:
                self.written[i] = ray.get(ref)  # raises what the write raised
                self.asked[i] = None
        if all(entry is not None for entry in self.written):
            ray.get(self.begun)
            return list(self.written)  # type: ignore[arg-type]
        now = time.monotonic()
        if now - self.asked_at >= _POLL_S:
            self.poll(now)
        return None


class Supervisor:
    """Owns the actors of one running engine (call from a driver, job or gateway)."""

    def __init__(
        self,
        settings: EngineSettings,
        rules: RuleSet,
        trigger_uri: str | None = None,
        shard_cpus: float = 0.5,
        namespace_prefix: str = "kairos",
        dead_letter_uri: str | None = None,
        catalog: Catalog | None = None,
        scorer: OfferScorer | None = None,
        decision_uri: str | None = None,
        response_uri: str | None = None,
        observer: Any | None = None,
        idle_release_ms: float | None = None,
        checkpoint_root: str | None = None,
        keep_checkpoints: int = 3,
        spares: int = 2,
        reference: ReferenceData = EMPTY,
        spares_after_start: bool = False,
    ) -> None:
        """``catalog`` and ``scorer`` (e.g. a ServeScorer) switch decisions on; they are
        logged under ``decision_uri`` by day, and offer responses under ``response_uri``.
        ``idle_release_ms``: a live service releases the watermark when input goes quiet.
        ``checkpoint_root``: where checkpoints go (a folder or an object-store URI).
        ``reference``: the reference tables rules read (``set_reference`` replaces one).
        ``spares_after_start``: start the spare shards once the shards have started and loaded
        (``recover``'s first wait), not beside them: on a small machine the spares' start-up
        competes with the shards' for the cores, and a service is ready sooner without it."""
        self.checkpoint_root = checkpoint_root
        self.keep_checkpoints = keep_checkpoints
        self.settings = settings
        self.rules = rules
        self.catalog = catalog
        self.reference = reference
        #: digests of the configuration this process started with (see restored_config)
        self._started_from = {
            "rules": document_digest(rules.document),
            "offers": document_digest(catalog.document if catalog else None),
            "reference": reference.version,
        }
        self.ingestor = Ingestor(settings)
        self.ingestor.listen(rules.listening)
        self._shard_cpus = shard_cpus
        self._scorer = scorer
        self._started = 0
        self.namespace_prefix = namespace_prefix
        self.shards = [self._new_shard(i) for i in range(settings.shards)]
        #: started, empty shard actors; one takes over a dead shard's key groups at once (a hot
        #: standby: starting an actor takes 2-4 s here, a swap milliseconds). Two, so a second
        #: loss soon after the first does not wait for the replacement spare to start.
        self.spares_wanted = spares if checkpoint_root is not None else 0
        self._spares_after_start = spares_after_start
        self.spares = [
            self._new_shard(0, spare=True)
            for _ in range(0 if spares_after_start else self.spares_wanted)
        ]
        #: bumped whenever a shard actor is replaced (API replicas re-read the routing)
        self.generation = 0
        self.decision_sink = None
        if decision_uri is not None:
            self.decision_sink = DecisionSinkActor.options(
                num_cpus=0.1,
                name=f"{namespace_prefix}-decisions",
                **_RESTART,
            ).remote(decision_uri)
        self.sink = None
        if trigger_uri is not None:
            self.sink = TriggerSinkActor.options(
                num_cpus=0.1,
                name=f"{namespace_prefix}-sink",
                **_RESTART,
            ).remote(trigger_uri)
        dead = ParquetSink(dead_letter_uri, prefix="dead") if dead_letter_uri else None
        self.router = Router(
            self.ingestor,
            self.shards,
            self.sink,
            dead_letter_sink=dead,
            decision_sink=self.decision_sink,
            response_sink=ParquetSink(response_uri, prefix="responses") if response_uri else None,
            observer=observer,
            idle_release_ms=idle_release_ms,
        )
        self.decision_uri = decision_uri
        self.response_uri = response_uri
        #: the checkpoint begun and not yet finished (``begin_checkpoint``)
        self._in_flight: _InFlight | None = None
        #: the last checkpoints' times: aligning (the router drained) and begin to CURRENT
        self.checkpoint_times: list[dict[str, Any]] = []

    def _new_shard(self, i: int, spare: bool = False) -> Any:
        """A shard actor for key groups of shard ``i`` (a spare is reassigned when used).

        Shards do not restart by themselves (``max_restarts=0``): a dead one is replaced by a
        spare and every shard is restored from the checkpoint (``recover``). A spare reserves
        no CPU (it idles; reserving would keep other actors from starting on a small node): one
        that takes over runs without a reservation of its own."""
        self._started += 1
        offers = dict(self.catalog.document) if self.catalog else None
        return ShardActor.options(
            num_cpus=0 if spare else self._shard_cpus,
            name=f"{self.namespace_prefix}-shard-{i}-{self._started}",
            get_if_exists=False,
            max_restarts=0,
            scheduling_strategy="SPREAD",  # over the nodes: a lost node costs fewer shards
        ).remote(
            i,
            self.settings,
            dict(self.rules.document),
            self.ingestor.shard_map.range_of(i),
            offers,
            self._scorer,
            self.reference,
        )

    def set_rules(self, document: dict[str, Any], source: str = "rules") -> RuleSet:
        """Validate then swap the rules on every shard between micro-batches; state is kept.

        An invalid document raises RuleError before any shard sees it: the running set stays.
        """
        rules = parse_rules(document, source)
        self.router.drain()
        ray.get([s.set_rules.remote(dict(rules.document)) for s in self.shards])
        self.rules = rules
        self.ingestor.listen(rules.listening)
        self._refresh_spares(lambda s: s.set_rules.remote(dict(rules.document)))
        return rules

    def set_reference(self, name: str, table: pa.Table) -> ReferenceData:
        """Replace reference table ``name`` on every shard between micro-batches.

        The table is validated whole, with the others (a stock of an unknown store is refused):
        an invalid one raises ReferenceDataError before any shard sees it; the running data
        stays.
        """
        reference = self.reference.replaced(name, table)
        self.router.drain()
        ray.get([s.set_reference.remote(reference) for s in self.shards])
        self.reference = reference
        self._refresh_spares(lambda s: s.set_reference.remote(reference))
        return reference

    def _refresh_spares(self, call: Callable[[Any], Any]) -> None:
        """Bring the spares up to date with a change the shards took (``call`` on each), so
        one that takes over has loaded what the new rules need. A spare found dead is
        replaced by a new one (built with the current rules, catalog and tables), not an
        error: the change has been made. A restore sets the checkpoint's configuration on
        a spare that takes over in any case."""
        calls = [(spare, call(spare)) for spare in self.spares]
        self.spares = []
        for spare, ref in calls:
            try:
                ray.get(ref, timeout=RECOVERY_TIMEOUT_S)
                self.spares.append(spare)
            except (*_LOST, ray.exceptions.GetTimeoutError):
                ray.kill(spare)
                log.warning("a spare shard was lost; starting another")
        self._refill_spares()

    def connect_scorers(self) -> list[str]:
        """Have every shard connect to the ranker (call once it is deployed); the problems."""
        answers = ray.get([s.connect_scorer.remote() for s in self.shards])
        return [a for a in answers if a is not None]

    def set_catalog(self, document: dict[str, Any], source: str = "offers") -> Catalog:
        """Validate then swap the offer catalog on every shard; contact history is kept.

        An invalid document raises CatalogError before any shard sees it: the running set stays.
        """
        catalog = parse_catalog(document, source)
        self.router.drain()
        ray.get([s.set_catalog.remote(dict(catalog.document)) for s in self.shards])
        self.catalog = catalog
        self._refresh_spares(lambda s: s.set_catalog.remote(dict(catalog.document)))
        return catalog

    def ready(self, spares: bool = False) -> list[dict[str, Any]]:
        """Wait until every actor (shards and sinks) has started and the shards have loaded
        the code their rules need (``ShardActor.loaded``); with ``spares``, the spares too.
        Returns the shard stats.

        Actor start-up (a process, imports) costs about a second of CPU, loading the pattern
        loop another: a caller that measures or streams waits here first, so no start-up
        competes with the first batches.
        """
        sinks = [a.rows.remote() for a in (self.sink, self.decision_sink) if a is not None]
        stats = self.shard_stats()
        ray.get([s.loaded.remote() for s in [*self.shards, *(self.spares if spares else [])]])
        ray.get(sinks)
        return stats

    def shard_stats(self) -> list[dict[str, Any]]:
        return list(ray.get([s.stats.remote() for s in self.shards]))

    def customer(self, customer_id: str) -> dict[str, Any] | None:
        """The golden record of a customer, by external identifier, from its owning shard."""
        key = self.ingestor.pseudonymizer.key_of(customer_id)
        owner = int(self.ingestor.shard_map.shard_of_keys(np.array([key], dtype=np.uint64))[0])
        return ray.get(self.shards[owner].customer.remote(key))  # type: ignore[no-any-return]

    # -- engine.pipeline.Engine ----------------------------------------------------------------
    def submit(self, batch: pa.Table, positions: np.ndarray) -> list[DeadLetter]:
        with lost_workers("a shard"):
            return self.router.submit(batch, positions)

    def reject(self, letters: list[DeadLetter]) -> None:
        self.router.reject(letters)

    def record_decisions(self, decisions: pa.Table) -> None:
        """Inbound decisions read back from the ingest log: each owning shard records the
        contacts a restore lost (after its calls in flight), and all go to the decision log."""
        parts = self.ingestor.shard_map.split(decisions)
        with lost_workers("a shard"):
            new = ray.get([self.shards[s].record_inbound.remote(p) for s, p in parts.items()])
        new = [t for t in new if t.num_rows]
        if self.decision_sink is not None and new:
            self.decision_sink.write.remote(pa.concat_tables(new))

    def release_watermark(self) -> None:
        with lost_workers("a shard"):
            self.router.release_watermark()

    def poll(self, source_idle: bool | None = None) -> None:
        with lost_workers("a shard"):
            self.router.poll(source_idle)

    def end_stream(self) -> None:
        """Release everything pending; the logs are committed by the next checkpoint."""
        with lost_workers("a shard"):
            self.router.end_stream(write_logs=self.checkpoint_root is None)

    @property
    def _sink_actors(self) -> list[Any]:
        return [a for a in (self.sink, self.decision_sink) if a is not None]

    @property
    def _local_sinks(self) -> list[Any]:
        router = self.router
        return [s for s in (router.dead_letter_sink, router.response_sink) if s is not None]

    def _root(self) -> str:
        if self.checkpoint_root is None:
            raise StateError("this engine has no checkpoint_root")
        return self.checkpoint_root

    def checkpoint(self, epoch: int, extra: Mapping[str, Any]) -> Mapping[str, Any]:
        """Checkpoint ``epoch`` now and wait until it is CURRENT (``begin_checkpoint`` and
        ``finish_checkpoint``); returns the ``extra`` of the oldest checkpoint kept (the source
        may drop what is behind it)."""
        self.begin_checkpoint(epoch, extra)
        done = self.finish_checkpoint(wait=True)
        assert done is not None
        return done

    def begin_checkpoint(self, epoch: int, extra: Mapping[str, Any]) -> None:
        """The barrier of checkpoint ``epoch``: the router drained (an aligned cut), every
        shard takes a detached snapshot and writes it in the background, the sinks close the
        epoch (``precommit``); the manifest's contents (source positions, configuration) are
        taken now. Returns at once: micro-batches go on while the snapshots are written, and
        ``finish_checkpoint`` completes the checkpoint (as Flink's asynchronous snapshots)."""
        if self._in_flight is not None:
            raise StateError(f"checkpoint {self._in_flight.epoch} is still being written")
        root = self._root()
        started = time.monotonic()
        with lost_workers("checkpoint"):
            self.router.drain()
        aligned = time.monotonic()
        shards = list(self.shards)
        begun = [s.begin_snapshot.remote(root, epoch) for s in shards]
        precommits = [a.precommit.remote(epoch) for a in self._sink_actors]
        for sink in self._local_sinks:
            sink.precommit(epoch)
        document = {
            "position": self.ingestor.position(),
            "router": self.router.stats.counters(),
            "config": {
                "rules": config_entry(self.rules.document, self._started_from["rules"]),
                "offers": config_entry(
                    self.catalog.document if self.catalog else None, self._started_from["offers"]
                ),
                "reference": config_entry(
                    self.reference.document(), self._started_from["reference"]
                ),
            },
            **extra,
        }
        self._in_flight = _InFlight(epoch, root, document, shards, begun, precommits, started)
        self._in_flight.aligned_s = aligned - started
        self._in_flight.poll(started)

    def finish_checkpoint(self, wait: bool = False) -> Mapping[str, Any] | None:
        """Complete the checkpoint begun, once every shard has written its snapshot and the
        sinks have pre-committed: its manifest, CURRENT replaced, the sinks committed. Returns
        the ``extra`` of the oldest checkpoint kept; None while snapshots are still being
        written (unless ``wait``). Raises what a snapshot's write raised (storage failing:
        the checkpoint is dropped, the previous one stays CURRENT) and WorkerLostError for a
        shard or sink lost meanwhile (the pipeline recovers)."""
        flight = self._in_flight
        if flight is None:
            raise StateError("no checkpoint was begun")
        try:
            with lost_workers("checkpoint"):
                entries = flight.entries(wait)
                if entries is None:
                    return None
                incarnations = ray.get(flight.precommits)
        except BaseException:
            self._in_flight = None
            raise
        self._in_flight = None
        if self._sink_incarnations is None:  # no pipeline started this engine: these count
            self._sink_incarnations = incarnations
        if incarnations != self._sink_incarnations:
            raise WorkerLostError("a sink restarted since the last checkpoint (rows were lost)")
        epoch = flight.epoch
        commit_checkpoint(flight.root, epoch, entries, flight.document, keep=self.keep_checkpoints)
        crash_point("checkpoint:before_commit")
        with lost_workers("commit"):
            ray.get([a.commit.remote(epoch) for a in self._sink_actors])
        for sink in self._local_sinks:
            sink.commit(epoch)
        now = time.monotonic()
        self.checkpoint_times.append(
            {
                "epoch": epoch,
                "aligned_ms": round(flight.aligned_s * 1000, 1),
                "total_ms": round((now - flight.started) * 1000, 1),
            }
        )
        del self.checkpoint_times[:-20]
        kept = checkpoints(flight.root)
        return kept[0] if kept else {}

    @property
    def checkpoint_in_flight(self) -> int | None:
        """The epoch of the checkpoint begun and not finished (None: there is none)."""
        return None if self._in_flight is None else self._in_flight.epoch

    _sink_incarnations: list[str] | None = None

    def recover(self, timeout_s: float = RECOVERY_TIMEOUT_S) -> Mapping[str, Any] | None:
        """Wait for every actor (restarted ones included), restore the shards from CURRENT,
        settle the sinks against its epoch and reset the router. None: no checkpoint yet (the
        engine is new and empty)."""
        root = self._root()
        self._in_flight = None  # not completed: its shards abandon it when they are restored
        if not checkpoints(root):
            self._wait_for_actors(timeout_s)
            self._sink_incarnations = self._call_all(
                lambda: [a.recover.remote(0) for a in self._sink_actors], timeout_s
            )
            self.router.reset(incarnations=self._incarnations(timeout_s))
            return None
        document, snapshots = read_checkpoint(root)
        self._wait_for_actors(timeout_s)
        ranges = [self.ingestor.shard_map.range_of(i) for i in range(len(self.shards))]
        if [tuple(s.key_range) for s in snapshots] != ranges:
            snapshots = rescale(snapshots, ranges, self.settings.key_groups)
        epoch = int(document["epoch"])
        self._call_all(lambda: self._restore_calls(document, snapshots), timeout_s)
        if self.catalog is not None:
            self.connect_scorers()
        self._sink_incarnations = self._call_all(
            lambda: [a.recover.remote(epoch) for a in self._sink_actors], timeout_s
        )
        for sink in self._local_sinks:
            sink.recover(epoch)
        self.ingestor.resume(document["position"])
        self.router.reset(document.get("router"), self._incarnations(timeout_s))
        return document

    def _restore_calls(
        self, document: Mapping[str, Any], snapshots: list[ShardSnapshot]
    ) -> list[Any]:
        """The configuration the checkpoint ran with (``_restore_config``), then the calls that
        give every shard those rules, offers and reference tables, and its snapshot."""
        self._restore_config(document)
        ran_with = {s.reference_version for s in snapshots} - {"", self.reference.version}
        if ran_with:
            log.warning("the shards ran with reference data %s; restored with %s (the files "
                        "were edited since)", sorted(ran_with), self.reference.version)  # fmt: skip
        rules, offers = dict(self.rules.document), self.catalog
        document_of_offers = dict(offers.document) if offers else None
        return [
            call
            for shard, snapshot in zip(self.shards, snapshots, strict=True)
            for call in (
                shard.set_rules.remote(rules),  # a restarted shard has its first rules
                shard.set_catalog.remote(document_of_offers),
                shard.set_reference.remote(self.reference),
                shard.restore.remote(snapshot),
            )
        ]

    def _restore_config(self, document: Mapping[str, Any]) -> None:
        """The rules, offers and reference tables running at the checkpoint (set at run time,
        maybe), unless this process started from other ones (edited files win; see
        ``restored_config``)."""
        rules = restored_config(document, "rules", self._started_from["rules"])
        offers = restored_config(document, "offers", self._started_from["offers"])
        recorded = document.get("config", {})
        for name, restored in (("rules", rules), ("offers", offers)):
            if restored is None and (recorded.get(name) or {}).get("document") is not None:
                log.warning("the %s files were edited since the checkpointed run started: "
                            "they replace the %s it ran with", name, name)  # fmt: skip
        tables = restored_config(document, "reference", self._started_from["reference"])
        try:
            if tables is not None:
                reference = ReferenceData.from_document(tables)
                if reference.version != self.reference.version:
                    self.reference = reference
        except ReferenceDataError as exc:
            log.error("the checkpoint's reference data is not valid here; using the files: %s",
                      exc)  # fmt: skip
        try:
            if rules is not None and rules != dict(self.rules.document):
                self.rules = parse_rules(rules, "the checkpoint's rules")
                self.ingestor.listen(self.rules.listening)
            running = dict(self.catalog.document) if self.catalog is not None else None
            if running is not None and offers is not None and offers != running:
                self.catalog = parse_catalog(offers, "the checkpoint's offers")
        except (RuleError, CatalogError) as exc:  # written by another version: say so, go on
            log.error("the checkpoint's configuration is not valid here; using the files: %s",
                      exc)  # fmt: skip

    def _incarnations(self, timeout_s: float) -> list[str]:
        stats = self._call_all(lambda: [s.stats.remote() for s in self.shards], timeout_s)
        return [str(s["incarnation"]) for s in stats]

    def _wait_for_actors(self, timeout_s: float) -> None:
        """Replace dead shards (by a spare, else a new actor) and wait for every actor. At
        the first start a shard still starting is waited for up to ``timeout_s`` (on a busy
        small machine starting seven actors takes more than the 10 s a running one has to
        answer before it is taken for hung), and so is the loading of the code their rules
        need (``ShardActor.loaded``), which each does in the background; spares load theirs
        meanwhile, not waited for (a service is ready sooner)."""
        self._replace_dead_shards(10.0 if self._started_once else timeout_s)
        self._call_all(
            lambda: (
                [a.rows.remote() for a in self._sink_actors]
                + [s.stats.remote() for s in self.shards]
            ),
            timeout_s,
        )
        if not self._started_once:  # the first step loads nothing (spares load meanwhile)
            self._call_all(lambda: [s.loaded.remote() for s in self.shards], timeout_s)
        self._started_once = True
        self._refill_spares()

    _started_once = False

    def _replace_dead_shards(self, timeout_s: float = 10.0) -> None:
        pings = [s.stats.remote() for s in self.shards]
        for i, ping in enumerate(pings):
            try:
                ray.get(ping, timeout=timeout_s)
                continue
            except ray.exceptions.GetTimeoutError:
                ray.kill(self.shards[i])  # hung: replaced like a dead one
            except _LOST:
                pass
            spare = None
            while self.spares and spare is None:
                spare = self.spares.pop(0)
                try:  # a started spare answers at once; one still starting is waited for
                    ray.get(spare.reassign.remote(i, self.ingestor.shard_map.range_of(i)))
                except _LOST:
                    spare = None
            self.shards[i] = spare if spare is not None else self._new_shard(i)
            self.generation += 1
            log.warning("shard %d was lost; %s took over", i, "a spare" if spare else "a new actor")
        if self._started_once or not self._spares_after_start:
            self._refill_spares()

    def _refill_spares(self) -> None:
        """Start spare shards up to ``spares_wanted``; they start in the background."""
        while len(self.spares) < self.spares_wanted:
            self.spares.append(self._new_shard(0, spare=True))

    @staticmethod
    def _call_all(calls: Callable[[], list[Any]], timeout_s: float) -> list[Any]:
        """ray.get of ``calls()``, made again while an actor is still restarting."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return list(ray.get(calls(), timeout=max(deadline - time.monotonic(), 0.1)))
            except (*_LOST, ray.exceptions.GetTimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise WorkerLostError(f"actors did not come back: {exc}"[:500]) from exc
                time.sleep(0.1)

    # -- plain checkpoints (no pipeline) -------------------------------------------------------
    def restore(self, root: str) -> int:
        """Restore the CURRENT checkpoint under ``root``, on as many shards as this engine has
        (a checkpoint of another shard count is rescaled by key group), with the rules, offers
        and reference tables it ran with (``_restore_config``). Returns the customers."""
        document, snapshots = read_checkpoint(root)
        ranges = [self.ingestor.shard_map.range_of(i) for i in range(len(self.shards))]
        if [tuple(s.key_range) for s in snapshots] != ranges:
            snapshots = rescale(snapshots, ranges, self.settings.key_groups)
        self.ingestor.resume(document["position"])
        ray.get(self._restore_calls(document, snapshots))
        return sum(int(s["customers"]) for s in self.shard_stats())

    def shutdown(self) -> None:
        sinks = [a for a in (self.sink, self.decision_sink) if a is not None]
        for actor in [*self.shards, *self.spares, *sinks]:
            ray.kill(actor)
