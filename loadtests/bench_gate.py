"""The incremental-value gate's power: how often it promotes a candidate 5 % better than the
champion, and a 5 % worse one, by holdout size and exploration.

The world is the unit test's logged bandit (``tests/unit/models/test_incremental.py``): two
offers, a truth of P(convert | offer), P(convert | no action) and P(opt-out | contact), a
champion halfway between a wrong model and the truth, and candidates made 5 % better (the
truth on a fixed share of contexts) or 5 % worse (the wrong model on a share) in true
incremental value. The champion logs each trial's decisions with the engine's randomization
(a 10 % no-action arm, then ``--explore`` uniform exploration); outcomes are drawn afresh.

    python loadtests/bench_gate.py --explore 0.05,0.2 --decisions 20000,50000,100000,200000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.incremental import incremental_gain
from tests.unit.models import test_incremental as world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explore", default="0.05,0.2")
    parser.add_argument("--decisions", default="20000,50000,100000,200000")
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    value, better_share, worse_share = world.levels()
    candidates = {
        "better": world.mixed(world.truth, world.CHAMPION, better_share),
        "worse": world.mixed(world.blend(0.0), world.CHAMPION, worse_share),
    }
    for explore in (float(e) for e in args.explore.split(",")):
        for n in (int(d) for d in args.decisions.split(",")):
            promoted = {}
            for name, candidate in candidates.items():
                wins = 0
                for trial in range(args.trials):
                    log = world.logged(n, world.CHAMPION, 5_000 + trial, explore)
                    report = incremental_gain(log, candidate, world.CHAMPION, world.SPEC,
                                              world.CATALOG)  # fmt: skip
                    wins += report.promoted
                promoted[name] = wins / args.trials
            print(json.dumps({"explore": explore, "decisions": n, "trials": args.trials,
                              "champion_value": value, **promoted}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
