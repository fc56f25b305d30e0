"""Retraining while the engine runs: every N new offer responses, train a candidate from the
decision log and the response log so far; if the promotion gate passes, swap it into the running
ranker through Serve's ``reconfigure()`` (an in-place update: no request is lost).

A catalog whose offers name their conversions gets uplift rounds (``uplift_round``: a
T-learner judged on incremental value; the response log holds the conversions and opt-outs of
every arm); one without gets response rounds (``train_round``)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds

from actors.supervisor import Supervisor
from engine.decision.catalog import Catalog
from engine.decision.log import DECISION_SCHEMA
from engine.decision.response import RESPONSE_SCHEMA
from engine.errors import ConfigError
from models.deployment import deploy_ranker
from models.promotion import TrainResult, train_round, uplift_round
from models.ranker import RankerConfig
from models.registry import ModelRegistry


def _read(uri: str | None, schema: pa.Schema, hive: bool) -> pa.Table:
    if uri is None:
        return schema.empty_table()
    try:  # the schema given: files written before a column was added read it as nulls
        data = ds.dataset(uri, format="parquet", partitioning="hive" if hive else None,
                          schema=schema)  # fmt: skip
    except (FileNotFoundError, OSError):
        return schema.empty_table()
    if not data.files:
        return schema.empty_table()
    return data.to_table(columns=schema.names)


class Retrainer:
    """Watches one running engine's offer responses and keeps its ranker's champion current."""

    def __init__(
        self,
        supervisor: Supervisor,
        registry: ModelRegistry,
        catalog: Catalog,
        every: int = 1_000,
        replicas: int = 1,
        num_cpus: float = 0.25,
        kind: str | None = None,
    ) -> None:
        """``kind``: ``uplift`` or ``response`` rounds (None: uplift when some offer of the
        catalog names its conversion)."""
        if kind not in (None, "uplift", "response"):
            raise ConfigError(f"unknown kind of retraining {kind!r}: uplift or response")
        if supervisor.decision_uri is None or supervisor.response_uri is None:
            raise ConfigError("retraining needs the engine's decision log and response log")
        self.supervisor = supervisor
        self.registry = registry
        self.catalog = catalog
        self.every = every
        self.replicas = replicas
        self.num_cpus = num_cpus
        self.kind = kind
        self.trained_at = 0
        self.history: list[TrainResult] = []

    def set_catalog(self, catalog: Catalog) -> None:
        """Train for this catalog from now on (the running one was swapped)."""
        self.catalog = catalog

    @property
    def uplift(self) -> bool:
        """Whether rounds train uplift models (by default: some offer names its conversion)."""
        if self.kind is not None:
            return self.kind == "uplift"
        return any(o.spec.conversion is not None for o in self.catalog.offers)

    def due(self) -> bool:
        return self.supervisor.router.stats.responses - self.trained_at >= self.every

    def maybe_retrain(self, force: bool = False) -> TrainResult | None:
        """Train when ``every`` new responses arrived (or ``force``); swap the winner in."""
        if not (force or self.due()):
            return None
        router = self.supervisor.router
        self.trained_at = router.stats.responses
        router.drain()
        router.write_logs()
        decisions = _read(self.supervisor.decision_uri, DECISION_SCHEMA, hive=True)
        responses = _read(self.supervisor.response_uri, RESPONSE_SCHEMA, hive=False)
        cutoff = self.supervisor.ingestor.watermark_ms  # event time, as far as it has gone
        round_ = uplift_round if self.uplift else train_round
        result = round_(
            decisions, responses, self.catalog, self.registry, cutoff, seed=len(self.history)
        )
        self.history.append(result)
        if result.promoted and result.artifact is not None:
            config = RankerConfig(registry=self.registry.uri, champion=result.artifact.version)
            deploy_ranker(config, self.replicas, self.num_cpus)
        return result
