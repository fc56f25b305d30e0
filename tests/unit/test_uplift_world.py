"""The uplift world (``engine.synthetic.uplift``): response types per offer, both arms of every
decision, the counterfactual accounting, and the yardstick that decides on incremental value."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from deploy.paths import DEFAULT_OFFERS
from engine.decision.catalog import NO_ACTION, load_catalog
from engine.decision.policy import stable_uniform
from engine.rules.spec import load_rules
from engine.synthetic.response import _offer_salt
from engine.synthetic.telco import population
from engine.synthetic.uplift import (
    CONVERT_SALT,
    DOG,
    DOG_OPT_OUT,
    LIST_VALUE,
    LOST,
    PERSUADABLE,
    SURE,
    UpliftSimulator,
)
from engine.units import DAY_MS
from models.simulate import Simulation, SimulationConfig, report
from tests.conftest import BROAD_RULES

OFFERS = tuple(LIST_VALUE)


@pytest.fixture(scope="module")
def world() -> UpliftSimulator:
    return UpliftSimulator(population(20_000, seed=3), "test-key-123", seed=3)


def _arms(sim: UpliftSimulator, idx: np.ndarray, offer: str, contacts: float = 0.0):
    n = idx.size
    return sim.arms(idx, np.full(n, offer, dtype=object), np.full(n, 15.0), np.full(n, 300.0),
                    np.full(n, 2.0), np.full(n, contacts))  # fmt: skip


def test_each_offer_has_its_seed_s_mix_of_the_four_types(world) -> None:
    for offer in OFFERS:
        kind = world.types[offer]
        shares = np.bincount(kind, minlength=4) / kind.size
        assert np.abs(shares - world.mix[offer]).max() < 0.02, (offer, shares, world.mix[offer])
        assert min(shares) > 0.005
    other = UpliftSimulator(population(20_000, seed=3), "test-key-123", seed=4)
    assert not np.allclose(other.mix["cart_incentive"], world.mix["cart_incentive"])


def test_types_follow_what_the_engine_sees_only_loosely(world) -> None:
    """Heavier data users are sure things for the data pass more often, but every type is
    found at every level of use (the tie is a correlation of 0.2 to 0.5)."""
    kind = world.types["data_pass_1gb"]
    use = world.pop.use_ratio
    assert use[kind == SURE].mean() > use[kind == LOST].mean()
    top = use > np.quantile(use, 0.75)
    for t in (SURE, PERSUADABLE, LOST, DOG):
        assert (kind[top] == t).mean() > 0.03, t
    assert 0.2 <= world.tie["data_pass_1gb"] <= 0.5


def test_the_types_arms_sure_things_persuadables_lost_causes_sleeping_dogs(world) -> None:
    idx = np.arange(world.pop.size)
    offer = "cart_incentive"
    p_offer, p_base, p_out = _arms(world, idx, offer)
    kind = world.types[offer]
    uplift = p_offer - p_base
    sure, pers, lost, dog = (kind == t for t in (SURE, PERSUADABLE, LOST, DOG))
    assert np.abs(uplift[sure]).max() < 0.06 and p_base[sure].mean() > 0.3
    assert uplift[pers].mean() > 0.2 and p_base[pers].mean() < 0.03
    assert p_offer[lost].max() < 0.15
    assert (uplift[dog] < 0).all()
    plain = 0.002 + 0.01 * (p_offer < 0.05)  # a contact, and an offer of no interest
    np.testing.assert_allclose(p_out, plain * np.where(dog, DOG_OPT_OUT, 1.0))
    tired = _arms(world, idx, offer, contacts=2.0)
    np.testing.assert_allclose(tired[1], p_base)  # fatigue is about the offer, not buying
    assert (tired[0] <= p_offer).all()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    config = SimulationConfig(customers=1000, days=12, warmup_days=6, seed=5, world="uplift",
                              visits=False)  # fmt: skip
    sim = Simulation(config, load_rules(BROAD_RULES), load_catalog(DEFAULT_OFFERS),
                     str(tmp_path_factory.mktemp("models")))  # fmt: skip
    runs = {name: sim.run(name) for name in ("rules", "oracle", "uplift")}
    return sim, runs


def test_the_incremental_value_of_every_decision_equals_a_per_decision_reference(
    small_run,
) -> None:
    """Replayed decision by decision, in plain Python: the offer delivered against the same
    customer, the same day, without it (one draw decides both arms)."""
    sim, runs = small_run
    run = runs["rules"]
    truth = sim.simulator()
    checked = 0
    for table, outcome in zip(run.decisions, run.outcomes, strict=True):
        for k, i in enumerate(outcome["row"].tolist()):
            row = table.slice(i, 1).to_pylist()[0]
            offer = row["action"]
            key = np.array([row["customer_key"]], dtype=np.uint64)
            idx = truth.index_of(key)
            at = int(row["deliver_after"].timestamp() * 1000)
            day = np.uint64(at // DAY_MS)
            stream = key ^ np.uint64(_offer_salt(offer)) ^ (day * np.uint64(0x100000001B3))
            u = stable_uniform(stream, CONVERT_SALT + truth.seed)[0]
            kind = truth.types[offer][idx[0]]
            base = truth.base_propensity(idx, np.array([offer], dtype=object),
                                         np.array([row["ctx_days_left"]]),
                                         np.array([row["ctx_km_from_home"]]),
                                         np.array([row["ctx_cart_items"]]))[0]  # fmt: skip
            anyway = u < {SURE: min(0.9, 2.5 * base), PERSUADABLE: 0.1 * base,
                          LOST: 0.05 * base, DOG: min(0.8, 1.5 * base)}[kind]  # fmt: skip
            assert outcome["organic"][k] == anyway
            if not row["delivered"]:
                assert outcome["incremental"][k] == 0.0
                continue
            listed = LIST_VALUE[offer]
            with_offer = row["value"] if outcome["accepted"][k] else 0.0
            if not outcome["accepted"][k] and anyway and kind != DOG:
                with_offer = listed
            loss = outcome["opted_out"][k] * truth.customer_value[idx[0]]
            want = with_offer - anyway * listed - row["cost"] - loss
            assert outcome["incremental"][k] == pytest.approx(want), (row, kind)
            checked += 1
    assert checked > 100


def test_conversions_without_an_offer_are_ordinary_events_once_a_day(small_run) -> None:
    _, runs = small_run
    responses = pa.concat_tables(runs["rules"].responses)
    kinds = responses.column("kind").to_pylist()
    assert {"purchase", "checkout", "offer_response"} <= set(kinds)
    bought = responses.filter(pa.compute.is_in(responses.column("kind"),
                                               pa.array(["purchase", "checkout"])))  # fmt: skip
    day = bought.column("ts").cast(pa.int64()).to_numpy() // DAY_MS
    item = [i or "checkout" for i in bought.column("item").to_pylist()]
    who = bought.column("customer_id").to_pylist()
    assert len(set(zip(who, item, day.tolist(), strict=True))) >= 0.95 * bought.num_rows
    decisions = pa.concat_tables(runs["rules"].decisions)
    no_action = np.asarray(decisions.column("action").to_numpy(zero_copy_only=False)) == NO_ACTION
    assert no_action.any()


def test_deciding_on_incremental_value_beats_deciding_on_response(small_run) -> None:
    """With the true probabilities of both arms and of opt-out, the yardstick earns more than
    with the true response probability alone, and sends fewer offers (six days of a thousand
    customers: too few to ask more than the order; ``kairos simulate`` measures it)."""
    sim, runs = small_run
    got = {n: report(r, 1000, sim.warmup_end, sim.t0) for n, r in runs.items()}
    print({n: (g["offers_sent"], g["incremental_net_value"]) for n, g in got.items()})
    assert got["uplift"]["incremental_net_value"] > got["oracle"]["incremental_net_value"] + 50
    assert got["uplift"]["offers_sent"] < got["oracle"]["offers_sent"]
    assert got["oracle"]["net_value"] > got["oracle"]["incremental_net_value"]


@pytest.mark.parametrize(("policy", "responses_only"),
                         [("rules", False), ("uplift", False), ("rules", True)])  # fmt: skip
def test_outcomes_of_every_arm_equal_a_per_pair_reference(
    small_run, policy, responses_only
) -> None:
    """``models.attribution`` against a plain loop over the events: every (decision, answering
    offer) row's arm, conversion (with the offer or without it) and opt-out within the window,
    reading nothing after the cutoff."""
    from engine.governance.pseudonym import Pseudonymizer
    from models.attribution import attribute

    sim, runs = small_run
    run = runs[policy]
    decisions = pa.concat_tables(run.decisions)
    events = pa.concat_tables(run.responses)
    if responses_only:  # accepted offers count without their purchase events too
        kinds = pa.array(["purchase", "checkout"])
        events = events.filter(pa.compute.invert(pa.compute.is_in(events.column("kind"), kinds)))
    catalog = sim.catalog
    cutoff = sim.t0 + 10 * DAY_MS
    pseudonyms = Pseudonymizer(sim.settings.pseudonym_key)
    got = attribute(decisions, events, catalog, cutoff, pseudonyms).to_pylist()
    window = catalog.policy.attribution_window_ms
    conversion = {o.id: o.spec.conversion for o in catalog.offers}
    by_customer: dict[int, list[dict]] = {}
    for e in events.to_pylist():
        t = int(e["ts"].timestamp() * 1000)
        if t <= cutoff:
            by_customer.setdefault(pseudonyms.key_of(e["customer_id"]), []).append({**e, "t": t})
    rows = decisions.to_pylist()
    assert len(got) == sum(len(d["candidates"]) for d in rows) > 300
    arms = set()
    for g in got:
        d = rows[g["row"]]
        start = int(d["deliver_after"].timestamp() * 1000)
        end = min(start + window, cutoff)
        treated = d["delivered"] and d["action"] == g["offer_id"]
        mine = [e for e in by_customer.get(d["customer_key"], []) if start <= e["t"] <= end]
        spec = conversion[g["offer_id"]]
        converted = any(e["kind"] == spec.kind and (spec.item is None or e["item"] == spec.item)
                        for e in mine)  # fmt: skip
        decision = f"{d['decision_id']:016x}"
        if treated:
            converted |= any(e["kind"] == "offer_response" and e["response"] == "accepted"
                             and e["decision_id"] == decision for e in mine)  # fmt: skip
        opted = any(e["kind"] == "consent" and e["channel"] == "all" and e["granted"] is False
                    for e in mine)  # fmt: skip
        excluded = next(c["excluded"] for c in d["candidates"] if c["offer_id"] == g["offer_id"])
        arm = ("offer" if treated else "control" if d["control"]
               else "no_action_arm" if d["reason"] == "no_action_arm"
               else "suppressed" if excluded is not None
               else "other_offer" if d["action"] != NO_ACTION else "no_action")  # fmt: skip
        assert (g["treated"], g["converted"], g["opted_out"], g["arm"]) == (
            treated, converted, opted, arm), (g, d["action"], d["reason"])  # fmt: skip
        assert g["known"] == (start + window <= cutoff)
        arms.add(arm)
    assert {"offer", "control", "suppressed"} <= arms
    assert policy == "rules" or "no_action" in arms
    assert responses_only or sum(g["converted"] and not g["treated"] for g in got) > 20
    assert sum(g["converted"] and g["treated"] for g in got) > 20


def test_the_shipped_catalog_prices_conversions_as_the_simulated_world_does() -> None:
    """List values and conversion events are business facts both sides must agree on (the
    world's types and probabilities stay hidden from the engine)."""
    from engine.synthetic.uplift import CONVERSION

    for offer in load_catalog(DEFAULT_OFFERS).offers:
        spec = offer.spec
        assert spec.list_value == LIST_VALUE[offer.id]
        assert spec.conversion is not None
        assert (spec.conversion.kind, spec.conversion.item) == CONVERSION[offer.id]


def test_uplift_training_rows_and_the_control_group_experiment(small_run) -> None:
    """Training rows are the known pairs of the delivered and no-offer arms, with the features
    the ranker serves with; the experiment pairs each would-be offer's treated rows with the
    control group's."""
    from engine.decision.features import feature_spec
    from engine.governance.pseudonym import Pseudonymizer
    from models.attribution import attribute
    from models.training import features_of
    from models.uplift import randomized, uplift_rows

    sim, runs = small_run
    decisions = pa.concat_tables(runs["rules"].decisions)
    events = pa.concat_tables(runs["rules"].responses)
    cutoff = sim.t0 + 12 * DAY_MS
    pairs = attribute(decisions, events, sim.catalog, cutoff,
                      Pseudonymizer(sim.settings.pseudonym_key))  # fmt: skip
    spec = feature_spec(sim.catalog.trigger_ids, sim.catalog.offer_ids)
    data = uplift_rows(decisions, pairs, spec)
    arm = np.asarray(pairs.column("arm").to_numpy(zero_copy_only=False), dtype=object)
    known = pairs.column("known").to_numpy(zero_copy_only=False)
    wanted = known & np.isin(arm, ["offer", "control", "no_action_arm", "no_action"])
    assert data.treated.size == int(wanted.sum()) > 100
    assert set(data.arm.tolist()) <= {"offer", "control", "no_action_arm", "no_action"}
    assert (data.treated == (data.arm == "offer")).all()
    first = pairs.filter(pa.array(wanted)).slice(0, 1).to_pylist()[0]
    row = decisions.slice(first["row"], 1)
    np.testing.assert_array_equal(
        data.features[0], features_of(row, spec, np.array([first["offer_id"]], dtype=object))[0]
    )
    exp = randomized(data)
    assert (data.action[exp] == data.offer[exp]).all()
    assert set(data.arm[exp].tolist()) == {"offer", "control"}
