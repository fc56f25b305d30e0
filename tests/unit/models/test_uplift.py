"""Uplift learners and the Qini measure, on data whose true effect is known."""

from __future__ import annotations

import numpy as np
import pytest

from models.uplift import UpliftRows, fit_s_learner, fit_t_learner, qini


def _experiment(n: int, seed: int) -> tuple[UpliftRows, np.ndarray]:
    """A randomized experiment: x[0] makes customers buy anyway, x[1] makes the offer work,
    x[2] is noise; half are treated at random. Returns the rows and each row's true uplift."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3)).astype(np.float32)
    base = 0.05 + 0.7 * x[:, 0]
    effect = 0.25 * (x[:, 1] > 0.7) - 0.15 * (x[:, 0] > 0.8)  # persuadables; sleeping dogs
    treated = rng.random(n) < 0.5
    converted = rng.random(n) < np.clip(base + effect * treated, 0, 1)
    opted = rng.random(n) < 0.01 + 0.05 * x[:, 2] * treated
    rows = UpliftRows(
        features=x,
        treated=treated,
        converted=converted,
        opted_out=opted,
        arm=np.where(treated, "offer", "control").astype(object),
        ts=np.arange(n),
        action=np.full(n, "o", dtype=object),
        offer=np.full(n, "o", dtype=object),
        customer_key=np.arange(n, dtype=np.uint64),
    )
    return rows, effect


NAMES = ("a", "b", "c")


def test_qini_is_zero_for_random_targeting_and_highest_for_the_true_effect() -> None:
    data, effect = _experiment(40_000, seed=1)
    rng = np.random.default_rng(2)
    truth = qini(effect, data.treated, data.converted)
    random = qini(rng.random(effect.size), data.treated, data.converted)
    reverse = qini(-effect, data.treated, data.converted)
    assert truth["qini"] > 0.01 and abs(random["qini"]) < 0.003 and reverse["qini"] < -0.01
    assert truth["auuc"] > random["auuc"] > reverse["auuc"]
    assert truth["uplift"] == pytest.approx(effect.mean(), abs=0.01)


def test_qini_by_hand() -> None:
    # sorted by score: T1 (converted), C0, T0, C1: Q = 1, 1 - 0 * 1/1 = 1, 1, 1 - 1 * 2/2 = 0
    score = np.array([4.0, 3.0, 2.0, 1.0])
    treated = np.array([True, False, True, False])
    converted = np.array([True, False, False, True])
    got = qini(score, treated, converted)
    curve = np.array([1.0, 1.0, 1.0, 0.0])
    assert got["qini"] == pytest.approx((curve - 0.0).mean() / 4)
    assert got["auuc"] == pytest.approx((curve / np.arange(1, 5)).mean())
    assert got["uplift"] == 0.0


def test_the_t_learner_ranks_by_effect_where_a_response_model_ranks_by_buying() -> None:
    """Trained on one experiment, judged on another: the T-learner's uplift follows the true
    effect and beats ranking by P(convert | offer), which favours those who buy anyway."""
    train, _ = _experiment(30_000, seed=3)
    test, effect = _experiment(30_000, seed=4)
    t = fit_t_learner(train, NAMES, rounds=60)
    s = fit_s_learner(train, NAMES, rounds=60)
    p1, p0, p_out = t.predict(test.features)
    assert np.corrcoef(p1 - p0, effect)[0, 1] > 0.8
    t_q = qini(p1 - p0, test.treated, test.converted)["qini"]
    response_q = qini(p1, test.treated, test.converted)["qini"]
    assert t_q > response_q + 0.01
    assert qini(s.uplift(test.features), test.treated, test.converted)["qini"] > response_q
    # the opt-out model follows the feature that drives opt-outs among the contacted
    assert np.corrcoef(p_out, test.features[:, 2])[0, 1] > 0.5
