"""One training round: training set -> model -> holdout metrics -> off-policy gate -> registry.

Two kinds of round:

* ``train_round`` (a response model, P(convert | offer)): promoted only if it is confidently
  better than the champion: the lower bound of the 95 % interval of its doubly robust gain
  over the champion, paired on the same held-out decisions, is above zero (with no champion
  yet, the gain is over the logging policy's own rewards);
* ``uplift_round`` (an uplift model, ``models.uplift.TLearner``): the same, on incremental
  value (``models.incremental``): the DR gain of its policy over the champion's in what the
  customers did beyond what they would have done anyway, with a one-sided 95 % bound, so a
  model no better than the champion is promoted in at most 5 % of rounds; nor is a model
  whose own incremental value the holdout puts confidently below contacting no one (then the
  model silenced, sending nothing but exploration, replaces a champion that loses money:
  ``models.incremental.judge``). Before the gate,
  each offer's place in the model's policy must earn more, on the training period, than the
  same policy without it (``screen_offers``), or the model does not send it.

Refused candidates stay in the registry with status ``refused`` and the numbers that refused
them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import xgboost as xgb

from engine.decision.catalog import Catalog
from engine.decision.features import FeatureSpec, feature_spec
from engine.decision.log import randomization_cost
from engine.governance.pseudonym import Pseudonymizer
from models.attribution import attribute
from models.incremental import (
    incremental_log,
    judge,
    pair_features,
    screen_offers,
    silenced_lines,
)
from models.offpolicy import (
    Predict,
    dr_terms,
    estimate_from_terms,
    logged_bandit,
    logged_value,
    mean_interval,
)
from models.ranker import predictor, uplift_predictor
from models.registry import ModelArtifact, ModelRegistry
from models.training import (
    calibration_error,
    classification_metrics,
    fit,
    outcomes,
    recency_weights,
    time_split,
    training_set,
)
from models.uplift import fit_t_learner, qini, randomized, uplift_rows

#: trees per booster of an uplift model: its three boosters score at the cost of one response
#: model of 150 trees (in the true value of their choices, 50 and 150 trees calibrated are
#: within each other's noise: docs/benchmarks.md, "Which uplift learner decides best")
UPLIFT_ROUNDS = 50


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
    return _decide(registry, artifact, promoted, reason, metrics)


def _decide(
    registry: ModelRegistry,
    artifact: ModelArtifact,
    promoted: bool,
    reason: str,
    metrics: dict[str, Any],
) -> TrainResult:
    """A registered candidate becomes the champion, or stays as ``refused``."""
    if promoted:
        registry.set_champion(artifact.version)
        artifact.status = "champion"
    else:
        artifact.status = "refused"
        registry.update(artifact)
    return TrainResult(artifact, promoted, reason, metrics)


def _predict(booster: xgb.Booster) -> Predict:
    return lambda x: np.asarray(booster.inplace_predict(x))


def uplift_round(
    decisions: pa.Table,
    events: pa.Table,
    catalog: Catalog,
    registry: ModelRegistry,
    cutoff_ms: int,
    pseudonymizer: Pseudonymizer | None = None,
    holdout: float = 0.25,
    min_rows: int = 50,
    shuffle_labels: bool = False,
    seed: int = 0,
    rounds: int = UPLIFT_ROUNDS,
    calibrate: bool = True,
) -> TrainResult:
    """Train a T-learner on the decisions whose attribution windows closed by ``cutoff_ms``
    before the latest ``holdout`` share of time; judge it on the rest: Qini / AUUC on the
    control group's experiment, calibration of its three probabilities, and the gate on DR
    incremental value against the champion (any kind: a response champion's policy is the
    response objective's) or, with none, against the policy that logged the decisions.

    ``events``: every event that may convert or opt out (the engine's outcome log, or a
    simulator's events), by identifier (pseudonymized with ``pseudonymizer``) or key.
    ``calibrate``: recalibrate the model's uplift per offer (``models.uplift``), then screen
    the offers (``models.incremental.screen_offers``): on the training period, out of fold,
    an offer whose place in the model's policy is not estimated to earn more than the same
    policy without it is scored at no uplift, so the model does not send it."""
    spec: FeatureSpec = feature_spec(catalog.trigger_ids, catalog.offer_ids)
    pairs = attribute(decisions, events, catalog, cutoff_ms, pseudonymizer)
    data = uplift_rows(decisions, pairs, spec)
    if data.ts.size == 0:
        return TrainResult(None, False, "no decision with a closed attribution window yet", {})
    boundary = float(np.quantile(data.ts, 1 - holdout))
    train = data.take(np.flatnonzero(data.ts < boundary))
    test = data.take(np.flatnonzero(data.ts >= boundary))
    arms = {"treated": int(train.treated.sum()), "untreated": int((~train.treated).sum())}
    if min(arms.values()) < min_rows:
        return TrainResult(None, False, f"not enough rows of both arms yet ({arms})", {})
    rng = np.random.default_rng(seed)
    if shuffle_labels:  # a deliberately useless model, for testing the gate
        train = replace(train, converted=rng.permutation(train.converted),
                        opted_out=rng.permutation(train.opted_out))  # fmt: skip
    model = fit_t_learner(train, spec.names, rounds=rounds, seed=seed, calibrate=calibrate)
    log = incremental_log(decisions, pairs, catalog)
    ts = decisions.column("ts").cast(pa.int64()).to_numpy()
    screened: dict[str, Any] = {}
    if model.folds:  # which offers the training period shows worth sending (out of fold)
        seen = log.take(np.flatnonzero(ts[log.decision] < boundary))
        if shuffle_labels:  # the screen learns from outcomes too: useless ones here
            seen = replace(seen, reward=rng.permutation(seen.reward))
        keys = decisions.column("customer_key").to_numpy()[seen.decision[seen.pair_row]]
        raw = model.out_of_fold(pair_features(seen, spec), keys)
        model.lines, judged, dropped = screen_offers(seen, raw, model.lines, spec, catalog)
        screened = {o: {**e.as_dict(), "kept": o not in dropped} for o, e in judged.items()}
    p1, p0, p_out = model.predict(test.features)
    t = test.treated
    experiment = randomized(test)
    metrics: dict[str, Any] = {
        "kind": "uplift",
        "train_rows": arms,
        "calibration_lines": {k: list(v) for k, v in model.lines.items()},
        "screened_offers": screened,
        "cutoff_ms": int(cutoff_ms),
        "shuffled_labels": shuffle_labels,
        "holdout": {
            "rows": int(t.size),
            "qini": qini((p1 - p0)[experiment], t[experiment], test.converted[experiment]),
            "calibration_error": {
                "p_convert_offer": calibration_error(test.converted[t], p1[t]),
                "p_convert_no_action": calibration_error(test.converted[~t], p0[~t]),
                "p_opt_out": calibration_error(test.opted_out[t], p_out[t]),
            },
        },
    }
    # what learning cost in the holdout period, by the serving model's expected values
    metrics["randomization"] = randomization_cost(decisions.filter(pa.array(ts >= boundary)))
    # the gate: every usable decision of the holdout period
    log = log.take(np.flatnonzero(ts[log.decision] >= boundary))
    champion_version = registry.champion()
    champion = None
    if champion_version:
        champion = uplift_predictor(registry.load(champion_version), spec.names)
    quiet = replace(model, lines=silenced_lines(catalog))
    against = f"champion {champion_version}" if champion_version else "the logging policy"
    verdict = judge(log, model.predict, quiet.predict, champion, spec, catalog, against)
    if verdict.silenced:
        model = quiet
        metrics["calibration_lines"] = {k: list(v) for k, v in model.lines.items()}
    metrics["gate"] = verdict.metrics
    promoted, reason = verdict.promoted, verdict.reason
    artifact = registry.register(
        model.treated, spec.names, metrics, parent=champion_version,
        uplift=(model.baseline, model.opt_out), lines=model.lines,
    )  # fmt: skip
    return _decide(registry, artifact, promoted, reason, metrics)
