"""Decisions a user relies on: catalog validation, contact policy, arbitration, the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from engine.config import EngineSettings
from engine.decision.arbitration import arbitrate, reproduce_choices
from engine.decision.catalog import NO_ACTION, load_catalog, parse_catalog_text
from engine.decision.features import CONTEXT_FIELDS, CONTEXT_PREFIX, build_features
from engine.decision.log import DECISION_SCHEMA, randomization_cost
from engine.decision.policy import deliver_after, in_control_group, stable_uniform
from engine.decision.scorer import ScorerUnavailableError
from engine.errors import CatalogError
from engine.local import LocalEngine
from engine.rules.spec import parse_rules_text
from engine.testing import FixedScorer, by_offer
from tests.conftest import ROOT, ms

RULES = parse_rules_text(
    """
rules:
  - {id: cap80, type: threshold, on: usage, value: cycle_usage_mb,
     threshold: 0.8 * plan_data_cap_mb, when: plan_data_cap_mb > 0}
  - {id: away, type: location, min_distance_km: 100, cooldown: 1h}
"""
)
PROFILE = {
    "plan_data_cap_mb": 1000.0,
    "cycle_day": 1,
    "home_lat": 52.52,
    "home_lon": 13.405,
    "tz": "Europe/Berlin",
    "channels": ["sms", "push"],
}
MUNICH = {"lat": 48.137, "lon": 11.575}


def catalog(policy: str = "", offers: str = "") -> str:
    return f"""
policy:
  control_share: 0
  exploration: 0
  quiet_hours: null
{policy}
offers:
  - {{id: pass, answers: [cap80], channels: [push, sms], value: 6, cost: 0.5, cooldown: 7d}}
  - {{id: upgrade, answers: [cap80], channels: [sms], value: 24, cost: 0.5, cooldown: 30d,
      eligible: plan_data_cap_mb < 5000}}
  - {{id: roam, answers: [away], channels: [push], value: 10, cost: 0.5, cooldown: 1h}}
{offers}
"""


def decide(rows, catalog_text=None, scorer=None, shards=1):
    settings = EngineSettings(shards=shards, allowed_lateness_s=60)
    cat = parse_catalog_text(catalog_text or catalog())
    engine = LocalEngine(settings, RULES, cat, scorer or by_offer({"pass": 0.3, "roam": 0.3}))
    engine.submit_rows(sorted(rows, key=lambda r: r["ts"]))  # stable: keeps arrival order of ties
    engine.end_stream()
    return engine, engine.decision_table().to_pylist()


# -- catalog files ---------------------------------------------------------------------------
def test_the_shipped_catalog_loads_with_the_default_policy() -> None:
    cat = load_catalog(ROOT / "deploy" / "config" / "offers.yaml")
    assert {
        "data_pass_1gb",
        "plan_upgrade",
        "roaming_pass",
        "device_swap",
        "cart_incentive",
    } == set(cat.offer_ids)
    caps = [(c.max, c.per_ms) for c in cat.policy.frequency_caps]
    assert caps == [(1, 86_400_000), (3, 7 * 86_400_000)]
    assert cat.policy.control_share == 0.05


def test_catalog_errors_name_the_file_the_offer_and_the_field() -> None:
    text = """
policy: {control_share: 1.5}
offers:
  - {id: a, answers: [r], channels: [pigeon], value: 1}
  - {id: b, answers: [r], channels: [sms], value: 1, eligible: "plan_cap > 3"}
  - {id: NO_ACTION, answers: [r], channels: [sms], value: 1}
  - {id: c, answers: [r], channels: [sms], value: -1, cooldown: soon}
  - {id: d, answers: [r], channels: [sms], value: 1}
  - {id: d, answers: [r], channels: [sms], value: 1}
