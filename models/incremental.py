"""Off-policy evaluation of incremental value: what a model's policy would have earned on the
logged decisions beyond what the customers would have brought anyway.

The reward of a logged decision is everything its customer did in the attribution window,
valued as the engine values it (``models.attribution`` labels each answering offer):

    r = sum over answering offers o of converted_o x (value_o if o was delivered, else
        list value_o) - contact cost (if delivered) - opted out x customer value

A model (``UpliftPredict``: P(convert | offer), P(convert | no action), P(opt-out | contact)
per (decision, offer) row) gives the reward model of every action::

    q(x, NO_ACTION) = sum over answering offers o of P0(o) x list value_o
    q(x, o)         = q(x, NO_ACTION) + incremental expected value of o

where the incremental expected value is the engine's objective (``Catalog.expected_values``).
Its policy is the engine's greedy choice: the available offer of highest incremental expected
value when that is positive, else NO_ACTION. The doubly robust (DR) value of a policy pi on
decision i is ``q(x_i, pi(x_i)) + [pi(x_i) = a_i] / p_i x (r_i - q(x_i, a_i))`` with the logged
action a_i and its logged probability p_i (exploration and the randomized no-action arm make it
less than 1); its mean is unbiased for the policy's value per decision whatever q is, as long as
the logged probabilities are right, and a better q makes it less noisy.

``incremental_gain`` compares two policies on the same decisions with the same q (the
candidate's): their difference is 0 on every decision where both choose the same, so the
interval is that of the gain alone. It also reports each policy's value against never
contacting anyone (the NO_ACTION policy), per decision: its estimated incremental value.

``screen_offers`` asks it of each offer's place in the model's policy, on the training period
with out-of-fold predictions: does the policy earn more with the offer than the same policy
without it (which sends the next best offer, or nothing, there)? An offer that is not
estimated to is not sent by the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.decision.catalog import NO_ACTION, Catalog
from engine.decision.features import FeatureSpec, build_features
from models.offpolicy import NAN, Estimate
from models.training import context_of
from models.uplift import Lines, calibrate

#: feature rows -> (P(convert | offer), P(convert | no action), P(opt-out | contact)); a
#: response model answers NaN for the last two (then its policy is the response objective's)
UpliftPredict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
#: the one-sided level of the promotion gate: a candidate no better than the champion is
#: promoted in at most this share of rounds
GATE_LEVEL = 0.05
_Z_ONE_SIDED = 1.6448536269514722  # the standard normal's 95 % quantile


@dataclass(frozen=True)
class IncrementalLog:
    """Logged decisions (non-control, every answering offer's window closed), flattened."""

    n: int
    decision: np.ndarray  # each decision's row in the logged decisions table
    rule_ids: np.ndarray
    context: dict[str, np.ndarray]
    pair_row: np.ndarray  # the decision of each (decision, answering offer) pair
    pair_offer: np.ndarray
    pair_available: np.ndarray  # not excluded by the policy: the policy may choose it
    action: np.ndarray  # logged action per decision
    propensity: np.ndarray  # logging probability of that action
    reward: np.ndarray  # per decision, as in the module's docstring
    #: what an opt-out costs per decision (the profile's; NaN: the catalog's)
    customer_value: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> IncrementalLog:
        """The decisions ``rows`` (sorted, unique) only."""
        keep = np.isin(self.pair_row, rows)
        renumber = np.full(self.n, -1, dtype=np.int64)
        renumber[rows] = np.arange(rows.size)
        return IncrementalLog(
            int(rows.size),
            self.decision[rows],
            self.rule_ids[rows],
            {k: v[rows] for k, v in self.context.items()},
            renumber[self.pair_row[keep]],
            self.pair_offer[keep],
            self.pair_available[keep],
            self.action[rows],
            self.propensity[rows],
            self.reward[rows],
            None if self.customer_value is None else self.customer_value[rows],
        )


def incremental_log(decisions: pa.Table, pairs: pa.Table, catalog: Catalog) -> IncrementalLog:
    """The decisions of ``pairs`` (``models.attribution.attribute`` of ``decisions``) that an
    off-policy estimate can use: not in the control group (not randomized per decision), their
    offers' windows all closed, and only offers of ``catalog``."""
    values = {o.id: o.spec.value for o in catalog.offers}
    listed = {o.id: o.spec.value if o.spec.list_value is None else o.spec.list_value
              for o in catalog.offers}  # fmt: skip
    costs = {o.id: o.spec.cost for o in catalog.offers}
    row = pairs.column("row").to_numpy()
    offer = np.asarray(pairs.column("offer_id").to_numpy(zero_copy_only=False), dtype=object)
    known = np.asarray(pairs.column("known").to_numpy(zero_copy_only=False), dtype=bool)
    arm = np.asarray(pairs.column("arm").to_numpy(zero_copy_only=False), dtype=object)
    n = decisions.num_rows
    usable = np.ones(n, dtype=bool)
    usable[row[~known | (arm == "control")]] = False
    control = np.asarray(decisions.column("control").to_numpy(zero_copy_only=False), bool)
    usable &= ~control
    in_catalog = np.isin(offer, list(values))
    keep_pair = usable[row] & in_catalog
    # the reward: conversions at their value, contact cost, opt-out
    treated = np.asarray(pairs.column("treated").to_numpy(zero_copy_only=False), dtype=bool)
    converted = np.asarray(pairs.column("converted").to_numpy(zero_copy_only=False), dtype=bool)
    opted = np.asarray(pairs.column("opted_out").to_numpy(zero_copy_only=False), dtype=bool)
    earned = np.array(
        [(values if t else listed)[o] if c and o in values else 0.0
         for o, t, c in zip(offer.tolist(), treated.tolist(), converted.tolist(), strict=True)]
    )  # fmt: skip
    reward = np.bincount(row[keep_pair], weights=earned[keep_pair], minlength=n).astype(float)
    opted_out = np.zeros(n, dtype=bool)
    opted_out[row[opted]] = True  # one customer: every pair of a decision agrees
    action = np.asarray(decisions.column("action").to_numpy(zero_copy_only=False), dtype=object)
    delivered = np.asarray(decisions.column("delivered").to_numpy(zero_copy_only=False), bool)
    cost = np.array([costs.get(a, 0.0) for a in action.tolist()])
    reward -= np.where(delivered, cost, 0.0)
    given = (
        decisions.column("customer_value") if "customer_value" in decisions.schema.names else None
    )
    value = np.full(n, np.nan) if given is None else given.to_numpy(zero_copy_only=False)
    value = np.asarray(value, dtype=np.float64)
    reward -= opted_out * np.where(np.isnan(value), catalog.policy.customer_value, value)
    rows = np.flatnonzero(usable & np.isin(action, [NO_ACTION, *values]))
    flat = decisions.column("candidates").combine_chunks().flatten()
    excluded = flat.field("excluded").is_valid().to_numpy(zero_copy_only=False)
    # the pairs are the candidates in their order (attribute), so they share positions
    if len(pairs) != len(flat):
        raise ValueError("pairs must be attribute()'s rows of these decisions, all of them")
    log = IncrementalLog(
        n,
        np.arange(n),
        np.asarray(decisions.column("rule_id").to_numpy(zero_copy_only=False), dtype=object),
        context_of(decisions),
        row[in_catalog],
        offer[in_catalog],
        ~np.asarray(excluded, dtype=bool)[in_catalog],
        action,
        np.asarray(decisions.column("probability").to_numpy(), dtype=np.float64),
        reward,
        value,
    )
    return log.take(rows)


@dataclass(frozen=True)
class Policy:
    """A model's greedy policy on a log: its action per decision and the model's q of every
    action (``q0``: NO_ACTION; ``q_pair``: each answering offer)."""

    action: np.ndarray
    q0: np.ndarray
    q_pair: np.ndarray


def pair_features(log: IncrementalLog, spec: FeatureSpec) -> np.ndarray:
    """The feature rows of ``log``'s (decision, answering offer) pairs, in their order."""
    r = log.pair_row
    return build_features(
        {k: v[r] for k, v in log.context.items()}, log.rule_ids[r], log.pair_offer, spec
    )


def greedy_policy(
    log: IncrementalLog,
    predict: UpliftPredict,
    spec: FeatureSpec,
    catalog: Catalog,
    features: np.ndarray | None = None,
) -> Policy:
    """The engine's choice under ``predict`` on every decision of ``log``; see the module.
    ``features``: ``pair_features(log, spec)`` when the caller has them already."""
    r = log.pair_row
    if not r.size:
        p1, p0, p_out = (np.zeros(0),) * 3
    else:
        p1, p0, p_out = predict(pair_features(log, spec) if features is None else features)
    index = {o: i for i, o in enumerate(catalog.offer_ids)}
    which = np.array([index[o] for o in log.pair_offer.tolist()], dtype=np.int64)
    one_hot = np.eye(len(catalog.offer_ids))[which] if r.size else np.zeros((0, 1))
    # Catalog.expected_values per pair: each pair's offer in its own column, then picked out
    ev_matrix = catalog.expected_values(
        np.asarray(p1, np.float64)[:, None] * one_hot,
        np.asarray(p0, np.float64)[:, None] * one_hot,
        np.asarray(p_out, np.float64)[:, None] * one_hot,
        None if log.customer_value is None else log.customer_value[r],
    )
    ev = ev_matrix[np.arange(r.size), which] if r.size else np.zeros(0)
    listed = np.array([o.spec.value if o.spec.list_value is None else o.spec.list_value
                       for o in catalog.offers])  # fmt: skip
    organic = np.nan_to_num(np.asarray(p0, np.float64)) * listed[which] if r.size else ev
    q0 = np.bincount(r, weights=organic, minlength=log.n)
    # the best available pair per decision, if positive (ties: the first candidate, as the
    # engine's arbitration takes the first maximum)
    score = np.where(log.pair_available, ev, -np.inf)
    action = np.full(log.n, NO_ACTION, dtype=object)
    order = np.lexsort((np.arange(r.size), -score, r))
    first = np.ones(r.size, dtype=bool)
    first[1:] = r[order][1:] != r[order][:-1]
    best = order[first]
    good = score[best] > 0
    action[r[best[good]]] = log.pair_offer[best[good]]
    return Policy(action, q0, q0[r] + ev)


def _q(log: IncrementalLog, q: Policy, actions: np.ndarray) -> np.ndarray:
    """The model's q of ``actions`` (one per decision)."""
    out = q.q0.copy()
    r = log.pair_row
    match = log.pair_offer == actions[r]
    out[r[match]] = q.q_pair[match]
    return out


def dr_terms(log: IncrementalLog, actions: np.ndarray, q: Policy) -> np.ndarray:
    """Per decision, the DR term of the policy taking ``actions``, with reward model ``q``."""
    w = (actions == log.action) / np.maximum(log.propensity, 1e-6)
    return _q(log, q, actions) + w * (log.reward - _q(log, q, log.action))


def one_sided(terms: np.ndarray) -> Estimate:
    """The mean of ``terms`` with the bounds of its one-sided 95 % intervals (``low``: the
    value is above it with 95 % confidence)."""
    if terms.size < 2:
        return NAN
    mean = float(terms.mean())
    half = _Z_ONE_SIDED * float(terms.std(ddof=1)) / np.sqrt(terms.size)
    return Estimate(mean, mean - half, mean + half)


@dataclass(frozen=True)
class GateReport:
    """A candidate's estimated incremental value and its gain over the champion, per decision."""

    decisions: int
    candidate: Estimate  # against contacting no one
    champion: Estimate
    gain: Estimate
    changed: float  # share of decisions where the two policies choose differently

    @property
    def promoted(self) -> bool:
        return bool(self.gain.low > 0)

    def as_dict(self) -> dict[str, object]:
        return {
            "decisions": self.decisions,
            "incremental_value": self.candidate.as_dict(),
            "champion_incremental_value": self.champion.as_dict(),
            "gain": self.gain.as_dict(),
            "changed": self.changed,
            "level": GATE_LEVEL,
            "promoted": self.promoted,
        }


def incremental_gain(
    log: IncrementalLog,
    candidate: UpliftPredict,
    champion: UpliftPredict | None,
    spec: FeatureSpec,
    catalog: Catalog,
) -> GateReport:
    """The candidate's DR incremental value and its paired gain over ``champion``'s policy
    (None: over the policy that logged the decisions, whose value is the reward it got)."""
    if log.n < 2:
        return GateReport(log.n, NAN, NAN, NAN, float("nan"))
    q = greedy_policy(log, candidate, spec, catalog)
    never = np.full(log.n, NO_ACTION, dtype=object)
    terms = dr_terms(log, q.action, q)
    none = dr_terms(log, never, q)
    if champion is None:
        base, changed = log.reward, float((q.action != log.action).mean())
    else:
        theirs = greedy_policy(log, champion, spec, catalog).action
        base, changed = dr_terms(log, theirs, q), float((q.action != theirs).mean())
    return GateReport(
        log.n, one_sided(terms - none), one_sided(base - none), one_sided(terms - base), changed
    )


def silenced_lines(catalog: Catalog) -> Lines:
    """Calibration lines that give every offer of ``catalog`` no uplift: the model's policy
    then sends nothing (an offer whose value is below its list value plus its cost never earns
    without uplift) but what exploration draws."""
    return {o: (0.0, 0.0) for o in catalog.offer_ids}


@dataclass(frozen=True)
class Verdict:
    """The promotion gate's answer for a candidate (``judge``)."""

    promoted: bool
    #: the candidate is promoted silenced (``silenced_lines``): it sends nothing of its own
    silenced: bool
    reason: str
    metrics: dict[str, object]


def judge(
    log: IncrementalLog,
    candidate: UpliftPredict,
    silenced: UpliftPredict,
    champion: UpliftPredict | None,
    spec: FeatureSpec,
    catalog: Catalog,
    against: str = "the champion",
) -> Verdict:
    """The promotion gate of an uplift model, on the held-out ``log``.

    The candidate is promoted when its DR gain over ``champion`` (None: the policy that
    logged the decisions) is confidently positive (``incremental_gain``) and its own
    incremental value is not confidently negative: a policy that the log says loses money
    against contacting no one is not served, however much better than the champion it is.
    Otherwise ``silenced`` (the candidate with no uplift for any offer: nothing sent but
    what exploration draws) goes through the same gate, and is promoted when sending nothing
    is confidently better than the champion: a champion that loses money is retired even
    when no model earns yet. ``against`` names the champion in the reason."""
    gate = incremental_gain(log, candidate, champion, spec, catalog)
    harmful = gate.candidate.high < 0
    promoted = gate.promoted and not harmful
    reason = (
        f"DR incremental gain over {against} {gate.gain.value:+.4f} per decision, one-sided "
        f"95 % lower bound {gate.gain.low:+.4f} {'>' if gate.promoted else '<='} 0 "
        f"({gate.decisions} decisions)"
    )
    if harmful:
        reason += (
            f"; its own incremental value {gate.candidate.value:+.4f} per decision is below "
            f"contacting no one (one-sided 95 % upper bound {gate.candidate.high:+.4f} < 0)"
        )
    metrics: dict[str, object] = {"against": against, **gate.as_dict(), "silenced": False}
    if not promoted:
        quiet = incremental_gain(log, silenced, champion, spec, catalog)
        if quiet.promoted:
            reason += (
                f"; promoted silenced (nothing sent but exploration): its gain over {against} "
                f"{quiet.gain.value:+.4f} per decision, one-sided 95 % lower bound "
                f"{quiet.gain.low:+.4f} > 0"
            )
            metrics = {"against": against, **quiet.as_dict(), "silenced": True,
                       "candidate": gate.as_dict()}  # fmt: skip
            return Verdict(True, True, reason, {**metrics, "reason": reason})
    return Verdict(promoted, False, reason, {**metrics, "promoted": promoted, "reason": reason})


def screen_offers(
    log: IncrementalLog,
    raw: tuple[np.ndarray, np.ndarray, np.ndarray],
    lines: Lines,
    spec: FeatureSpec,
    catalog: Catalog,
    z: float = 0.0,
) -> tuple[Lines, dict[str, Estimate], set[str]]:
    """Which offers the model may send: those whose place in its greedy policy earns more, on
    the randomized log, than the policy without them.

    ``raw``: out-of-fold, uncalibrated probabilities of ``log``'s pairs (``TLearner.
    out_of_fold``: no customer is judged by a model that saw it), calibrated here with
    ``lines``. For each offer the policy sends, the paired DR gain per decision of the policy
    over the same policy without that offer (which sends the next best offer, or nothing,
    where it sent this one). The offer whose gain is lowest, if not above ``z`` one-sided
    standard errors (0: its estimate; 1.645: a one-sided 95 % bound), gets the calibration
    line (0, 0): no uplift, so the objective never prefers it to NO_ACTION (exploration still
    draws it, so later rounds can bring it back) unless the offer's value is above its list
    value (then converting with it still earns the difference, and it may be sent for that).
    Then the others are judged again without it, until none is dropped. Returns the lines,
    each judged offer's estimate (a dropped offer's from the pass that dropped it) and the
    dropped offers.

    Why: the calibration lines pull an offer's uplift back to what the log supports on
    average, but a policy sends where the model's uplift is highest, and an offer with
    little real effect can still look best at the top of its ranking (the winner's curse at
    the level of an offer), taking decisions from better offers or from doing nothing. This
    asks the log whether those sends paid more than the alternative. ``z`` 0 keeps an offer
    whenever its estimated gain is positive: the choice that maximizes the expected value
    with a flat prior, where a confident bound would drop offers that earn."""
    lines = dict(lines)
    x = pair_features(log, spec)
    p1_raw, p0, p_out = raw

    def policy(with_lines: Lines) -> Policy:
        def predict(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return calibrate(p1_raw, p0, rows, spec.names, with_lines), p0, p_out

        return greedy_policy(log, predict, spec, catalog, features=x)

    judged: dict[str, Estimate] = {}
    dropped: set[str] = set()
    while True:
        q = policy(lines)
        terms = dr_terms(log, q.action, q)
        scores: dict[str, float] = {}
        for offer in sorted(set(q.action.tolist()) - {NO_ACTION} - dropped):
            without = policy({**lines, offer: (0.0, 0.0)}).action
            estimate = one_sided(terms - dr_terms(log, without, q))
            judged[offer] = estimate
            scores[offer] = estimate.value - z * (estimate.value - estimate.low) / _Z_ONE_SIDED
        worst = min(scores, key=lambda o: (scores[o], o), default=None)
        if worst is None or scores[worst] > 0:
            return lines, judged, dropped
        lines[worst] = (0.0, 0.0)
        dropped.add(worst)
