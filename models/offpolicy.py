"""Off-policy evaluation: what would a new model's policy have earned on the logged decisions?

The log holds, per decision, the candidates that were available, the action taken, the
probability the logging policy gave it, and (joined from responses) the reward: the offer's
value if accepted, minus its contact cost if delivered, zero for NO_ACTION. A target policy
is the greedy choice under a model's propensities (highest propensity x value - cost, or
NO_ACTION when none is positive). Two estimators, each with a 95 % interval:

* self-normalized inverse propensity scoring (SNIPS): reweights decisions where the target
  policy agrees with the log; interval by bootstrap;
* doubly robust (DR): the model's own reward prediction, corrected by the IPS-weighted
  residual where the policies agree; interval from the per-decision terms' spread.

The promotion gate uses ``improvement``: the paired DR difference between a candidate and
the champion (or the logging policy) on the same decisions, with its 95 % interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.decision.catalog import NO_ACTION, Catalog
from engine.decision.features import FeatureSpec, build_features
from models.training import context_of

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Estimate:
    value: float  # per decision
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class PolicyEstimate:
    snips: Estimate
    dr: Estimate
    agreement: float  # share of decisions where the target policy takes the logged action


@dataclass
class LoggedBandit:
    """Logged decisions flattened for evaluation."""

    n: int
    rule_ids: np.ndarray
    context: dict[str, np.ndarray]
    cand_row: np.ndarray  # decision of each available candidate
    cand_offer: np.ndarray  # its offer id
    cand_value: np.ndarray
    cand_cost: np.ndarray
    action: np.ndarray  # logged action per decision
    propensity: np.ndarray  # logging probability of that action
    reward: np.ndarray


def logged_bandit(decisions: pa.Table, accepted: np.ndarray, catalog: Catalog) -> LoggedBandit:
    """Flatten ``decisions`` (non-control, outcome known) with ``accepted`` per decision."""
    n = decisions.num_rows
    values = {o.id: o.spec.value for o in catalog.offers}
    costs = {o.id: o.spec.cost for o in catalog.offers}
    cands = decisions.column("candidates").combine_chunks()
    counts = np.diff(cands.offsets.to_numpy())
    flat = cands.flatten()
    avail = flat.field("excluded").is_null().to_numpy(zero_copy_only=False)
    offer = np.asarray(flat.field("offer_id").to_numpy(zero_copy_only=False), dtype=object)
    row = np.repeat(np.arange(n), counts)
    keep = avail & np.isin(offer, list(values))
    action = np.asarray(decisions.column("action").to_numpy(zero_copy_only=False), dtype=object)
    value = np.array([values.get(a, 0.0) for a in action.tolist()])
    cost = np.array([costs.get(a, 0.0) for a in action.tolist()])
    delivered = np.asarray(decisions.column("delivered").to_numpy(zero_copy_only=False), bool)
    reward = np.where(action != NO_ACTION, delivered * (accepted * value - cost), 0.0)
    return LoggedBandit(
        n=n,
        rule_ids=np.asarray(decisions.column("rule_id").to_numpy(zero_copy_only=False), object),
        context=context_of(decisions),
        cand_row=row[keep],
        cand_offer=offer[keep],
        cand_value=np.array([values[o] for o in offer[keep].tolist()]),
        cand_cost=np.array([costs[o] for o in offer[keep].tolist()]),
        action=action,
        propensity=np.asarray(decisions.column("probability").to_numpy(), dtype=np.float64),
        reward=reward,
    )


def greedy(log: LoggedBandit, predict: Predict, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """(target action per decision, model's expected value of the logged action per decision)."""
    r = log.cand_row
    x = build_features(
        {k: v[r] for k, v in log.context.items()}, log.rule_ids[r], log.cand_offer, spec
    )
    p = predict(x) if r.size else np.zeros(0)
    ev = p * log.cand_value - log.cand_cost
    best_ev = np.zeros(log.n)  # NO_ACTION is worth 0
    best = np.full(log.n, NO_ACTION, dtype=object)
    order = np.argsort(-ev, kind="stable")
    seen = np.zeros(log.n, dtype=bool)
    for i in order.tolist():  # candidates are few per decision; highest first wins
        d = r[i]
        if not seen[d]:
            seen[d] = True
            if ev[i] > 0:
                best[d], best_ev[d] = log.cand_offer[i], ev[i]
    q_logged = np.zeros(log.n)
    match = log.cand_offer == log.action[r]
    q_logged[r[match]] = ev[match]
    q_target = best_ev
    return best, np.stack([q_target, q_logged])


def dr_terms(
    log: LoggedBandit, predict: Predict, spec: FeatureSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Per decision: (doubly robust value term, IPS weight) of the greedy policy under
    ``predict``. The mean of the terms is the DR estimate of the policy's value per decision;
    the weight is 1 / logging probability where the policy takes the logged action, else 0."""
    target, q = greedy(log, predict, spec)
    q_target, q_logged = q
    w = (target == log.action) / np.maximum(log.propensity, 1e-6)
    return q_target + w * (log.reward - q_logged), w


NAN = Estimate(float("nan"), float("nan"), float("nan"))


def mean_interval(terms: np.ndarray) -> Estimate:
    """The mean of per-decision ``terms`` with its 95 % interval (NaN with no decision)."""
    if terms.size == 0:
        return NAN
    mean = float(terms.mean())
    half = 1.96 * float(terms.std(ddof=1)) / np.sqrt(terms.size) if terms.size > 1 else np.inf
    return Estimate(mean, mean - half, mean + half)


def evaluate_policy(
    log: LoggedBandit,
    predict: Predict,
    spec: FeatureSpec,
    bootstrap: int = 200,
    seed: int = 0,
) -> PolicyEstimate:
    """SNIPS and DR estimates (value per decision) of the greedy policy under ``predict``."""
    if log.n == 0:
        return PolicyEstimate(NAN, NAN, float("nan"))
    return estimate_from_terms(log, *dr_terms(log, predict, spec), bootstrap, seed)


def estimate_from_terms(
    log: LoggedBandit, terms: np.ndarray, w: np.ndarray, bootstrap: int = 200, seed: int = 0
) -> PolicyEstimate:
    """SNIPS and DR estimates from a policy's ``dr_terms`` (terms, IPS weights) on ``log``."""
    if log.n == 0:
        return PolicyEstimate(NAN, NAN, float("nan"))
    rng = np.random.default_rng(seed)
    snips = float((w * log.reward).sum() / max(w.sum(), 1e-12))
    boots = np.empty(bootstrap)
    for b in range(bootstrap):
        pick = rng.integers(0, log.n, log.n)
        boots[b] = (w[pick] * log.reward[pick]).sum() / max(w[pick].sum(), 1e-12)
    return PolicyEstimate(
        Estimate(snips, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))),
        mean_interval(terms),
        float((w > 0).mean()),
    )


def improvement(
    log: LoggedBandit, candidate: Predict, baseline: Predict | None, spec: FeatureSpec
) -> Estimate:
    """Paired DR estimate, per decision, of the candidate's value minus the baseline's.

    The baseline is another model's greedy policy, or (``None``) the logging policy itself,
    whose value on each decision is the reward it got. Both estimates are taken on the same
    decisions, so their common noise (which customers happened to accept) cancels in the
    difference and the interval is that of the gain, far narrower than the two separate
    intervals: a better model is recognised from fewer decisions, and one no better is not.
    (``train_round`` takes the same difference from terms it has computed already.)
    """
    if log.n == 0:
        return NAN
    cand, _ = dr_terms(log, candidate, spec)
    base = log.reward if baseline is None else dr_terms(log, baseline, spec)[0]
    return mean_interval(cand - base)


def logged_value(log: LoggedBandit) -> Estimate:
    """The logging policy's own average reward per decision, with a 95 % interval."""
    return mean_interval(log.reward)
