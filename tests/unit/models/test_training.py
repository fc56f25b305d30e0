"""Learning from the log: no leakage, honest off-policy estimates, and a gate that refuses."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from engine.config import EngineSettings
from engine.decision.catalog import NO_ACTION, load_catalog, parse_catalog_text
from engine.decision.features import CONTEXT_FIELDS, FeatureSpec, feature_spec
from engine.decision.scorer import ScoreRequest
from engine.local import LocalEngine
from engine.rules.spec import load_rules
from engine.testing import by_offer
from models.offpolicy import LoggedBandit, evaluate_policy, improvement
from models.promotion import train_round
from models.registry import ModelRegistry
from models.simulate import Simulation, SimulationConfig, fit_truth
from models.training import (
    auc,
    calibration_error,
    context_of,
    features_of,
    fit,
    recency_weights,
    training_set,
)
from tests.conftest import BROAD_RULES, ROOT, ms

DAY = 86_400_000


def test_auc_and_calibration_match_their_definitions() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9])
    pairs = [(i, j) for i in range(6) for j in range(6) if y[i] == 1 and y[j] == 0]
    brute = np.mean([1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0 for i, j in pairs])
    assert auc(y, s) == pytest.approx(brute)
    assert calibration_error(np.array([1, 0, 1, 0]), np.full(4, 0.5)) == pytest.approx(0.0)


def test_training_reads_only_closed_windows_and_nothing_after_the_cutoff(event) -> None:
    rules = load_rules(ROOT / "deploy" / "config" / "rules.yaml")
    text = """
policy: {control_share: 0, exploration: 0, quiet_hours: null, attribution_window: 72h}
offers:
  - {id: pass, answers: [data_cap_nearing], channels: [sms], value: 6, cost: 1}