"""
    with pytest.raises(CatalogError) as err:
        parse_catalog_text(text, "offers.yaml")
    problems = err.value.problems
    assert any("policy: field 'control_share'" in p for p in problems)
    assert any("offer 'a': field 'channels'" in p and "pigeon" in p for p in problems)
    assert any("offer 'b': field 'eligible'" in p and "plan_cap" in p for p in problems)
    assert any("offer 'NO_ACTION': field 'id'" in p for p in problems)
    assert any("offer 'c': field 'value'" in p for p in problems)
    assert any("offer 'c': field 'cooldown'" in p for p in problems)
    assert any("offer 'd': field 'id': duplicate" in p for p in problems)
    assert all(p.startswith("offers.yaml: ") for p in problems)


# -- arbitration -------------------------------------------------------------------------------
def test_the_offer_with_the_highest_expected_value_wins_over_a_likelier_one(event) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("usage", "c", ms(2026, 3, 2, 10), mb=850.0),
    ]
    # pass: 0.5 * 6 - 0.5 = 2.5; upgrade: 0.2 * 24 - 0.5 = 4.3
    _, decisions = decide(rows, scorer=by_offer({"pass": 0.5, "upgrade": 0.2}))
    (d,) = decisions
    assert d["action"] == "upgrade" and d["channel"] == "sms" and d["delivered"]
    assert d["propensity"] == pytest.approx(0.2) and d["probability"] == 1.0
    evs = {c["offer_id"]: c["expected_value"] for c in d["candidates"]}
    assert evs == pytest.approx({"pass": 2.5, "upgrade": 4.3})


def test_no_action_when_no_offer_beats_doing_nothing(event) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("usage", "c", ms(2026, 3, 2, 10), mb=850.0),
    ]
    _, decisions = decide(rows, scorer=by_offer({"pass": 0.05, "upgrade": 0.01}))
    (d,) = decisions
    assert d["action"] == NO_ACTION and d["reason"] == "no_positive_value"
    assert not d["delivered"] and d["channel"] is None and d["propensity"] is None


class _UpliftScorer:
    """Per offer: P(convert | offer), P(convert | no action), P(opt-out | contact)."""

    def __init__(self, arms: dict[str, tuple[float, float, float]]) -> None:
        self.arms = arms

    def score(self, request):
        from engine.decision.scorer import ScoreResponse

        names = request.feature_names
        got = np.zeros((request.rows, 3), dtype=np.float32)
        for offer, arm in self.arms.items():
            got[request.features[:, names.index(f"offer={offer}")] == 1.0] = arm
        n = request.rows
        return ScoreResponse(got[:, 0], ("uplift",), np.zeros(n, np.int8), got[:, 1], got[:, 2])


def test_an_uplift_model_decides_on_incremental_value_not_on_response(event) -> None:
    """The likeliest buyer of the pass would buy it anyway at list price: the upgrade, less
    likely taken but mostly because of the offer, wins; with both sure things, nothing is sent.
    EV = p_offer x value - p_base x list_value - cost - p_opt_out x customer_value."""
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("usage", "c", ms(2026, 3, 2, 10), mb=850.0),
    ]
    priced = catalog("  customer_value: 40", "").replace("value: 6, cost", "value: 6, "
                                                         "list_value: 8, cost")  # fmt: skip
    # pass: 0.9 * 6 - 0.8 * 8 - 0.5 - 0.01 * 40 = -1.9; upgrade: 0.3 * 24 - 0.05 * 24 - 0.5
    # - 0.02 * 40 = 4.7; as a response model would see them: 4.9 and 6.7
    scorer = _UpliftScorer({"pass": (0.9, 0.8, 0.01), "upgrade": (0.3, 0.05, 0.02)})
    (d,) = decide(rows, priced, scorer)[1]
    assert d["action"] == "upgrade"
    evs = {c["offer_id"]: c["expected_value"] for c in d["candidates"]}
    assert evs == pytest.approx({"pass": -1.9, "upgrade": 4.7})
    sure = _UpliftScorer({"pass": (0.9, 0.85, 0.0), "upgrade": (0.3, 0.3, 0.0)})
    (d,) = decide(rows, priced, sure)[1]
    assert d["action"] == NO_ACTION and d["reason"] == "no_positive_value"
    # the log reproduces the choice from its own expected values
    engine, _ = decide(rows, priced, scorer)
    log = engine.decision_table()
    assert reproduce_choices(log, 0.0, 0).tolist() == log.column("action").to_pylist()


def test_a_customer_value_in_the_profile_prices_that_customer_s_opt_out(event) -> None:
    """The upgrade is worth sending at the catalog's customer value (40: EV 4.7); to a
    customer whose profile says losing them costs 300, its 2 % opt-out risk makes it worth
    -0.5 and the pass (1 % risk) -4.5: nothing is sent. The log keeps the value used."""
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("profile_update", "v", ms(2026, 3, 1), **PROFILE, customer_value=300.0),
        event("usage", "c", ms(2026, 3, 2, 10), mb=850.0),
        event("usage", "v", ms(2026, 3, 2, 10), mb=850.0),
    ]
    priced = catalog("  customer_value: 40", "").replace("value: 6, cost", "value: 6, "
                                                         "list_value: 8, cost")  # fmt: skip
    scorer = _UpliftScorer({"pass": (0.9, 0.8, 0.01), "upgrade": (0.3, 0.05, 0.02)})
    engine, decisions = decide(rows, priced, scorer)
    by = {d["customer_key"]: d for d in decisions}
    c, v = (by[engine.ingestor.owner_of(x)[0]] for x in ("c", "v"))
    assert c["action"] == "upgrade" and c["customer_value"] is None
    assert v["action"] == NO_ACTION and v["customer_value"] == 300.0
    evs = {x["offer_id"]: x["expected_value"] for x in v["candidates"]}
    assert evs == pytest.approx({"pass": 5.4 - 6.4 - 0.5 - 3.0, "upgrade": 7.2 - 1.2 - 0.5 - 6.0})


def test_exploration_logs_the_probability_of_the_action_taken() -> None:
    rng = np.random.default_rng(1)
    n, eps = 40_000, 0.2
    expected = rng.normal(size=(n, 3))
    available = rng.random((n, 3)) < 0.7
    ids = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    arb = arbitrate(expected, available, ids, eps, seed=3)
    actions = available.sum(axis=1) + 1
    greedy_prob = np.where(actions > 1, 1 - eps + eps / actions, 1.0)
    expect = np.where(arb.chosen == arb.greedy, greedy_prob, eps / actions)
    np.testing.assert_allclose(arb.probability, expect)
    assert arb.explored[actions > 1].mean() == pytest.approx(eps, abs=0.01)
    # an explored choice is uniform over NO_ACTION and the available offers
    two = (actions == 3) & arb.explored
    assert (arb.chosen[two] == -1).mean() == pytest.approx(1 / 3, abs=0.03)
    assert all(available[i, arb.chosen[i]] for i in np.flatnonzero(arb.chosen >= 0))
    # stable: the same ids give the same choices
    again = arbitrate(expected, available, ids, eps, seed=3)
    np.testing.assert_array_equal(arb.chosen, again.chosen)


def test_the_randomized_no_action_arm_logs_the_probability_of_every_action() -> None:
    """With a no-action share h, NO_ACTION is drawn first with probability h, then the
    exploring policy as before: the logged probability is the chance of the action taken under
    both, and the arm's share is h of the decisions that had a candidate."""
    rng = np.random.default_rng(2)
    n, eps, h = 40_000, 0.1, 0.2
    expected = rng.normal(size=(n, 3))
    available = rng.random((n, 3)) < 0.7
    ids = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    arb = arbitrate(expected, available, ids, eps, seed=3, no_action_share=h)
    actions = available.sum(axis=1) + 1
    some = actions > 1
    before = arbitrate(expected, available, ids, eps, seed=3)  # the same draws, no arm
    np.testing.assert_array_equal(arb.chosen[~arb.held], before.chosen[~arb.held])
    assert arb.held[some].mean() == pytest.approx(h, abs=0.01) and not arb.held[~some].any()
    assert (arb.chosen[arb.held] == -1).all() and arb.explored[arb.held].all()
    p_other = np.where(before.chosen == before.greedy, 1 - eps, 0.0) + eps / actions
    p_none = np.where(before.greedy == -1, 1 - eps, 0.0) + eps / actions
    want = np.where(arb.chosen == -1, h + (1 - h) * p_none, (1 - h) * p_other)
    want[~some] = 1.0
    np.testing.assert_allclose(arb.probability, want)
    # the probabilities of every action of a decision add up to one
    total = h + (1 - h) * (p_none + (actions - 1) * eps / actions
                           + np.where(before.greedy >= 0, 1 - eps, 0.0))  # fmt: skip
    np.testing.assert_allclose(total[some], 1.0)


