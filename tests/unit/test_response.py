"""The response simulator encodes the stories, and policies share its random draws."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from engine.synthetic.response import FATIGUE, ResponseSimulator
from engine.synthetic.telco import population


@pytest.fixture(scope="module")
def sim() -> ResponseSimulator:
    return ResponseSimulator(population(20_000, seed=3), "test-key-123", seed=3)


def truth(sim, idx, offer, days_left=15.0, km=0.0, cart=0.0, contacts=0.0):
    n = idx.size
    return sim.propensity(
        idx,
        np.full(n, offer, dtype=object),
        np.full(n, days_left),
        np.full(n, km),
        np.full(n, cart),
        np.full(n, contacts),
    )


def test_frequent_over_users_take_upgrades_and_light_users_near_the_cycle_end_do_not(sim) -> None:
    heavy = np.flatnonzero(sim.heavy)
    light = np.flatnonzero(~sim.heavy)
    assert truth(sim, heavy, "plan_upgrade").mean() > 5 * truth(sim, light, "plan_upgrade").mean()
    near_end = truth(sim, light, "data_pass_1gb", days_left=2).mean()
    early = truth(sim, light, "data_pass_1gb", days_left=20).mean()
    assert early > 2 * near_end > truth(sim, light, "plan_upgrade", days_left=2).mean()


def test_travellers_away_take_roaming_passes_and_recall_owners_take_swaps(sim) -> None:
    travellers = np.flatnonzero(sim.pop.traveller)
    others = np.flatnonzero(~sim.pop.traveller)
    away = truth(sim, travellers, "roaming_pass", km=300).mean()
    assert away > 5 * truth(sim, others, "roaming_pass", km=300).mean()
    assert away > 5 * truth(sim, travellers, "roaming_pass", km=10).mean()
    owners = np.flatnonzero(sim.pop.device == "Nimbus X2")
    stock = sim.swap_store_near[owners]
    assert 0.2 < stock.mean() < 1.0  # the world has owners on both sides
    p = truth(sim, owners, "device_swap")
    assert p[stock].mean() > 2.5 * p[~stock].mean()
    assert truth(sim, np.flatnonzero(sim.pop.device != "Nimbus X2"), "device_swap").max() == 0


def test_each_recent_contact_lowers_the_response(sim) -> None:
    idx = np.arange(1000)
    fresh = truth(sim, idx, "cart_incentive", cart=2)
    tired = truth(sim, idx, "cart_incentive", cart=2, contacts=2)
    np.testing.assert_allclose(tired, fresh * FATIGUE**2)


def test_the_simulator_maps_customer_keys_back_to_its_population(sim) -> None:
    picks = np.array([5, 17, 19_999, 0])
    np.testing.assert_array_equal(sim.index_of(sim.keys[picks]), picks)


def test_customers_are_loaded_with_a_billing_history_that_tells_over_users_apart() -> None:
    from engine.synthetic.telco import billing_history, events, population

    pop = population(5000, seed=3)
    history = billing_history(pop, 12, seed=3)
    assert history.min() >= 0 and history.max() <= 12
    assert history[pop.use_ratio > 1.2].mean() > 8
    assert history[pop.use_ratio < 0.6].mean() < 1
    loaded = events(pop, 20_000, seed=3)
    profiles = loaded.filter(pc.equal(loaded.column("kind"), "profile_update"))
    assert profiles.column("overage_cycles").to_pylist() == history.tolist()
    without = events(pop, 20_000, seed=3, billing_months=0)
    assert without.column("overage_cycles").null_count == without.num_rows
    assert without.drop_columns(["overage_cycles"]).equals(loaded.drop_columns(["overage_cycles"]))
