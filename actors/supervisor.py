"""Supervisor: creates the shard actors over key-group ranges, the sink and the router.

Also the one place that broadcasts rule changes and coordinates checkpoints across shards
(``checkpoint`` / ``restore``, onto any number of shards).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from actors.router import Router
from actors.runtime import ALLOCATOR_ENV
from actors.shard import ShardActor
from actors.sink import DecisionSinkActor, TriggerSinkActor
from engine.checkpoint import read_checkpoint, rescale, write_checkpoint
from engine.config import EngineSettings
from engine.decision.catalog import Catalog, parse_catalog
from engine.decision.scorer import OfferScorer
from engine.ingest import Ingestor
from engine.rules.spec import RuleSet, parse_rules
from engine.sink import ParquetSink

_WORKER_ENV = {"env_vars": ALLOCATOR_ENV}


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
    ) -> None:
        """``catalog`` and ``scorer`` (e.g. a ServeScorer) switch decisions on; they are
        logged under ``decision_uri`` by day, and offer responses under ``response_uri``.
        ``idle_release_ms``: a live service releases the watermark when input goes quiet."""
        self.settings = settings
        self.rules = rules
        self.catalog = catalog
        self.ingestor = Ingestor(settings)
        document = dict(rules.document)
        offers = dict(catalog.document) if catalog else None
        self.shards = [
            ShardActor.options(
                num_cpus=shard_cpus,
                name=f"{namespace_prefix}-shard-{i}",
                get_if_exists=False,
                runtime_env=_WORKER_ENV,
            ).remote(i, settings, document, self.ingestor.shard_map.range_of(i), offers, scorer)
            for i in range(settings.shards)
        ]
        self.decision_sink = None
        if decision_uri is not None:
            self.decision_sink = DecisionSinkActor.options(
                num_cpus=0.1, name=f"{namespace_prefix}-decisions", runtime_env=_WORKER_ENV
            ).remote(decision_uri)
        self.sink = None
        if trigger_uri is not None:
            self.sink = TriggerSinkActor.options(
                num_cpus=0.1, name=f"{namespace_prefix}-sink", runtime_env=_WORKER_ENV
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
        self.namespace_prefix = namespace_prefix
        self.decision_uri = decision_uri
        self.response_uri = response_uri

    def set_rules(self, document: dict[str, Any], source: str = "rules") -> RuleSet:
        """Validate then swap the rules on every shard between micro-batches; state is kept.

        An invalid document raises RuleError before any shard sees it: the running set stays.
        """
        rules = parse_rules(document, source)
        self.router.drain()
        ray.get([s.set_rules.remote(dict(rules.document)) for s in self.shards])
        self.rules = rules
        return rules

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
        return catalog

    def ready(self) -> list[dict[str, Any]]:
        """Wait until every actor (shards and sinks) has started; returns the shard stats.

        Actor start-up (a process, imports) costs about a second of CPU: a caller that
        measures or streams waits here first, so no start-up competes with the first batches.
        """
        sinks = [a.rows.remote() for a in (self.sink, self.decision_sink) if a is not None]
        stats = self.shard_stats()
        ray.get(sinks)
        return stats

    def shard_stats(self) -> list[dict[str, Any]]:
        return list(ray.get([s.stats.remote() for s in self.shards]))

    def customer(self, customer_id: str) -> dict[str, Any] | None:
        """The golden record of a customer, by external identifier, from its owning shard."""
        key = self.ingestor.pseudonymizer.key_of(customer_id)
        owner = int(self.ingestor.shard_map.shard_of_keys(np.array([key], dtype=np.uint64))[0])
        return ray.get(self.shards[owner].customer.remote(key))  # type: ignore[no-any-return]

    def checkpoint(self, root: str, epoch: int, extra: dict[str, Any] | None = None) -> str:
        """Checkpoint ``epoch`` under ``root``: drain the router (no call in flight: an aligned
        cut of the stream), take every shard's snapshot value, write them with the ingest
        position (``engine.checkpoint``) and make it CURRENT. Returns its folder."""
        self.router.drain()
        snapshots = ray.get([s.snapshot.remote() for s in self.shards])
        position = {"position": self.ingestor.position(), **(extra or {})}
        return write_checkpoint(root, epoch, snapshots, position)

    def restore(self, root: str) -> int:
        """Restore the CURRENT checkpoint under ``root``, on as many shards as this engine has
        (a checkpoint of another shard count is rescaled by key group). Returns the customers."""
        document, snapshots = read_checkpoint(root)
        ranges = [self.ingestor.shard_map.range_of(i) for i in range(len(self.shards))]
        if [tuple(s.key_range) for s in snapshots] != ranges:
            snapshots = rescale(snapshots, ranges, self.settings.key_groups)
        self.ingestor.resume(document["position"])
        restored = ray.get(
            [shard.restore.remote(s) for shard, s in zip(self.shards, snapshots, strict=True)]
        )
        return sum(restored)

    def shutdown(self) -> None:
        sinks = [a for a in (self.sink, self.decision_sink) if a is not None]
        for actor in [*self.shards, *sinks]:
            ray.kill(actor)
