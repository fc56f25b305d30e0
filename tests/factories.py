"""Factories shared by tests: real XGBoost models trained on generated feature rows."""

from __future__ import annotations

import numpy as np

from engine.decision.features import CONTEXT_FIELDS, FeatureSpec, build_features
from models.registry import ModelArtifact, ModelRegistry
from models.training import fit

SPEC = FeatureSpec(("away", "cap80"), ("pass", "roam", "upgrade"))


def generated_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows in SPEC's layout and the true acceptance probability of each."""
    rng = np.random.default_rng(seed)
    context = {name: rng.uniform(0, 100, n).astype(np.float32) for name in CONTEXT_FIELDS}
    context["days_left"] = rng.uniform(0, 30, n).astype(np.float32)
    triggers = rng.choice(np.array(SPEC.triggers, dtype=object), n)
    offers = rng.choice(np.array(SPEC.offers, dtype=object), n)
    x = build_features(context, triggers, offers, SPEC)
    p = np.where(offers == "upgrade", context["days_left"] / 40, 0.1 + context["pct_of_cap"] / 250)
    return x, p.astype(np.float32)


def trained_model(registry: ModelRegistry, seed: int = 0, invert: bool = False) -> ModelArtifact:
    """Register a booster trained on generated rows; ``invert`` learns the opposite labels."""
    x, p = generated_rows(20_000, seed)
    rng = np.random.default_rng(seed + 1)
    y = (rng.random(p.size) < (1 - p if invert else p)).astype(np.float32)
    booster = fit(x, y, SPEC.names, rounds=30, seed=seed)
    return registry.register(booster, SPEC.names, {"seed": seed, "invert": invert})
