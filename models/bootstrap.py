"""A first champion for a fresh registry: trained on a short simulated warm-up log.

A new deployment has no decision log yet. Rather than serve an untrained model, the ranker
starts from one trained (real XGBoost, the normal training round) on the log of a small
simulated population run under the exploring warm-up policy; the closed loop replaces it as
soon as real outcomes beat it through the promotion gate.
"""

from __future__ import annotations

import pyarrow as pa

from engine.decision.catalog import Catalog
from engine.decision.features import feature_spec
from engine.rules.spec import RuleSet
from engine.units import DAY_MS
from models.promotion import train_round
from models.registry import ModelRegistry
from models.simulate import Simulation, SimulationConfig


def ensure_champion(
    registry: ModelRegistry,
    rules: RuleSet,
    catalog: Catalog,
    customers: int = 3_000,
    days: int = 16,
    seed: int = 5,
) -> str:
    """The registry's champion version, training and promoting a bootstrap one if it has none
    (or if the champion was trained for other features: a catalog with other offers or
    triggers)."""
    existing = registry.champion()
    names = feature_spec(catalog.trigger_ids, catalog.offer_ids).names
    if existing and registry.load(existing).feature_names == tuple(names):
        return existing
    config = SimulationConfig(customers=customers, days=days, warmup_days=days, seed=seed)
    sim = Simulation(config, rules, catalog, registry.uri)
    run = sim.run("kairos")  # warm-up policy throughout: prior scores, exploration
    result = train_round(
        pa.concat_tables(run.decisions),
        pa.concat_tables(run.responses),
        catalog,
        registry,
        sim.t0 + days * DAY_MS,
    )
    if result.artifact is None:
        raise RuntimeError(f"bootstrap training failed: {result.reason}")
    registry.set_champion(result.artifact.version)
    return result.artifact.version