def test_no_action_arm_decisions_are_logged_with_their_reason_and_replay(event) -> None:
    rows = [event("profile_update", f"c{i}", ms(2026, 3, 1), **PROFILE) for i in range(300)]
    rows += [event("usage", f"c{i}", ms(2026, 3, 2, 10), mb=850.0) for i in range(300)]
    text = catalog().replace("exploration: 0", "exploration: 0.1\n  no_action_share: 0.3")
    engine, decisions = decide(rows, text, by_offer({"pass": 0.9, "upgrade": 0.9}))
    reasons = [d["reason"] for d in decisions]
    held = reasons.count("no_action_arm")
    assert 60 < held < 120, held
    assert all(d["action"] == NO_ACTION and d["explored"] and not d["delivered"]
               for d in decisions if d["reason"] == "no_action_arm")  # fmt: skip
    log = engine.decision_table()
    assert reproduce_choices(log, 0.1, 0, 0.3).tolist() == log.column("action").to_pylist()
    assert reproduce_choices(log, 0.1, 0).tolist() != log.column("action").to_pylist()
    # what the randomization cost, by the policy's own values: the arm forgoes the upgrade
    # each time; an exploration draw forgoes the upgrade minus what it drew (row by row here)
    cost = randomization_cost(log)
    arm = {"decisions": held, "forgone_expected_value": pytest.approx(held * 21.1)}
    assert cost["no_action_arm"] == arm
    drawn = [d for d in decisions if d["explored"] and d["reason"] != "no_action_arm"]
    values = {c["offer_id"]: c["expected_value"] for c in decisions[0]["candidates"]}
    assert values["upgrade"] == pytest.approx(0.9 * 24 - 0.5) == max(values.values())
    forgone = sum(values["upgrade"] - values.get(d["action"], 0.0) for d in drawn)
    assert len(drawn) > 10 and any(d["action"] == NO_ACTION for d in drawn)
    assert cost["exploration"] == {
        "decisions": len(drawn),
        "offers": sum(d["action"] != NO_ACTION for d in drawn),
        "forgone_expected_value": pytest.approx(forgone),
    }


# -- contact policy ----------------------------------------------------------------------------
def _cap_then_trips(event, days):
    rows = [event("profile_update", "c", ms(2026, 3, 1), **PROFILE)]
    rows.append(event("usage", "c", ms(2026, 3, 2, 10), mb=850.0))
    for d in days:
        rows.append(event("location", "c", ms(2026, 3, d, 12), **MUNICH))
        rows.append(event("location", "c", ms(2026, 3, d, 14), lat=52.5, lon=13.4))
    return rows


def test_frequency_caps_allow_one_offer_a_day_and_three_a_week(event) -> None:
    # offers: cap80 on 2 Mar 10:00, then trips on 2, 3, 4, 5 and 9 March
    rows = _cap_then_trips(event, [2, 3, 4, 5, 9])
    _, decisions = decide(rows)
    got = [(d["rule_id"], d["ts"].day, d["action"]) for d in decisions]
    assert got == [
        ("cap80", 2, "pass"),
        ("away", 2, NO_ACTION),  # second offer on 2 Mar: 1 per 24 h
        ("away", 3, "roam"),
        ("away", 4, "roam"),
        ("away", 5, NO_ACTION),  # 2, 3, 4 March: 3 in 7 days
        ("away", 9, "roam"),  # the offer of 2 March is older than 7 days
    ]
    assert decisions[1]["candidates"][0]["excluded"] == "frequency_cap"


