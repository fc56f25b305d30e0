"""Which uplift learner decides best: the true incremental value of its greedy policy.

Qini (``bench_uplift.py``) says how well a model ranks customers by uplift; a decision needs
more, the level: an offer is sent when P(convert | offer) x value - P(convert | no action) x
list value - cost - P(opt-out) x customer value > 0, so a model whose estimated uplift is
too high for the customers it picks (the winner's curse of noisy estimates) sends offers
that lose money (the calibration of ``fit_t_learner(calibrate=True)`` is to pull it back).
Per seed of the uplift world this runs Kairos's warm-up policy (prior scores,
30 % exploration, a 20 % randomized no-action arm) for ``--days``, trains each learner on the
first 75 % of the time, and on the held-out decisions takes each learner's greedy choice
among the available offers and sums the simulator's true incremental value of it (and of the
truth's own choice, the ceiling). It also sums what the learner expected of its choices:
expected far above true is the winner's curse. Static: the held-out customers' contacts and
fatigue are as logged, not as the learner's policy would have made them.

Run (seeds for development; the figures of docs/benchmarks.md use other seeds for the
closed loop):

    python loadtests/bench_uplift_policy.py --seeds 1,2 [--customers 20000 --days 42]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import xgboost as xgb

from deploy.paths import DEFAULT_OFFERS, DEFAULT_RULES
from engine.decision.catalog import NO_ACTION, load_catalog
from engine.decision.features import feature_spec
from engine.governance.pseudonym import Pseudonymizer
from engine.rules.spec import load_rules
from engine.synthetic.uplift import UpliftSimulator
from models.attribution import attribute
from models.incremental import greedy_policy, incremental_log
from models.simulate import Simulation, SimulationConfig
from models.training import fit
from models.uplift import UpliftRows, fit_t_learner, uplift_rows

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _booster(x: np.ndarray, y: np.ndarray, names: list[str], params: dict[str, Any],
             rounds: int) -> xgb.Booster:  # fmt: skip
    return fit(x, y.astype(np.float32), tuple(names), rounds, params)


def x_learner(data: UpliftRows, names: list[str], rounds: int = 150) -> Predict:
    """Künzel et al.'s X-learner: the T-learner's two outcome models, then the effect itself
    learned from imputed effects of each arm, mixed by the share treated."""
    t = data.treated
    mu1 = _booster(data.features[t], data.converted[t], names, {}, rounds)
    mu0 = _booster(data.features[~t], data.converted[~t], names, {}, rounds)
    d1 = data.converted[t] - mu0.inplace_predict(data.features[t])
    d0 = mu1.inplace_predict(data.features[~t]) - data.converted[~t]
    reg = {"objective": "reg:squarederror", "eval_metric": "rmse"}
    tau1 = _booster(data.features[t], d1, names, reg, rounds)
    tau0 = _booster(data.features[~t], d0, names, reg, rounds)
    out = _booster(data.features[t], data.opted_out[t], names, {}, rounds)
    g = float(t.mean())

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p0 = np.asarray(mu0.inplace_predict(x), np.float64)
        tau = g * tau0.inplace_predict(x) + (1 - g) * tau1.inplace_predict(x)
        return np.clip(p0 + tau, 0, 1), p0, np.asarray(out.inplace_predict(x), np.float64)

    return predict


def observable_ceiling(train: UpliftRows, arms: tuple[np.ndarray, ...], names: list[str],
                       rounds: int = 150) -> Predict:  # fmt: skip
    """Boosters fitted to the simulator's true probabilities of the training pairs (no
    outcome noise): the best a model of the engine's features can do, up to its capacity."""
    boosters = [_booster(train.features, a, names, {}, rounds) for a in arms]

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.asarray(b.inplace_predict(x), np.float64) for b in boosters)  # type: ignore[return-value]

    return predict


