"""One training round: training set -> model -> holdout metrics -> off-policy gate -> registry.

A candidate is promoted only if it is confidently better than the champion: the lower bound of
the 95 % interval of its doubly robust gain over the champion, paired on the same held-out
decisions, is above zero (with no champion yet, the gain is over the logging policy's own
rewards). Refused candidates stay in the registry with status ``refused`` and the numbers
that refused them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xgboost as xgb

from engine.decision.catalog import Catalog
from engine.decision.features import FeatureSpec, feature_spec
from models.offpolicy import (
    Predict,
    dr_terms,
    estimate_from_terms,
    logged_bandit,
    logged_value,
    mean_interval,
)
from models.ranker import predictor
from models.registry import ModelArtifact, ModelRegistry
from models.training import (
    classification_metrics,
    fit,
    outcomes,
    recency_weights,
    time_split,
    training_set,
)


@dataclass
class TrainResult:
    artifact: ModelArtifact | None
    promoted: bool
    reason: str
    metrics: dict[str, Any]


def train_round(
    decisions: pa.Table,
    responses: pa.Table,
    catalog: Catalog,
    registry: ModelRegistry,
    cutoff_ms: int,
    holdout: float = 0.25,
    min_rows: int = 200,
    shuffle_labels: bool = False,
    seed: int = 0,
    half_life_days: float | None = 7.0,
) -> TrainResult:
    """Train on outcomes known at ``cutoff_ms``, judge on the latest ``holdout`` share of time."""
    spec: FeatureSpec = feature_spec(catalog.trigger_ids, catalog.offer_ids)
    window = catalog.policy.attribution_window_ms
    data = training_set(decisions, responses, cutoff_ms, window, spec)
    if data.labels.size < min_rows or data.labels.min() == data.labels.max():
        return TrainResult(None, False, f"not enough outcomes yet ({data.labels.size} rows)", {})
    train_rows, test_rows = time_split(data.ts, holdout)
    labels = data.labels.copy()
    if shuffle_labels:  # a deliberately useless model, for testing the gate
        labels = np.random.default_rng(seed).permutation(labels)
    weights = recency_weights(data.ts[train_rows], cutoff_ms, half_life_days)
    booster = fit(
        data.features[train_rows], labels[train_rows], spec.names, seed=seed, weights=weights
    )
    p_test = booster.inplace_predict(data.features[test_rows])
    metrics: dict[str, Any] = {
        "holdout": classification_metrics(data.labels[test_rows], np.asarray(p_test)),
        "train_rows": int(train_rows.size),
        "cutoff_ms": int(cutoff_ms),
        "shuffled_labels": shuffle_labels,
        "half_life_days": half_life_days,
    }
    # off-policy: every non-control decision of the holdout period with a known outcome
    boundary = float(data.ts[test_rows].min()) if test_rows.size else float(cutoff_ms)
    ts = decisions.column("ts").cast(pa.int64()).to_numpy()
    control = np.asarray(decisions.column("control").to_numpy(zero_copy_only=False), bool)
    known, accepted = outcomes(decisions, responses, cutoff_ms, window)
    rows = np.flatnonzero(known & ~control & (ts >= boundary))
    log = logged_bandit(decisions.take(pa.array(rows)), accepted[rows], catalog)
    # each policy's DR terms once: the candidate's estimate, the champion's, and their paired
    # difference (or the gain over what the logging policy earned) all come from them
    terms, weights = dr_terms(log, _predict(booster), spec)
    candidate = estimate_from_terms(log, terms, weights)
    champion_version = registry.champion()
    if champion_version:
        predict_champion = predictor(registry.load(champion_version), spec.names)
        champion_terms, _ = dr_terms(log, predict_champion, spec)
        baseline = mean_interval(champion_terms)
        gain = mean_interval(terms - champion_terms)
        against = f"champion {champion_version}"
    else:
        baseline = logged_value(log)
        gain = mean_interval(terms - log.reward)
        against = "the logging policy"
    dr, snips = candidate.dr, candidate.snips
    metrics["offpolicy"] = {
        "decisions": int(log.n),
        "dr": dr.as_dict(),
        "snips": snips.as_dict(),
        "agreement": candidate.agreement,
        "baseline": {"against": against, **baseline.as_dict()},
        "gain": gain.as_dict(),
    }
    promoted = bool(gain.low > 0)
    reason = (
        f"DR gain over {against} {gain.value:+.4f} per decision, 95 % CI lower bound "
        f"{gain.low:+.4f} {'>' if promoted else '<='} 0"
    )
    metrics["gate"] = {"promoted": promoted, "reason": reason}
    artifact = registry.register(booster, spec.names, metrics, parent=champion_version)
    if promoted:
        registry.set_champion(artifact.version)
        artifact.status = "champion"
    else:
        artifact.status = "refused"
        registry.update(artifact)
    return TrainResult(artifact, promoted, reason, metrics)


def _predict(booster: xgb.Booster) -> Predict:
    return lambda x: np.asarray(booster.inplace_predict(x))
