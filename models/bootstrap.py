"""A first champion for a fresh registry: trained on a short simulated warm-up log.

A new deployment has no decision log yet. Rather than serve an untrained model, the ranker
starts from one trained (real XGBoost, the normal training round) on the log of a small
simulated population run under the exploring warm-up policy; the closed loop replaces it as
soon as real outcomes beat it through the promotion gate.

That training takes 6 s alone and about 18 s while the rest of a service starts on a 2-core
machine, so the models for the shipped rules and offers come with Kairos (``models/shipped``,
one file per key: a digest of the rules, the offers and the training settings); a service
with other rules or offers trains its own. Regenerate them after changing the shipped
configuration: ``python -m models.bootstrap deploy/config/rules.yaml deploy/config/offers.yaml``
(a unit test fails until then).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import xgboost as xgb

from engine.decision.catalog import Catalog
from engine.decision.features import FEATURE_SET_VERSION, feature_spec
from engine.rules.spec import RuleSet
from engine.units import DAY_MS
from models.promotion import train_round
from models.registry import ModelRegistry
from models.simulate import Simulation, SimulationConfig

#: bootstrap models trained for the shipped configuration, by ``bootstrap_key``
SHIPPED = Path(__file__).with_name("shipped")


def bootstrap_key(rules: RuleSet, catalog: Catalog, customers: int, days: int, seed: int) -> str:
    """What a bootstrap model depends on, as a digest: the rules, the offers, the settings."""
    document = {
        "rules": rules.document,
        "offers": catalog.document,
        "customers": customers,
        "days": days,
        "seed": seed,
        "feature_set": FEATURE_SET_VERSION,
    }
    text = json.dumps(document, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def ensure_champion(
    registry: ModelRegistry,
    rules: RuleSet,
    catalog: Catalog,
    customers: int = 3_000,
    days: int = 16,
    seed: int = 5,
) -> str:
    """The registry's champion version; if it has none (or one trained for other features: a
    catalog with other offers or triggers), the shipped bootstrap model for this rules and
    offers, else one trained now, registered and promoted."""
    existing = registry.champion()
    names = feature_spec(catalog.trigger_ids, catalog.offer_ids).names
    if existing and registry.load(existing).feature_names == tuple(names):
        return existing
    shipped = SHIPPED / f"{bootstrap_key(rules, catalog, customers, days, seed)}.json"
    if shipped.exists():
        document = json.loads(shipped.read_text())
        booster = xgb.Booster()
        booster.load_model(bytearray(document["model"].encode()))
        artifact = registry.register(
            booster, tuple(document["feature_names"]), {**document["metrics"], "shipped": True}
        )
    else:
        artifact = _train(registry, rules, catalog, customers, days, seed)
    registry.set_champion(artifact.version)
    return artifact.version


def _train(
    registry: ModelRegistry, rules: RuleSet, catalog: Catalog, customers: int, days: int, seed: int
) -> Any:
    """A bootstrap model trained now on a simulated warm-up log, registered (a candidate)."""
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
    return result.artifact


def export_shipped(
    rules: RuleSet, catalog: Catalog, customers: int = 3_000, days: int = 16, seed: int = 5
) -> Path:
    """Train the bootstrap model for ``rules`` and ``catalog`` and write it under ``SHIPPED``."""
    with tempfile.TemporaryDirectory() as folder:
        artifact = _train(ModelRegistry(folder), rules, catalog, customers, days, seed)
    SHIPPED.mkdir(exist_ok=True)
    path = SHIPPED / f"{bootstrap_key(rules, catalog, customers, days, seed)}.json"
    document = {
        "feature_names": list(artifact.feature_names),
        "metrics": artifact.metrics,
        "model": bytes(artifact.booster.save_raw(raw_format="json")).decode(),
    }
    path.write_text(json.dumps(document, default=float))
    return path


if __name__ == "__main__":  # python -m models.bootstrap RULES OFFERS
    from engine.decision.catalog import load_catalog
    from engine.rules.spec import load_rules

    print(export_shipped(load_rules(sys.argv[1]), load_catalog(sys.argv[2])))
