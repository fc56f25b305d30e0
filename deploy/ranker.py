"""Composition of the ranker: a registry's champion deployed on Ray Serve, and its retrainer.

The one place that starts a ranker (CLI, job, service, benchmarks): ``start_ranker`` deploys
the registry's champion, training a first one on a simulated warm-up log when the registry
has none. The gateway actor gets these as callables (``functools.partial``), so ``actors``
never imports ``models``.
"""

from __future__ import annotations

from typing import Any

from engine.decision.catalog import Catalog
from engine.rules.spec import RuleSet


def start_ranker(
    registry_uri: str,
    rules: RuleSet | None = None,
    catalog: Catalog | None = None,
    *,
    version: str | None = None,
    replicas: int = 1,
    num_cpus: float = 0.25,
) -> str:
    """Deploy the ranker application serving ``version`` (default: the registry's champion,
    bootstrapped from ``rules`` and ``catalog`` when there is none); returns the version.
    A running ranker with the same configuration is left alone."""
    from models.deployment import apply_apps

    version, entry = ranker_entry(
        registry_uri, rules, catalog, version=version, replicas=replicas, num_cpus=num_cpus
    )
    apply_apps([entry])
    return version


def ranker_entry(
    registry_uri: str,
    rules: RuleSet | None = None,
    catalog: Catalog | None = None,
    *,
    version: str | None = None,
    replicas: int = 1,
    num_cpus: float = 0.25,
) -> tuple[str, dict[str, Any]]:
    """The version ``start_ranker`` would serve and the ranker's Serve config entry, without
    deploying it: ``kairos serve`` applies it together with the API application, so the
    ranker builds and starts beside the API replicas instead of after the gateway asks."""
    from engine.decision.features import feature_spec
    from engine.errors import ConfigError
    from models.bootstrap import ensure_champion
    from models.deployment import ranker_app_config
    from models.ranker import RankerConfig
    from models.registry import ModelRegistry

    registry = ModelRegistry(registry_uri)
    if version is None:
        if rules is None or catalog is None:
            raise ValueError("bootstrapping a champion needs the rules and the catalog")
        version = ensure_champion(registry, rules, catalog)
    elif catalog is not None:  # a pinned version must score this catalog's features
        names = feature_spec(catalog.trigger_ids, catalog.offer_ids).names
        if registry.load(version).feature_names != tuple(names):
            raise ConfigError(f"model {version} was trained for another catalog's features")
    config = RankerConfig(registry=registry.uri, champion=version)
    return version, ranker_app_config(config, replicas, num_cpus)


def make_retrainer(registry_uri: str, every: int, supervisor: Any, catalog: Catalog) -> Any:
    """A ``deploy.retraining.Retrainer`` for a running engine: every ``every`` new offer
    responses it trains a candidate and swaps a winner into the ranker."""
    from deploy.retraining import Retrainer
    from models.registry import ModelRegistry

    return Retrainer(supervisor, ModelRegistry(registry_uri), catalog, every=every)