def test_caps_hold_across_micro_batches_and_shards_alike(event) -> None:
    rows = _cap_then_trips(event, [2, 3, 4, 5, 9])
    settings = EngineSettings(shards=4, allowed_lateness_s=60)
    scorer = by_offer({"pass": 0.3, "roam": 0.3})
    engine = LocalEngine(settings, RULES, parse_catalog_text(catalog()), scorer)
    for row in rows:  # one event per micro-batch
        engine.submit_rows([row])
    engine.end_stream()
    one_batch = [d["action"] for d in decide(rows)[1]]
    assert [d["action"] for d in engine.decision_table().to_pylist()] == one_batch


class _FlakyScorer:
    """Down (ScorerUnavailableError) while ``down`` is set, else a fixed 0.3 for every offer."""

    def __init__(self) -> None:
        self.down = True
        self.working = by_offer({"pass": 0.3, "roam": 0.3})

    def score(self, request):
        if self.down:
            raise ScorerUnavailableError("ranker kairos-ranker/ranker did not answer: TimeoutError")
        return self.working.score(request)


def test_without_the_model_decisions_fall_back_to_no_action_and_contact_nobody(event) -> None:
    rows = _cap_then_trips(event, [2, 3])
    settings = EngineSettings(shards=1, allowed_lateness_s=60)
    scorer = _FlakyScorer()
    engine = LocalEngine(settings, RULES, parse_catalog_text(catalog()), scorer)
    engine.submit_rows(rows[:4])  # the cap80 crossing and the trip of 2 March are released
    scorer.down = False
    engine.submit_rows(rows[4:])  # the trip of 3 March
    engine.end_stream()
    decisions = engine.decision_table().to_pylist()
    assert [(d["rule_id"], d["action"], d["reason"]) for d in decisions] == [
        ("cap80", NO_ACTION, "model_unavailable"),
        ("away", NO_ACTION, "model_unavailable"),
        ("away", "roam", "offer"),  # nothing was sent on 2 March, so no cap holds it back
    ]
    for d in decisions[:2]:
        assert not d["delivered"] and d["propensity"] is None and d["model_version"] is None
        assert {c["excluded"] for c in d["candidates"]} == {"model_unavailable"}
    # one failed scoring request: the customer's two triggers are two rounds of one step,
    # asked for at once (and not again for the second round)
    decider = engine.shards[0].decider
    assert decider.unavailable == 1
    # only the answered request counts as scored: one row, the trip's one candidate offer
    assert decider.scoring["score_requests"] == 1 and decider.scoring["scored_rows"] == 1
    assert decider.scoring["score_ms"] > 0


def test_an_offer_is_not_repeated_within_its_cooldown(event) -> None:
    text = catalog(policy="  frequency_caps: []").replace("cooldown: 1h}", "cooldown: 2d}")
    rows = _cap_then_trips(event, [3, 4, 5])
    _, decisions = decide(rows, text)
    away = [(d["ts"].day, d["action"]) for d in decisions if d["rule_id"] == "away"]
    assert away == [(3, "roam"), (4, NO_ACTION), (5, "roam")]
    assert [c["excluded"] for c in decisions[2]["candidates"]] == ["cooldown"]


def test_consent_withdrawn_on_a_channel_moves_the_offer_to_the_next_one(event) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("consent", "c", ms(2026, 3, 2, 9), channel="push", granted=False),
        event("usage", "c", ms(2026, 3, 2, 10), mb=850.0),
    ]
    _, decisions = decide(rows, scorer=by_offer({"pass": 0.5}))
    assert decisions[0]["action"] == "pass" and decisions[0]["channel"] == "sms"


def test_a_global_opt_out_excludes_every_offer_and_opt_in_needs_a_grant(event) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("consent", "c", ms(2026, 3, 2, 9), channel="all", granted=False),
        event("usage", "c", ms(2026, 3, 2, 10), mb=850.0),
        event("profile_update", "d", ms(2026, 3, 1), **PROFILE),
        event("usage", "d", ms(2026, 3, 2, 10), mb=850.0),
        event("profile_update", "e", ms(2026, 3, 1), **PROFILE),
        event("consent", "e", ms(2026, 3, 1, 1), channel="sms", granted=True),
        event("usage", "e", ms(2026, 3, 2, 10), mb=850.0),
    ]
    engine, decisions = decide(rows, scorer=by_offer({"pass": 0.5}))
    key = engine.ingestor.pseudonymizer.key_of
    by_customer = {d["customer_key"]: d for d in decisions}
    opted = by_customer[key("c")]
    assert opted["action"] == NO_ACTION and opted["reason"] == "no_candidate"
    assert {c["excluded"] for c in opted["candidates"]} == {"opted_out"}
    _, decisions = decide(rows, catalog("  consent: opt_in"), by_offer({"pass": 0.5}))
    by_customer = {d["customer_key"]: d for d in decisions}
    assert by_customer[key("d")]["candidates"][0]["excluded"] == "no_consent"
    assert (by_customer[key("e")]["action"], by_customer[key("e")]["channel"]) == ("pass", "sms")


def test_offers_decided_in_quiet_hours_wait_for_the_morning_in_the_customers_zone(event) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("usage", "c", ms(2026, 3, 2, 22, 30), mb=850.0),  # 23:30 in Berlin
    ]
    text = catalog().replace("  quiet_hours: null\n", "  quiet_hours: {start: 21, end: 8}\n")
    _, decisions = decide(rows, text, by_offer({"pass": 0.5}))
    (d,) = decisions
    assert d["action"] == "pass" and d["delivered"]
    assert d["deliver_after"] == pa.scalar(ms(2026, 3, 3, 7), pa.timestamp("ms", "UTC")).as_py()
    policy = parse_catalog_text(text).policy
    ts = np.array([ms(2026, 3, 2, 12), ms(2026, 3, 2, 23)])
    local = ts + 3_600_000
    np.testing.assert_array_equal(deliver_after(ts, local, policy), [ts[0], ms(2026, 3, 3, 7)])


