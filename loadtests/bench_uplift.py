"""Which uplift learner, measured: Qini / AUUC on a randomized holdout, and calibration.

For each seed of the uplift world (``engine/synthetic/uplift.py``) the ``rules`` policy runs
the whole period (it sends every eligible offer, so the log has many delivered offers and a 5 %
control group), ``models.attribution`` labels every (decision, offer) row, and three models are
trained on the first 75 % of the time and judged on the rest:

* ``response``: P(convert | offer) alone (what Kairos's ranker learns), ranking by it;
* ``t-learner``: P(convert | offer) - P(convert | no action), two boosters;
* ``s-learner``: one booster with the treatment as a feature;
* ``truth``: the simulator's own uplift of each row (the ceiling of any ranking).

The holdout is the control group's experiment (``models.uplift.randomized``), with the
control group at ``--control-share`` (30 %) instead of the shipped 5 % so it is large enough to
rank on. Run:

    python loadtests/bench_uplift.py --seeds 7,8,9 [--customers 20000 --days 84]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa

from deploy.paths import DEFAULT_OFFERS, DEFAULT_RULES
from engine.decision.catalog import load_catalog, parse_catalog
from engine.decision.features import feature_spec
from engine.governance.pseudonym import Pseudonymizer
from engine.rules.spec import load_rules
from engine.synthetic.uplift import UpliftSimulator
from models.attribution import attribute
from models.simulate import Simulation, SimulationConfig
from models.training import calibration_error
from models.uplift import fit_s_learner, fit_t_learner, qini, randomized, uplift_rows


def one_seed(
    seed: int, customers: int, days: int, control_share: float, out: str
) -> dict[str, object]:
    config = SimulationConfig(customers=customers, days=days, warmup_days=days - 1, seed=seed,
                              world="uplift")  # fmt: skip
    shipped = load_catalog(DEFAULT_OFFERS)
    # a larger control group than the shipped 5 %: the experiment the holdout is judged on
    policy = {**shipped.document["policy"], "control_share": control_share}
    catalog = parse_catalog({**shipped.document, "policy": policy}, "bench")
    sim = Simulation(config, load_rules(DEFAULT_RULES), catalog, out)
    started = time.perf_counter()
    run = sim.run("rules")
    decisions = pa.concat_tables(run.decisions)
    events = pa.concat_tables(run.responses)
    cutoff = sim.t0 + days * 86_400_000
    pairs = attribute(decisions, events, catalog, cutoff, Pseudonymizer(sim.settings.pseudonym_key))
    spec = feature_spec(catalog.trigger_ids, catalog.offer_ids)
    data = uplift_rows(decisions, pairs, spec)
    boundary = np.quantile(data.ts, 0.75)
    train, test = (
        data.take(np.flatnonzero(data.ts < boundary)),
        data.take(np.flatnonzero(data.ts >= boundary)),
    )
    t_model = fit_t_learner(train, spec.names)
    s_model = fit_s_learner(train, spec.names)
    exp = test.take(randomized(test))
    p1, p0, _ = t_model.predict(exp.features)
    names = list(spec.names)

    def ctx(name: str) -> np.ndarray:
        return exp.features[:, names.index(name)].astype(np.float64)

    truth = sim.simulator()
    assert isinstance(truth, UpliftSimulator)
    t1, t0, _ = truth.arms(
        truth.index_of(exp.customer_key),
        exp.offer, ctx("days_left"), ctx("km_from_home"), ctx("cart_items"), ctx("contacts_7d"),
    )  # fmt: skip
    scores = {"response": p1, "t-learner": p1 - p0, "s-learner": s_model.uplift(exp.features),
              "truth": t1 - t0}  # fmt: skip
    all_p1, all_p0, all_out = t_model.predict(test.features)
    t = test.treated
    return {
        "seed": seed,
        "rows": {"train": int(train.treated.size), "holdout": int(test.treated.size),
                 "experiment": int(exp.treated.size), "control": int((~exp.treated).sum())},
        "qini": {name: qini(s, exp.treated, exp.converted) for name, s in scores.items()},
        "calibration_error": {
            "p_convert_offer": calibration_error(test.converted[t], all_p1[t]),
            "p_convert_no_action": calibration_error(test.converted[~t], all_p0[~t]),
            "p_opt_out": calibration_error(test.opted_out[t], all_out[t]),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="7,8,9")
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--days", type=int, default=84)
    parser.add_argument("--control-share", type=float, default=0.3)
    parser.add_argument("--out", default="/tmp/bench-uplift")
    args = parser.parse_args()
    results = [
        one_seed(int(s), args.customers, args.days, args.control_share, args.out)
        for s in args.seeds.split(",")
    ]
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