"""
    catalog = parse_catalog_text(text)
    profile = {"plan_data_cap_mb": 1000.0, "cycle_day": 1, "channels": ["sms"]}
    rows = []
    for c, day in (("a", 2), ("b", 2), ("c", 9)):
        rows.append(event("profile_update", c, ms(2026, 3, 1), **profile))
        rows.append(event("usage", c, ms(2026, 3, day, 12), mb=900.0))
    engine = LocalEngine(EngineSettings(shards=1), rules, catalog, by_offer({"pass": 0.9}))
    engine.submit_rows(sorted(rows, key=lambda r: r["ts"]))
    engine.end_stream()
    decisions = engine.decision_table()
    ids = {d["customer_key"]: f"{d['decision_id']:016x}" for d in decisions.to_pylist()}
    key = engine.ingestor.pseudonymizer.key_of
    responses = pa.table(
        {
            "decision_id": [ids[key("a")], ids[key("b")], ids[key("c")]],
            "response": ["accepted", "accepted", "accepted"],
            "ts": pa.array(
                [ms(2026, 3, 3), ms(2026, 3, 6), ms(2026, 3, 9, 13)], type=pa.int64()
            ).cast(pa.timestamp("ms", tz="UTC")),
        }
    )
    spec = feature_spec(catalog.trigger_ids, catalog.offer_ids)
    cutoff = ms(2026, 3, 8)
    data = training_set(decisions, responses, cutoff, 3 * DAY, spec)
    got = dict(
        zip(data.decisions.column("customer_key").to_pylist(), data.labels.tolist(), strict=True)
    )
    # a: accepted within its window; b: accepted after its window closed -> 0;
    # c: decided after the cutoff -> not a training row
    assert got == {key("a"): 1.0, key("b"): 0.0}
    early = training_set(decisions, responses, ms(2026, 3, 4), 3 * DAY, spec)
    assert early.labels.size == 0  # a's window was still open: its acceptance is not used yet


def _bandit(n: int, seed: int) -> tuple[LoggedBandit, FeatureSpec, np.ndarray]:
    """Logged uniform-random choices among NO_ACTION, 'x' and 'y' with known propensities."""
    rng = np.random.default_rng(seed)
    spec = FeatureSpec(("t",), ("x", "y"))
    context = {k: np.zeros(n, np.float32) for k in CONTEXT_FIELDS}
    context["pct_of_cap"] = rng.uniform(0, 100, n).astype(np.float32)
    true_p = {"x": context["pct_of_cap"] / 100, "y": 0.5 - context["pct_of_cap"] / 250}
    values, costs = {"x": 4.0, "y": 6.0}, {"x": 1.0, "y": 1.0}
    action = rng.choice(np.array([NO_ACTION, "x", "y"], dtype=object), n)
    reward = np.zeros(n)
    for o in ("x", "y"):
        m = action == o
        reward[m] = (rng.random(m.sum()) < true_p[o][m]) * values[o] - costs[o]
    ev = np.stack([np.zeros(n), true_p["x"] * 4 - 1, true_p["y"] * 6 - 1])
    truth = ev.max(axis=0).mean()  # the greedy policy under the true propensities
    log = LoggedBandit(
        n=n,
        rule_ids=np.full(n, "t", dtype=object),
        context=context,
        cand_row=np.repeat(np.arange(n), 2),
        cand_offer=np.tile(np.array(["x", "y"], dtype=object), n),
        cand_value=np.tile([4.0, 6.0], n),
        cand_cost=np.tile([1.0, 1.0], n),
        action=action,
        propensity=np.full(n, 1 / 3),
        reward=reward,
    )
    return log, spec, np.array([truth])


def _true_model(x: np.ndarray) -> np.ndarray:
    pct = x[:, CONTEXT_FIELDS.index("pct_of_cap")] / 100
    is_x = x[:, len(CONTEXT_FIELDS) + 1] == 1
    return np.where(is_x, pct, 0.5 - pct * 0.4)


def test_off_policy_estimates_cover_the_true_value_of_a_policy() -> None:
    log, spec, truth = _bandit(40_000, seed=1)
    estimate = evaluate_policy(log, _true_model, spec)
    for est in (estimate.snips, estimate.dr):
        assert est.low <= truth[0] <= est.high
        assert abs(est.value - truth[0]) < 0.05
    # a model that is wrong about 'y' makes DR lean on the logged rewards and still be close
    wrong = evaluate_policy(log, lambda x: _true_model(x) * 0.5, spec)
    assert wrong.dr.value < truth[0]
    assert 0.3 < estimate.agreement < 0.4  # uniform logging agrees a third of the time


def test_the_paired_gain_finds_a_better_policy_and_no_gain_against_itself() -> None:
    log, spec, truth = _bandit(20_000, seed=2)
    pct = log.context["pct_of_cap"] / 100
    uniform = np.mean([np.zeros_like(pct), pct * 4 - 1, (0.5 - pct * 0.4) * 6 - 1])
    gain = improvement(log, _true_model, None, spec)  # over the uniform logging policy
    assert gain.low <= truth[0] - uniform <= gain.high and gain.low > 0
    same = improvement(log, _true_model, _true_model, spec)
    assert same.value == same.low == same.high == 0.0
    # a model that has x and y the wrong way round is confidently worse than the true one
    swapped = improvement(log, lambda x: 1 - _true_model(x), _true_model, spec)
    assert swapped.high < 0
    # pairing: the gain's interval is narrower than the candidate's own estimate's
    alone = evaluate_policy(log, _true_model, spec).dr
    assert gain.high - gain.low < alone.high - alone.low


def test_recency_weights_halve_every_half_life() -> None:
    day = 86_400_000
    ts = np.array([10 * day, 3 * day, -4 * day, 12 * day])
    np.testing.assert_allclose(recency_weights(ts, 10 * day, 7.0), [1.0, 0.5, 0.25, 1.0])
    np.testing.assert_array_equal(recency_weights(ts, 10 * day, None), np.ones(4))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    config = SimulationConfig(customers=4000, days=24, warmup_days=24, seed=11, visits=False)
    catalog = load_catalog(ROOT / "deploy" / "config" / "offers.yaml")
    rules = load_rules(BROAD_RULES)
    sim = Simulation(config, rules, catalog, str(tmp_path_factory.mktemp("unused")))
    run = sim.run("kairos")  # the warm-up policy all along: prior scores, 30 % exploration
    return pa.concat_tables(run.decisions), pa.concat_tables(run.responses), catalog, sim


def test_a_candidate_trained_on_shuffled_labels_is_refused(logged_run, tmp_path) -> None:
    decisions, responses, catalog, sim = logged_run
    registry = ModelRegistry(str(tmp_path / "models"))
    cutoff = sim.t0 + 24 * DAY
    good = train_round(decisions, responses, catalog, registry, cutoff)
    assert good.artifact is not None
    registry.set_champion(good.artifact.version)
    bad = train_round(decisions, responses, catalog, registry, cutoff, shuffle_labels=True)
    assert bad.artifact is not None and not bad.promoted
    assert registry.champion() == good.artifact.version
    assert registry.load(bad.artifact.version).status == "refused"
    assert "<=" in bad.reason and good.artifact.version in bad.reason
    good_auc, bad_auc = good.metrics["holdout"]["auc"], bad.metrics["holdout"]["auc"]
    # shuffled labels score at chance (within the noise of a ~1,000-row holdout)
    assert abs(bad_auc - 0.5) < 0.05 and good_auc > max(bad_auc, 0.55)


def test_the_ceiling_model_knows_the_truth_far_better_than_a_model_of_outcomes(logged_run) -> None:
    decisions, responses, catalog, sim = logged_run
    ts = decisions.column("ts").cast(pa.int64()).to_numpy()
    cutoff = sim.t0 + 16 * DAY
    truth = sim.simulator()
    ceiling = fit_truth(decisions.filter(pa.array(ts < cutoff)), truth, catalog)
    assert ceiling is not None and fit_truth(decisions.slice(0, 0), truth, catalog) is None
    spec = ceiling.spec
    data = training_set(decisions, responses, cutoff, catalog.policy.attribution_window_ms, spec)
    learned = fit(data.features, data.labels, spec.names)  # what Kairos learns by then
    chosen = decisions.column("action").to_numpy(zero_copy_only=False)
    offered = (ts >= cutoff) & (chosen != NO_ACTION)
    later = decisions.filter(pa.array(offered))
    ctx = {k: v.astype(np.float64) for k, v in context_of(later).items()}
    action = np.asarray(later.column("action").to_numpy(zero_copy_only=False), dtype=object)
    keys = later.column("customer_key").to_numpy()
    p_true = truth.propensity(
        truth.index_of(keys), action,
        ctx["days_left"], ctx["km_from_home"], ctx["cart_items"], ctx["contacts_7d"],
    )  # fmt: skip
    x = features_of(later, spec)
    p_ceiling = ceiling.score(ScoreRequest(x, spec.names, keys)).propensity
    p_learned = learned.inplace_predict(x)
    assert later.num_rows > 1000
    # per-customer affinity is hidden from both; the rest of the truth only from the outcomes'
    error = np.abs(p_ceiling - p_true).mean()
    assert error < 0.08 and error < 0.7 * np.abs(p_learned - p_true).mean()
    assert np.corrcoef(p_ceiling, p_true)[0, 1] > max(0.6, np.corrcoef(p_learned, p_true)[0, 1])
    with pytest.raises(ValueError, match="other features"):
        ceiling.score(ScoreRequest(x[:, :-1], spec.names[:-1], keys))