def control_group_in_another_process(keys: np.ndarray, share: float, hash_seed: str) -> list[bool]:
    """``in_control_group`` computed by a fresh interpreter with its own str-hash seed."""
    code = (
        "import json, sys; import numpy as np\n"
        "from engine.decision.catalog import parse_catalog_text\n"
        "from engine.decision.policy import in_control_group\n"
        "keys, share = json.load(sys.stdin)\n"
        "policy = parse_catalog_text(\n"
        "    f'policy: {{control_share: {share}}}\\noffers: []\\n').policy\n"
        "print(json.dumps(in_control_group(np.array(keys, dtype=np.uint64), policy).tolist()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([[int(k) for k in keys], share]),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
    )
    return list(json.loads(done.stdout))


def test_the_control_group_is_a_stable_share_that_is_logged_but_never_contacted(event) -> None:
    keys = np.arange(1, 200_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    policy = parse_catalog_text(catalog(policy="  control_share: 0.05")).policy
    share = in_control_group(keys, policy).mean()
    assert share == pytest.approx(0.05, abs=0.002)
    # stable across processes (no per-process hash salt): another interpreter agrees
    assert (
        control_group_in_another_process(keys[:1000], 0.05, "1")
        == in_control_group(keys[:1000], policy).tolist()
    )
    text = catalog().replace("control_share: 0", "control_share: 0.9999")
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("usage", "c", ms(2026, 3, 2, 10), mb=850.0),
    ]
    _, decisions = decide(rows, text, by_offer({"pass": 0.5}))
    (d,) = decisions
    assert d["control"] and not d["delivered"] and d["action"] == "pass"
    assert d["reason"] == "control_group"


def test_stable_uniform_draws_are_uniform_and_salted() -> None:
    keys = np.arange(100_000, dtype=np.uint64)
    u = stable_uniform(keys, 1)
    assert u.min() >= 0 and u.max() < 1 and u.mean() == pytest.approx(0.5, abs=0.01)
    assert np.corrcoef(u, stable_uniform(keys, 2))[0, 1] == pytest.approx(0, abs=0.02)


# -- the log -----------------------------------------------------------------------------------
def test_replaying_the_log_with_its_seed_reproduces_every_choice(event) -> None:
    rng = np.random.default_rng(5)
    rows = []
    for c in range(300):
        rows.append(event("profile_update", f"c{c}", ms(2026, 3, 1), **PROFILE))
        for d in range(2, 12):
            if rng.random() < 0.5:
                rows.append(event("location", f"c{c}", ms(2026, 3, d, 12), **MUNICH))
                rows.append(event("location", f"c{c}", ms(2026, 3, d, 15), lat=52.5, lon=13.4))
        rows.append(event("usage", f"c{c}", ms(2026, 3, 5, 10), mb=900.0))
    text = catalog().replace("exploration: 0", "exploration: 0.3")
    scorer = FixedScorer(lambda x, names: (x[:, 1] % 7) / 10)  # pct_of_cap
    _, decisions = decide(rows, text, scorer)
    table = pa.Table.from_pylist(decisions, schema=DECISION_SCHEMA)
    assert sum(d["explored"] for d in decisions) > 20
    np.testing.assert_array_equal(
        reproduce_choices(table, 0.3, 0), np.array([d["action"] for d in decisions], dtype=object)
    )


def test_the_ranker_sees_exactly_the_features_training_rebuilds_from_the_log(event) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), tenure_months=40, **PROFILE),
        event("location", "c", ms(2026, 3, 2, 9), **MUNICH),
        event(
            "offer_response", "c", ms(2026, 3, 2, 9, 30), decision_id="00ff", response="accepted"
        ),
        event("usage", "c", ms(2026, 3, 2, 10), mb=850.0),
    ]
    scorer = by_offer({"pass": 0.5, "roam": 0.5})
    engine, decisions = decide(rows, catalog("  frequency_caps: []"), scorer)
    request = scorer.requests[-1]  # the usage event at 10:00 waits for the end of the stream
    cap = next(d for d in decisions if d["rule_id"] == "cap80")
    ctx = {name: np.array([cap[CONTEXT_PREFIX + name]] * 2) for name in CONTEXT_FIELDS}
    offers = np.array([c["offer_id"] for c in cap["candidates"]], dtype=object)
    spec = engine.shards[0].decider.spec
    rebuilt = build_features(ctx, np.array(["cap80"] * 2, dtype=object), offers, spec)
    np.testing.assert_array_equal(request.features, rebuilt)
    assert cap["ctx_pct_of_cap"] == pytest.approx(85.0)
    assert cap["ctx_km_from_home"] == pytest.approx(504.4, abs=1)
    assert cap["ctx_offers_accepted"] == 1 and cap["ctx_tenure_months"] == 40
    assert cap["ctx_contacts_7d"] == 1 and cap["ctx_days_since_contact"] == pytest.approx(1 / 24)


