"""The incremental-value gate: DR estimates of a policy's incremental value on a logged bandit
whose truth is known, and injected candidates of known worth (issue 16's gate targets)."""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import numpy as np
import pyarrow as pa
import pytest

from engine.decision.catalog import NO_ACTION, parse_catalog_text
from engine.decision.features import CONTEXT_FIELDS, feature_spec
from models.incremental import (
    IncrementalLog,
    UpliftPredict,
    greedy_policy,
    incremental_gain,
    incremental_log,
    judge,
    pair_features,
    screen_offers,
    silenced_lines,
)
from models.uplift import calibrate
from tests.pure import QUICK

CATALOG = parse_catalog_text("""
policy:
  control_share: 0
  exploration: 0
  quiet_hours: null
  customer_value: 30
offers:
  - {id: a, answers: [r], channels: [sms], value: 10, list_value: 12, cost: 0.5, cooldown: 1d}
  - {id: b, answers: [r], channels: [sms], value: 8, cost: 0.3, cooldown: 1d}
""")
SPEC = feature_spec(("r",), ("a", "b"))
OFFERS = ("a", "b")
VALUE = np.array([10.0, 8.0])
LIST = np.array([12.0, 8.0])
COST = np.array([0.5, 0.3])
CV = 30.0
U, V = CONTEXT_FIELDS.index("pct_of_cap"), CONTEXT_FIELDS.index("days_left")
IS_A = SPEC.names.index("offer=a")


