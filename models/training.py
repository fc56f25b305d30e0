"""Training the ranker from the decision log joined with outcomes, and judging it.

A training row is a delivered offer whose attribution window closed before the training
cutoff: accepted (label 1) if an ``accepted`` response with its decision id arrived within
the window; declined or ignored (label 0) otherwise. Offers whose window is still open at the
cutoff are left out, even if already accepted (keeping them would keep early acceptances but
not the refusals still to come, and bias the labels), and nothing that happened after the
cutoff is read: no leakage. Features are rebuilt from the
logged context with the serving feature builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xgboost as xgb

from engine.decision.catalog import NO_ACTION
from engine.decision.features import (
    CONTEXT_FIELDS,
    CONTEXT_PREFIX,
    FeatureSpec,
    build_features,
)
from engine.decision.log import decision_id_text
from engine.units import DAY_MS

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "eval_metric": "logloss",
    "max_depth": 5,
    "eta": 0.1,
    "min_child_weight": 5,
    "subsample": 0.9,
    "colsample_bytree": 0.9,
    "nthread": 1,
    "verbosity": 0,
}


def _ms(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def accepted_at(decisions: pa.Table, responses: pa.Table, cutoff_ms: int) -> np.ndarray:
    """Per decision: the event time of its first acceptance before the cutoff, or -1.

    ``responses`` holds offer_response events with at least decision_id, response and ts.
    """
    accept_ts = np.full(decisions.num_rows, -1, dtype=np.int64)
    if responses.num_rows == 0 or decisions.num_rows == 0:
        return accept_ts
    ts = _ms(responses.column("ts"))
    keep = (ts <= cutoff_ms) & np.asarray(
        pc.equal(responses.column("response"), "accepted")
        .fill_null(False)
        .to_numpy(zero_copy_only=False),
        dtype=bool,
    )
    ids = np.asarray(responses.column("decision_id").to_numpy(zero_copy_only=False))[keep]
    times = ts[keep]
    first: dict[str, int] = {}
    for d, t in zip(ids.tolist(), times.tolist(), strict=True):
        if d not in first or t < first[d]:
            first[d] = t
    wanted = decision_id_text(decisions.column("decision_id").to_numpy())
    for i, d in enumerate(wanted):
        accept_ts[i] = first.get(d, -1)
    return accept_ts


@dataclass
class TrainingSet:
    features: np.ndarray
    labels: np.ndarray
    ts: np.ndarray  # decision time, for the time-based holdout
    decisions: pa.Table  # the rows they came from


def outcomes(
    decisions: pa.Table, responses: pa.Table, cutoff_ms: int, window_ms: int
) -> tuple[np.ndarray, np.ndarray]:
    """(known, accepted) per decision: outcome known at the cutoff, and if so accepted."""
    ts = _ms(decisions.column("ts"))
    after = _ms(decisions.column("deliver_after"))
    accept_ts = accepted_at(decisions, responses, cutoff_ms)
    accepted = (accept_ts >= 0) & (accept_ts <= after + window_ms)
    # only decisions whose window has closed: counting early acceptances of still-open
    # windows, but not their still-possible refusals, would bias the labels upwards
    known = after + window_ms <= cutoff_ms
    return known & (ts <= cutoff_ms), accepted


def training_set(
    decisions: pa.Table,
    responses: pa.Table,
    cutoff_ms: int,
    window_ms: int,
    spec: FeatureSpec,
) -> TrainingSet:
    """Rows of delivered offers with a known outcome at ``cutoff_ms``."""
    delivered = np.asarray(decisions.column("delivered").to_numpy(zero_copy_only=False), bool)
    offer = np.asarray(decisions.column("action").to_numpy(zero_copy_only=False)) != NO_ACTION
    known, accepted = outcomes(decisions, responses, cutoff_ms, window_ms)
    rows = np.flatnonzero(delivered & offer & known)
    table = decisions.take(pa.array(rows))
    return TrainingSet(
        features=features_of(table, spec),
        labels=accepted[rows].astype(np.float32),
        ts=_ms(table.column("ts")),
        decisions=table,
    )


def context_of(decisions: pa.Table) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(
            decisions.column(CONTEXT_PREFIX + name).to_numpy(zero_copy_only=False),
            dtype=np.float32,
        )
        for name in CONTEXT_FIELDS
    }


def features_of(
    decisions: pa.Table, spec: FeatureSpec, offers: np.ndarray | None = None
) -> np.ndarray:
    """Feature rows of logged decisions with their chosen action (or ``offers``, one each)."""
    chosen = np.asarray(decisions.column("action").to_numpy(zero_copy_only=False), dtype=object)
    return build_features(
        context_of(decisions),
        np.asarray(decisions.column("rule_id").to_numpy(zero_copy_only=False), dtype=object),
        chosen if offers is None else offers,
        spec,
    )


def fit(
    features: np.ndarray,
    labels: np.ndarray,
    names: tuple[str, ...],
    rounds: int = 150,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> xgb.Booster:
    """A binary:logistic booster on ``features``; deterministic for a seed."""
    dtrain = xgb.DMatrix(features, label=labels, weight=weights, feature_names=list(names))
    return xgb.train({**DEFAULT_PARAMS, **(params or {}), "seed": seed}, dtrain, rounds)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic, ties averaged); NaN with one class only."""
    y = np.asarray(labels) > 0.5
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def log_loss(labels: np.ndarray, p: np.ndarray) -> float:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(q) + (1 - labels) * np.log(1 - q)))


def calibration_error(labels: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-width probability bins."""
    if len(p) == 0:
        return float("nan")
    which = np.minimum((np.asarray(p) * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(float(labels[mask].mean()) - float(p[mask].mean()))
    return total / len(p)


def classification_metrics(labels: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(labels, p),
        "log_loss": log_loss(labels, p),
        "calibration_error": calibration_error(labels, p),
        "rows": float(len(labels)),
        "positive_rate": float(np.mean(labels)) if len(labels) else float("nan"),
    }


def recency_weights(ts: np.ndarray, cutoff_ms: int, half_life_days: float | None) -> np.ndarray:
    """Sample weights halving every ``half_life_days`` of age at the cutoff (all 1 if None).

    Who a moment reaches drifts (cooldowns hold back recent takers, fatigue builds up, the
    mix of customers crossing a threshold changes through the billing cycle), so recent
    outcomes say more about the next decisions than old ones.
    """
    if half_life_days is None:
        return np.ones(ts.size)
    age_days = np.maximum(cutoff_ms - ts, 0) / DAY_MS
    return np.asarray(0.5 ** (age_days / half_life_days))


def time_split(ts: np.ndarray, holdout: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, holdout rows): the latest ``holdout`` share of decision times is held out."""
    if ts.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    boundary = np.quantile(ts, 1 - holdout)
    return np.flatnonzero(ts < boundary), np.flatnonzero(ts >= boundary)
