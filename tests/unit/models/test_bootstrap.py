"""The bootstrap champion: shipped for the shipped rules and offers, trained for any other."""

from __future__ import annotations

import numpy as np
import xgboost as xgb
import yaml

from deploy.paths import DEFAULT_OFFERS, DEFAULT_RULES
from engine.decision.catalog import load_catalog, parse_catalog_text
from engine.decision.features import feature_spec
from engine.rules.spec import load_rules
from models.bootstrap import SHIPPED, bootstrap_key, ensure_champion
from models.registry import ModelRegistry


def test_the_shipped_configuration_has_its_bootstrap_model(tmp_path) -> None:
    """A fresh registry with the shipped rules and offers gets the shipped model as its
    champion at once (no training: the service is ready sooner). This fails after the shipped
    rules or offers change until ``python -m models.bootstrap`` wrote the model for them."""
    rules, catalog = load_rules(DEFAULT_RULES), load_catalog(DEFAULT_OFFERS)
    key = bootstrap_key(rules, catalog, 3_000, 16, 5)
    assert (SHIPPED / f"{key}.json").exists(), (
        "no shipped bootstrap model for deploy/config: run "
        "python -m models.bootstrap deploy/config/rules.yaml deploy/config/offers.yaml"
    )
    registry = ModelRegistry(str(tmp_path / "models"))
    version = ensure_champion(registry, rules, catalog)
    champion = registry.load(version)
    names = feature_spec(catalog.trigger_ids, catalog.offer_ids).names
    assert registry.champion() == version and champion.metrics["shipped"] is True
    assert champion.feature_names == tuple(names)
    rows = np.zeros((4, len(names)), dtype=np.float32)
    scores = champion.booster.predict(xgb.DMatrix(rows, feature_names=list(names)))
    assert scores.shape == (4,) and ((scores > 0) & (scores < 1)).all()
    assert ensure_champion(registry, rules, catalog) == version  # kept, not registered again


def test_other_offers_or_settings_do_not_get_the_shipped_model() -> None:
    rules, catalog = load_rules(DEFAULT_RULES), load_catalog(DEFAULT_OFFERS)
    shipped = bootstrap_key(rules, catalog, 3_000, 16, 5)
    document = dict(catalog.document)
    document["offers"] = document["offers"][:-1]
    fewer = parse_catalog_text(yaml.safe_dump(document))
    assert bootstrap_key(rules, fewer, 3_000, 16, 5) != shipped
    assert bootstrap_key(rules, catalog, 3_000, 16, 6) != shipped
    assert not (SHIPPED / f"{bootstrap_key(rules, fewer, 3_000, 16, 5)}.json").exists()


def test_serve_applies_the_ranker_entry_the_gateway_asks_for_next(tmp_path) -> None:
    """`kairos serve` applies the ranker's entry together with the API's, so the ranker builds
    and starts beside the API replicas; the gateway's starter then computes the same entry
    (the same champion, replicas and CPUs), which Serve leaves as it is."""
    from deploy.ranker import ranker_entry
    from deploy.service import ServiceConfig

    config = ServiceConfig(data_dir=str(tmp_path))
    [entry] = config.ranker_entries()
    champion = ModelRegistry(config.registry_uri).champion()
    assert champion and entry["deployments"][0]["user_config"]["champion"] == champion
    assert entry["deployments"][0]["ray_actor_options"] == {"num_cpus": config.ranker_cpus}
    rules, catalog = load_rules(config.rules), load_catalog(str(config.offers))
    starter = config.ranker_starter()  # what the gateway calls: start_ranker(registry, ...)
    assert starter.args == (config.registry_uri,) and starter.keywords == {
        "num_cpus": config.ranker_cpus
    }
    version, again = ranker_entry(*starter.args, rules, catalog, **starter.keywords)
    assert (version, again) == (champion, entry)
    assert ServiceConfig(data_dir=str(tmp_path), offers=None).ranker_entries() == []