# -- inbound decisions (POST /v1/decide) --------------------------------------------------------
INBOUND_OFFERS = """
  - {id: web_pass, answers: [inbound], channels: [web, app], value: 6, cost: 0.5, cooldown: 7d,
     eligible: "page != '/shop'"}
"""


def test_inbound_requests_get_offers_that_answer_inbound_on_their_channel(event) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("usage", "c", ms(2026, 3, 2, 10), mb=100.0),
    ]
    engine, decisions = decide(rows, catalog(offers=INBOUND_OFFERS), by_offer({"web_pass": 0.5}))
    assert decisions == []  # 10 % of the cap: no trigger, no outbound decision
    before = engine.customer("c")
    # 23:30 in Berlin: quiet hours hold outbound offers, not a customer who is on the site
    text = catalog(offers=INBOUND_OFFERS).replace("quiet_hours: null", "quiet_hours: {start: 21}")
    engine.set_catalog(parse_catalog_text(text))
    d = engine.decide_inbound("c", "web", ms(2026, 3, 2, 22, 30), request_id=7, page="/plans")
    assert (d["rule_id"], d["action"], d["channel"], d["delivered"]) == (
        "inbound", "web_pass", "web", True,
    )  # fmt: skip
    assert d["deliver_after"] == d["ts"]
    # the outbound-only offers are not candidates on the web
    assert [c["offer_id"] for c in d["candidates"]] == ["web_pass"]
    # asking again: the cooldown (and the daily cap) now hold
    again = engine.decide_inbound("c", "web", ms(2026, 3, 2, 22, 31), request_id=8, page="/plans")
    assert again["action"] == NO_ACTION
    assert again["candidates"][0]["excluded"] == "cooldown"
    # on a page the offer is not eligible for
    other = engine.decide_inbound("c", "app", ms(2026, 3, 20), request_id=9, page="/shop")
    assert other["candidates"][0]["excluded"] == "not_eligible"
    after = engine.customer("c")
    assert after["cycle_usage_mb"] == before["cycle_usage_mb"]  # asking changes no aggregate
    assert [r["decision_id"] for r in after["recent_decisions"]][:1] == [
        f"{other['decision_id']:016x}"
    ]
    assert [r["action"] for r in after["recent_decisions"]] == [NO_ACTION, NO_ACTION, "web_pass"]


def test_asking_for_a_customer_never_seen_creates_no_record_and_keeps_request_order(
    event,
) -> None:
    """``POST /v1/decide`` for an unknown identifier decides as for a new customer, but over a
    scratch record: no golden record is created (before: one per identifier asked about), the
    contact is not kept, and known and unknown customers in one batch get their own answers in
    request order."""
    rows = [event("profile_update", "known", ms(2026, 3, 1), **PROFILE)]
    engine, _ = decide(rows, catalog(offers=INBOUND_OFFERS), by_offer({"web_pass": 0.5}))
    shard = engine.shards[0]
    size = shard.store.size
    for i in range(30):
        d = engine.decide_inbound(f"stranger-{i}", "web", ms(2026, 3, 2), request_id=100 + i)
        assert d["action"] == "web_pass"  # decided, as for anyone new
        assert engine.customer(f"stranger-{i}") is None
    assert shard.store.size == size
    again = engine.decide_inbound("stranger-0", "web", ms(2026, 3, 2, 1), request_id=999)
    assert again["action"] == "web_pass"  # no contact was kept: no cooldown
    key, _ = engine.ingestor.owner_of("known")
    x, _ = engine.ingestor.owner_of("stranger-x")
    y, _ = engine.ingestor.owner_of("stranger-y")
    table = shard.decide_inbound(
        np.array([x, key, y], dtype=np.uint64), ["web", "web", "app"],
        np.array([ms(2026, 3, 3)] * 3), np.array([1, 2, 3], dtype=np.uint64),
    )  # fmt: skip
    assert table.column("customer_key").to_pylist() == [x, key, y]
    assert table.column("channel").to_pylist() == ["web", "web", "app"]
    assert shard.store.size == size
    known_after = engine.decide_inbound("known", "web", ms(2026, 3, 3, 1), request_id=4)
    assert known_after["candidates"][0]["excluded"] == "cooldown"  # the known one's was kept


def test_inbound_decisions_follow_consent_and_a_retried_request_gets_its_decision_again(
    event,
) -> None:
    rows = [
        event("profile_update", "c", ms(2026, 3, 1), **PROFILE),
        event("consent", "c", ms(2026, 3, 2, 9), channel="web", granted=False),
    ]
    engine, _ = decide(rows, catalog(offers=INBOUND_OFFERS), by_offer({"web_pass": 0.5}))
    web = engine.decide_inbound("c", "web", ms(2026, 3, 2, 12), request_id=1)
    assert web["action"] == NO_ACTION
    assert web["candidates"][0]["excluded"] == "no_consent"
    retried = engine.decide_inbound("c", "web", ms(2026, 3, 2, 12), request_id=1)
    assert repr(retried) == repr(web)  # the same answer (repr: its NaN context fields)
    app = engine.decide_inbound("c", "app", ms(2026, 3, 2, 12), request_id=3)
    assert (app["action"], app["channel"]) == ("web_pass", "app")
    contacts = engine.customer("c")["contacts"]
    retried = engine.decide_inbound("c", "app", ms(2026, 3, 2, 12), request_id=3)
    assert repr(retried) == repr(app) and engine.customer("c")["contacts"] == contacts
    unknown = engine.decide_inbound("new-visitor", "web", ms(2026, 3, 2, 12), request_id=2)
    assert unknown["action"] == "web_pass"  # opt-out consent: reachable until withdrawn