def truth(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The world: offer a persuades where v is high and annoys where u is high (a sleeping dog
    opts out); b is bought anyway where v is high, and persuades where u is high."""
    u, v, a = x[:, U], x[:, V], x[:, IS_A] == 1
    p0 = np.where(a, 0.25 * u, 0.3 * v)
    p1 = np.where(a, p0 + 0.3 * (v > 0.5) - 0.05, p0 + 0.2 * u * (v < 0.6))
    out = np.where(a, 0.03 * (u > 0.8), 0.005)
    return np.clip(p1, 0, 1), p0, out


def blend(weight: float, bad: UpliftPredict | None = None) -> UpliftPredict:
    """A model between a wrong one (weight 0: a response model that ignores the no-action arm
    and opt-outs, and gets a's persuadables backwards) and the truth (weight 1)."""

    def wrong(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p1, _, _ = truth(x)
        flipped = np.where(x[:, IS_A] == 1, np.clip(0.25 * x[:, U] + 0.3 * (x[:, V] <= 0.5),
                                                     0, 1), p1)  # fmt: skip
        return flipped, np.zeros(len(x)), np.zeros(len(x))

    worse = bad if bad is not None else wrong

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        good, poor = truth(x), worse(x)
        return tuple(weight * g + (1 - weight) * p for g, p in zip(good, poor, strict=True))  # type: ignore[return-value]

    return predict


def contexts(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ctx = {k: np.zeros(n, dtype=np.float32) for k in CONTEXT_FIELDS}
    ctx["pct_of_cap"] = rng.random(n).astype(np.float32)
    ctx["days_left"] = rng.random(n).astype(np.float32)
    return ctx


def skeleton(n: int, rng: np.random.Generator) -> IncrementalLog:
    """n decisions, both offers available in each; no action logged yet."""
    return IncrementalLog(
        n,
        np.arange(n),
        np.full(n, "r", dtype=object),
        contexts(n, rng),
        np.repeat(np.arange(n), 2),
        np.tile(np.array(OFFERS, dtype=object), n),
        np.ones(2 * n, dtype=bool),
        np.full(n, NO_ACTION, dtype=object),
        np.ones(n),
        np.zeros(n),
    )


def true_incremental(log: IncrementalLog, actions: np.ndarray) -> float:
    """The true incremental value per decision of taking ``actions`` on ``log``'s decisions."""
    p1, p0, out = _truth_pairs(log)
    ev = p1 * np.tile(VALUE, log.n) - p0 * np.tile(LIST, log.n) - np.tile(COST, log.n) - out * CV
    chosen = log.pair_offer == actions[log.pair_row]
    return float(ev[chosen].sum() / log.n)


def _truth_pairs(log: IncrementalLog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from engine.decision.features import build_features

    r = log.pair_row
    x = build_features({k: v[r] for k, v in log.context.items()}, log.rule_ids[r],
                       log.pair_offer, SPEC)  # fmt: skip
    return truth(x)


def logged(n: int, logging: UpliftPredict, seed: int, explore: float = 0.2,
           hold: float = 0.1) -> IncrementalLog:  # fmt: skip
    """Decisions logged by ``logging``'s greedy policy with the engine's randomization: NO_ACTION
    with probability ``hold``, else a uniform choice among NO_ACTION and the offers with
    probability ``explore``; outcomes drawn from the truth."""
    rng = np.random.default_rng(seed)
    base = skeleton(n, rng)
    greedy = greedy_policy(base, logging, SPEC, CATALOG).action
    uniform = rng.choice(np.array([NO_ACTION, *OFFERS], dtype=object), n)
    u = rng.random(n)
    action = np.where(u < hold, NO_ACTION, np.where(u < hold + (1 - hold) * explore, uniform,
                                                    greedy))  # fmt: skip
    p = (1 - hold) * ((1 - explore) * (action == greedy) + explore / 3)
    p += hold * (action == NO_ACTION)
    p1, p0, out = _truth_pairs(base)
    treated = base.pair_offer == action[base.pair_row]
    converted = rng.random(2 * n) < np.where(treated, p1, p0)
    earned = converted * np.where(treated, np.tile(VALUE, n), np.tile(LIST, n))
    reward = np.bincount(base.pair_row, weights=earned, minlength=n)
    contacted = action != NO_ACTION
    p_out = np.zeros(n)
    p_out[base.pair_row[treated]] = out[treated]
    cost = np.zeros(n)
    cost[base.pair_row[treated]] = np.tile(COST, n)[treated]
    reward -= cost + (contacted & (rng.random(n) < p_out)) * CV
    return replace(base, action=action, propensity=p, reward=reward)


def test_the_dr_incremental_value_is_unbiased_for_the_true_one() -> None:
    """Over fresh logs, the estimate's mean is the truth and its interval covers it ~95 %."""
    candidate = blend(0.7)
    estimates, covered = [], 0
    for seed in range(60):
        log = logged(4_000, blend(0.3), seed)
        report = incremental_gain(log, candidate, None, SPEC, CATALOG)
        truth_value = true_incremental(log, greedy_policy(log, candidate, SPEC, CATALOG).action)
        estimates.append(report.candidate.value - truth_value)
        half = report.candidate.high - report.candidate.value
        covered += abs(report.candidate.value - truth_value) <= half * 1.96 / 1.645
    err = np.array(estimates)
    assert abs(err.mean()) < 3 * err.std() / np.sqrt(err.size)
    assert covered >= 52


def mixed(first: UpliftPredict, second: UpliftPredict, share: float) -> UpliftPredict:
    """``first`` on a fixed ``share`` of contexts (by a hash of the context), ``second`` on the
    rest: its policy's value is the two values mixed in that proportion."""

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pick = np.modf(x[:, U].astype(np.float64) * 7919.0 + x[:, V] * 104729.0)[0] < share
        one, two = first(x), second(x)
        return tuple(np.where(pick, f, s) for f, s in zip(one, two, strict=True))  # type: ignore[return-value]

    return predict


CHAMPION = blend(0.5)


@cache
def levels() -> tuple[float, float, float]:
    """(the champion's true incremental value per decision, the share of contexts on which a
    model follows the truth to be 5 % better than it, the share on which it follows the wrong
    model to be 5 % worse), on a large sample of decisions."""
    log = skeleton(200_000, np.random.default_rng(123))

    def value(model: UpliftPredict) -> float:
        return true_incremental(log, greedy_policy(log, model, SPEC, CATALOG).action)

    champion, best, wrong = value(CHAMPION), value(truth), value(blend(0.0))
    better = 0.05 * champion / (best - champion)
    worse = 0.05 * champion / (champion - wrong)
    assert value(mixed(truth, CHAMPION, better)) == pytest.approx(1.05 * champion, rel=0.01)
    assert value(mixed(blend(0.0), CHAMPION, worse)) == pytest.approx(0.95 * champion, rel=0.01)
    return champion, better, worse


def _promoted(candidate: UpliftPredict, trials: int, n: int, explore: float) -> float:
    wins = 0
    for seed in range(trials):
        log = logged(n, CHAMPION, 1_000 + seed, explore)  # the champion logged the decisions
        wins += incremental_gain(log, candidate, CHAMPION, SPEC, CATALOG).promoted
    return wins / trials


@pytest.mark.slow
@pytest.mark.skipif(QUICK, reason="40 s of statistics: make test runs it")
def test_the_gate_promotes_a_5_percent_better_model_and_refuses_worse_ones() -> None:
    """Issue 16's targets: ≥ 80 % of 5 %-better candidates promoted, ≤ 5 % of worse ones,
    on holdouts of 100,000 decisions logged with 20 % exploration (what it takes: a better
    model differs from the champion on 1 % of decisions, where the log rarely took its
    action; with 5 % exploration or fewer decisions the gate refuses more of them, see
    docs/benchmarks.md)."""
    target, better_share, worse_share = levels()
    assert target > 0
    n, explore = 100_000, 0.2
    better = _promoted(mixed(truth, CHAMPION, better_share), 40, n, explore)
    worse = _promoted(mixed(blend(0.0), CHAMPION, worse_share), 40, n, explore)
    rng = np.random.default_rng(5)

    def noise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return rng.random(len(x)), rng.random(len(x)) * 0.5, rng.random(len(x)) * 0.05

    useless = _promoted(noise, 20, n, explore)
    print(f"promoted: 5 % better {better:.0%}, 5 % worse {worse:.0%}, noise {useless:.0%}")
    assert better >= 0.8, better
    assert worse <= 0.05, worse
    assert useless <= 0.05, useless


def test_incremental_log_rewards_by_hand() -> None:
    """Two decisions: a delivered (accepted, so it converted at the offer's value) with b
    bought organically at list value; NO_ACTION whose customer bought a and opted out (a
    customer whose profile values them at 100)."""
    decisions = pa.table({
        "rule_id": ["r", "r"], "action": ["a", NO_ACTION], "delivered": [True, False],
        "control": [False, False], "probability": [0.8, 0.1], "customer_value": [None, 100.0],
        "candidates": [[{"offer_id": "a", "excluded": None}, {"offer_id": "b", "excluded": None}],
                       [{"offer_id": "a", "excluded": None},
                        {"offer_id": "b", "excluded": "cooldown"}]],
        **{f"ctx_{k}": [0.0, 0.0] for k in CONTEXT_FIELDS},
    })  # fmt: skip
    pairs = pa.table({
        "row": [0, 0, 1, 1], "offer_id": ["a", "b", "a", "b"], "known": [True] * 4,
        "arm": ["offer", "other_offer", "no_action_arm", "suppressed"],
        "treated": [True, False, False, False], "converted": [True, True, True, False],
        "opted_out": [False, False, True, True],
    })  # fmt: skip
    log = incremental_log(decisions, pairs, CATALOG)
    assert log.n == 2
    assert log.reward.tolist() == [10 + 8 - 0.5, 12 - 100]  # the profile's customer value
    assert log.pair_available.tolist() == [True, True, True, False]
    assert log.propensity.tolist() == [0.8, 0.1]


def test_the_screen_drops_an_offer_whose_sends_lose_and_keeps_one_that_earns() -> None:
    """A model right about a but overstating b's uplift by 0.3 sends b where a would earn more
    (b's sends alone still earn a little against sending nothing): the screen, judging each
    offer's place in the policy on the randomized log, scores b at no uplift, which gives back
    most of the value the overstated b cost; the truth's model keeps both offers."""
    is_b = SPEC.names.index("offer=b")

    def overstated(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p1, p0, out = truth(x)
        return np.clip(p1 + 0.3 * (x[:, is_b] == 1), 0, 1), p0, out

    for seed in range(5):
        log = logged(20_000, blend(0.5), seed)
        x = pair_features(log, SPEC)
        lines, judged, dropped = screen_offers(log, overstated(x), {"a": (0.0, 1.0)}, SPEC,
                                               CATALOG)  # fmt: skip
        assert lines == {"a": (0.0, 1.0), "b": (0.0, 0.0)} and dropped == {"b"}, (seed, judged)
        assert judged["a"].low > 0 and judged["b"].low <= 0

        def screened(x: np.ndarray, lines: dict = lines) -> tuple[np.ndarray, ...]:
            p1, p0, out = overstated(x)
            return calibrate(p1, p0, x, SPEC.names, lines), p0, out

        before = true_incremental(log, greedy_policy(log, overstated, SPEC, CATALOG).action)
        after = true_incremental(log, greedy_policy(log, screened, SPEC, CATALOG).action)
        assert after > 4 * before > 0, (before, after)
        assert (greedy_policy(log, screened, SPEC, CATALOG).action != "b").all()
        lines, judged, dropped = screen_offers(log, truth(x), {}, SPEC, CATALOG)
        assert lines == {} and not dropped and set(judged) == {"a", "b"}, judged


def _silenced(model: UpliftPredict) -> UpliftPredict:
    """``model`` with no uplift for any offer (what ``silenced_lines`` make of a T-learner)."""

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _, p0, out = model(x)
        return calibrate(p0, p0, x, SPEC.names, silenced_lines(CATALOG)), p0, out

    return predict


def test_the_gate_serves_no_policy_that_loses_against_contacting_no_one() -> None:
    """True values per decision: the wrong model -0.76, blend(0.3) -0.47, blend(0.5) +0.36,
    sending nothing 0. A candidate better than a losing champion but losing itself is not
    promoted; the candidate silenced is, as sending nothing beats that champion. A candidate
    that earns is promoted over the same champion; against a champion that sends nothing,
    a losing candidate is refused and silencing it gains nothing."""
    wrong, losing, earning = blend(0.0), blend(0.3), blend(0.5)
    for seed in range(3):
        log = logged(20_000, wrong, 7_000 + seed)
        verdict = judge(log, losing, _silenced(losing), wrong, SPEC, CATALOG)
        assert verdict.promoted and verdict.silenced, verdict.reason
        candidate = verdict.metrics["candidate"]
        assert isinstance(candidate, dict) and candidate["gain"]["low"] > 0, candidate
        assert candidate["incremental_value"]["high"] < 0, candidate
        assert "below contacting no one" in verdict.reason
        assert (greedy_policy(log, _silenced(losing), SPEC, CATALOG).action == NO_ACTION).all()
        verdict = judge(log, earning, _silenced(earning), wrong, SPEC, CATALOG)
        assert verdict.promoted and not verdict.silenced, verdict.reason
        log = logged(20_000, _silenced(losing), 7_100 + seed)
        verdict = judge(log, losing, _silenced(losing), _silenced(losing), SPEC, CATALOG)
        assert not verdict.promoted and not verdict.silenced, verdict.reason
        assert verdict.metrics["promoted"] is False