def learners(train: UpliftRows, names: tuple[str, ...]) -> dict[str, Predict]:
    shallow = {"max_depth": 3, "min_child_weight": 50}
    return {
        "t-learner": fit_t_learner(train, names).predict,
        "t-learner calibrated": fit_t_learner(train, names, calibrate=True).predict,
        "t-learner shallow": fit_t_learner(train, names, rounds=100, params=shallow).predict,
        "t-learner shallow calibrated": fit_t_learner(
            train, names, rounds=100, params=shallow, calibrate=True
        ).predict,
        "t-learner 50 trees calibrated": fit_t_learner(
            train, names, rounds=50, calibrate=True
        ).predict,
        "x-learner": x_learner(train, list(names)),
    }


def one_seed(seed: int, customers: int, days: int, out: str) -> dict[str, Any]:
    started = time.perf_counter()
    config = SimulationConfig(customers=customers, days=days, warmup_days=days, seed=seed,
                              world="uplift")  # fmt: skip
    catalog = load_catalog(DEFAULT_OFFERS)
    sim = Simulation(config, load_rules(DEFAULT_RULES), catalog, out)
    run = sim.run("kairos-uplift")  # the warm-up policy all along
    decisions, events = pa.concat_tables(run.decisions), pa.concat_tables(run.responses)
    cutoff = sim.t0 + days * 86_400_000
    pairs = attribute(decisions, events, catalog, cutoff, Pseudonymizer(sim.settings.pseudonym_key))
    spec = feature_spec(catalog.trigger_ids, catalog.offer_ids)
    data = uplift_rows(decisions, pairs, spec)
    boundary = np.quantile(data.ts, 0.75)
    full = incremental_log(decisions, pairs, catalog)
    ts = decisions.column("ts").cast(pa.int64()).to_numpy()
    log = full.take(np.flatnonzero(ts[full.decision] >= boundary))
    train = data.take(np.flatnonzero(data.ts < boundary))
    # the truth of every held-out (decision, offer) pair
    truth_sim = sim.simulator()
    assert isinstance(truth_sim, UpliftSimulator)
    r = log.pair_row
    keys = decisions.column("customer_key").to_numpy()[log.decision[r]]
    ctx = {k: v[r].astype(np.float64) for k, v in log.context.items()}
    arms = truth_sim.arms(
        truth_sim.index_of(keys), log.pair_offer, ctx["days_left"], ctx["km_from_home"],
        ctx["cart_items"], ctx["contacts_7d"],
    )  # fmt: skip

    def truth(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert len(features) == r.size  # the held-out pairs, in their order
        return arms

    true_policy = greedy_policy(log, truth, spec, catalog)
    true_ev = true_policy.q_pair - true_policy.q0[r]  # true incremental value of each pair

    def value(action: np.ndarray) -> float:
        chosen = log.pair_offer == action[r]
        return float(true_ev[chosen].sum())

    sent = int((true_policy.action != NO_ACTION).sum())
    results: dict[str, Any] = {
        "truth": {"sent": sent, "true_incremental": value(true_policy.action)}
    }
    f = {n: train.features[:, i].astype(np.float64) for i, n in enumerate(spec.names)}
    train_arms = truth_sim.arms(
        truth_sim.index_of(train.customer_key), train.offer, f["days_left"], f["km_from_home"],
        f["cart_items"], f["contacts_7d"],
    )  # fmt: skip
    found = learners(train, spec.names)
    found["observable ceiling"] = observable_ceiling(train, train_arms, list(spec.names))
    for name, predict in found.items():
        policy = greedy_policy(log, predict, spec, catalog)
        chosen = log.pair_offer == policy.action[r]
        expected = float((policy.q_pair - policy.q0[r])[chosen].sum())
        sent = int((policy.action != NO_ACTION).sum())
        results[name] = {
            "sent": sent, "true_incremental": value(policy.action), "expected": expected,
        }  # fmt: skip
    return {"seed": seed, "holdout_decisions": log.n, "results": results,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=42)
    parser.add_argument("--out", default="/tmp/bench-uplift-policy")
    args = parser.parse_args()
    for s in args.seeds.split(","):
        print(json.dumps(one_seed(int(s), args.customers, args.days, args.out)), flush=True)


if __name__ == "__main__":
    main()