def test_the_golden_record_shows_recent_triggers_and_decisions_newest_first(event) -> None:
    rows = _cap_then_trips(event, [2, 3])
    engine, decisions = decide(rows)
    record = engine.customer("c")
    assert [t["rule_id"] for t in record["recent_triggers"]] == ["away", "away", "cap80"]
    assert record["recent_triggers"][0]["values"]["distance_km"] > 100
    assert [d["action"] for d in record["recent_decisions"]] == [
        d["action"] for d in reversed(decisions)
    ]
    assert engine.customer("nobody") is None


def test_a_batch_of_inbound_requests_decides_as_the_same_requests_one_by_one(event) -> None:
    rows = [event("profile_update", c, ms(2026, 3, 1), **PROFILE) for c in ("a", "b", "c")]
    rows.append(event("consent", "b", ms(2026, 3, 1, 1), channel="app", granted=False))
    text = catalog(offers=INBOUND_OFFERS, policy="  exploration: 0.3")
    scorer = by_offer({"web_pass": 0.5})
    asks = [  # (customer, channel, hour, page): "a" twice, out of time order
        ("a", "web", 12, "/plans"), ("b", "app", 9, None), ("a", "app", 10, "/plans"),
        ("c", "web", 11, "/shop"), ("new", "app", 8, None), ("b", "web", 13, None),
    ]  # fmt: skip
    one_by_one, _ = decide(rows, text, scorer)
    expected = {}
    for i, (c, ch, h, page) in sorted(enumerate(asks), key=lambda x: (x[1][0], x[1][2])):
        expected[i] = one_by_one.decide_inbound(c, ch, ms(2026, 3, 2, h), 100 + i, page)
    batched, _ = decide(rows, text, scorer)
    key = batched.ingestor.pseudonymizer.key_of
    shard = batched.shards[0]
    got = shard.decide_inbound(
        np.array([key(c) for c, *_ in asks], dtype=np.uint64),
        [ch for _, ch, _, _ in asks],
        np.array([ms(2026, 3, 2, h) for _, _, h, _ in asks]),
        np.arange(100, 100 + len(asks), dtype=np.uint64),
        [page for *_, page in asks],
    ).to_pylist()
    fields = ("decision_id", "action", "channel", "reason", "probability", "candidates")
    for i, row in enumerate(got):
        assert {f: row[f] for f in fields} == {f: expected[i][f] for f in fields}, asks[i]
    actions = [r["action"] for r in got]
    assert actions[2] == "web_pass" and actions[0] == NO_ACTION  # a: 10:00 first, then cooldown
    assert got[1]["candidates"][0]["excluded"] == "no_consent"  # b withdrew the app


def test_a_large_release_applied_in_bounded_parts_gives_the_same_triggers_and_decisions() -> None:
    from engine.reference import load_reference
    from engine.rules.spec import load_rules
    from engine.synthetic.telco import events, population

    stream = events(population(300, seed=3), 12_000, days=20, seed=3)
    rules = load_rules(ROOT / "deploy" / "config" / "rules.yaml")
    catalog_ = load_catalog(ROOT / "deploy" / "config" / "offers.yaml")
    reference = load_reference(ROOT / "deploy" / "config" / "reference.yaml")

    def run(limit: int, step: int = 1_000_000) -> tuple[pa.Table, pa.Table, int]:
        settings = EngineSettings(
            shards=2,
            allowed_lateness_s=60,
            micro_batch_max_events=limit,
            decision_step_max_events=step,
        )
        scorer = FixedScorer(lambda x, names: (x[:, 1] % 10) / 12)  # varies with pct_of_cap
        engine = LocalEngine(settings, rules, catalog_, scorer, reference=reference)
        engine.submit(stream)  # one call: the whole stream is one release
        engine.end_stream()
        triggers = pa.concat_tables(engine.triggers).sort_by(
            [("event_id", "ascending"), ("rule_id", "ascending")]
        )
        return triggers, engine.decision_table().sort_by("decision_id"), len(scorer.requests)

    whole_t, whole_d, whole_requests = run(100_000)
    assert whole_d.num_rows > 100 and whole_t.num_rows >= whole_d.num_rows
    # ~9 parts per shard: cut by the micro-batch size, or by the decision step alone
    for limit, step in ((700, 1_000_000), (100_000, 700)):
        parts_t, parts_d, requests = run(limit, step)
        assert requests > 1.5 * whole_requests  # one scoring request per round of a step
        # every running sum is added up event by event: equal to the last bit, and so is every
        # decision and its context (contact history included: taken round by round)
        assert repr(parts_t.to_pylist()) == repr(whole_t.to_pylist())  # NaN equals NaN here
        assert repr(parts_d.to_pylist()) == repr(whole_d.to_pylist())


def test_inbound_decisions_read_back_from_the_log_are_recorded_once(event, tmp_path) -> None:
    """``POST /v1/decide`` writes its decisions to the ingest log before answering; the log's
    reader hands them back (``record_decisions``). Live, their contacts are already recorded;
    after a restore from a checkpoint taken before them, they are recorded again; from one
    taken after them, not twice."""
    settings = EngineSettings(shards=2, allowed_lateness_s=60)
    cat = parse_catalog_text(catalog(offers=INBOUND_OFFERS))
    engine = LocalEngine(settings, RULES, cat, by_offer({"web_pass": 0.5}), str(tmp_path))
    people = [f"c{i}" for i in range(6)]
    engine.submit_rows([event("profile_update", p, ms(2026, 3, 1), **PROFILE) for p in people])
    engine.end_stream()
    engine.checkpoint(1, {})
    before = {p: engine.customer(p)["contacts"] for p in people}

    def ask(people: list[str], hour: int, request: int) -> pa.Table:
        """Decisions for ``people`` (two shards: one call per owner), as the API asks them."""
        tables = []
        for owner in (0, 1):
            keys = [engine.ingestor.owner_of(p) for p in people]
            mine = [k for k, o in keys if o == owner]
            if mine:
                tables.append(engine.shards[owner].decide_inbound(
                    np.array(mine, dtype=np.uint64), ["web"] * len(mine),
                    np.full(len(mine), ms(2026, 3, 2, hour)), np.arange(len(mine)) + request,
                    ["/plans"] * len(mine), logged=True,
                ))  # fmt: skip
        return pa.concat_tables(tables)

    first = ask(people[:3], 10, 100)
    assert first.column("delivered").to_pylist() == [True] * 3
    live = {p: engine.customer(p)["contacts"] for p in people}
    assert live != before
    engine.record_decisions(first)  # read back live: nothing recorded twice
    assert {p: engine.customer(p)["contacts"] for p in people} == live
    assert engine.decision_table().num_rows == 3
    assert sum(s.counters["decisions"] for s in engine.shards) == 3
    retried = ask(people[:3], 10, 100)  # the client did not get the answer and asks again
    assert sorted(map(repr, retried.to_pylist())) == sorted(map(repr, first.to_pylist()))
    engine.record_decisions(retried)  # published again: in the log twice, recorded once
    assert {p: engine.customer(p)["contacts"] for p in people} == live
    assert engine.decision_table().num_rows == 3
    assert sum(s.counters["decisions"] for s in engine.shards) == 3

    engine.lose_state()  # a crash; the checkpoint is from before the decisions
    engine.recover()
    assert {p: engine.customer(p)["contacts"] for p in people} == before
    engine.record_decisions(first)  # the log replayed from the checkpoint
    assert {p: engine.customer(p)["contacts"] for p in people} == live
    assert engine.decision_table().num_rows == 3
    again = ask(people[:1] + people[3:], 11, 200)
    keys, chosen = again.column("customer_key").to_pylist(), again.column("action").to_pylist()
    actions = dict(zip(keys, chosen, strict=True))
    assert actions[engine.ingestor.owner_of(people[0])[0]] == NO_ACTION  # its cooldown holds
    assert sorted(actions.values()) == [NO_ACTION] + ["web_pass"] * 3

    engine.checkpoint(2, {})  # taken after ``again`` was decided, before it was read back
    engine.lose_state()
    engine.recover()
    after_again = {p: engine.customer(p)["contacts"] for p in people}
    assert after_again != live
    engine.record_decisions(again)
    assert {p: engine.customer(p)["contacts"] for p in people} == after_again
    assert not engine.shards[0].inbound_live and not engine.shards[1].inbound_live


def test_scores_asked_for_ahead_give_the_decisions_of_round_by_round_scoring() -> None:
    """The whole stream in one release, so a customer has many rounds in a step, and a model
    whose answer moves with the contact history: asking once per step (and again only for the
    decisions an earlier round's contact changed) decides every decision as scoring round by
    round does, with far fewer requests."""
    from engine.reference import load_reference
    from engine.rules.spec import load_rules
    from engine.synthetic.telco import events, population

    stream = events(population(300, seed=4), 60_000, days=20, seed=4)
    rules = load_rules(ROOT / "deploy" / "config" / "rules.yaml")
    catalog_ = load_catalog(ROOT / "deploy" / "config" / "offers.yaml")
    reference = load_reference(ROOT / "deploy" / "config" / "reference.yaml")

    def by_contacts(x: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
        contacts = x[:, names.index("contacts_7d")]
        since = np.nan_to_num(x[:, names.index("days_since_contact")])
        return (0.02 + 0.1 * contacts - 0.001 * np.minimum(since, 10)).clip(0, 1)

    def run(ahead: bool) -> tuple[pa.Table, list]:
        scorer = FixedScorer(by_contacts)
        engine = LocalEngine(settings, rules, catalog_, scorer, reference=reference)
        for shard in engine.shards:
            shard.decider.score_ahead = ahead
        engine.submit(stream)
        engine.end_stream()
        return engine.decision_table().sort_by("decision_id"), scorer.requests

    settings = EngineSettings(shards=2, allowed_lateness_s=60)
    rounds, by_round = run(ahead=False)
    ahead, asked = run(ahead=True)
    assert repr(ahead.to_pylist()) == repr(rounds.to_pylist())  # NaN equals NaN here
    delivered = np.asarray(ahead.column("delivered").to_numpy(zero_copy_only=False), dtype=bool)
    assert ahead.num_rows > 500 and delivered.sum() > 10
    # the stream has many rounds per step (two steps per shard); ahead, a step asks once, and
    # again in a round only where an earlier contact changed a decision's context: here 6
    # requests against 33, and the 2 beyond the steps' first are such (breaking the check of
    # the context, so that every score asked ahead is taken, changes the decisions)
    assert len(by_round) > 4 * len(asked) > 0
    assert len(asked) > 4  # 2 shards x 2 steps: the rest were asked again
