"""Scoring one request in one process: the response model against an uplift model's three
boosters, called one by one and merged into one (``models.uplift.merge_boosters``).

No Ray, one OpenMP thread (as in a ranker replica, whose fraction of a CPU gives XGBoost one).
The response model is the shipped bootstrap champion (what ``bench_throughput.py
--decisions`` serves); the uplift model is ``bench_ranker.py``'s (three boosters of
``UPLIFT_ROUNDS`` depth-5 trees with calibration lines). Each round times ``--calls``
requests of ``--rows`` rows with each of the three, in turn; the medians over ``--rounds``
rounds are printed with every round's figure, as one JSON line per row count.

    python loadtests/bench_scoring.py --rows 1100 10000 --rounds 7
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.paths import DEFAULT_OFFERS, DEFAULT_RULES
from engine.decision.catalog import load_catalog
from engine.decision.scorer import ScoreRequest
from engine.rules.spec import load_rules
from loadtests.bench_ranker import matrix, uplift_model
from models.bootstrap import ensure_champion
from models.ranker import Ranker, RankerConfig
from models.registry import ModelRegistry


def per_call_ms(
    score: Callable[[ScoreRequest], object], request: ScoreRequest, calls: int
) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        score(request)
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--rows", type=int, nargs="+", default=[1_100, 10_000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        registry = ModelRegistry(f"{root}/response")
        response = ensure_champion(
            registry, load_rules(DEFAULT_RULES), load_catalog(DEFAULT_OFFERS)
        )
        uplift_registry = ModelRegistry(f"{root}/uplift")
        uplift = uplift_model(uplift_registry, matrix(50_000, seed=1))
        rankers = {
            "response": Ranker(RankerConfig(registry=registry.uri, champion=response)),
            "uplift_merged": Ranker(RankerConfig(registry=uplift_registry.uri, champion=uplift)),
            "uplift_three_calls": Ranker(
                RankerConfig(registry=uplift_registry.uri, champion=uplift)
            ),
        }
        # this ranker's own Arms, told to score the boosters one by one, as before the merge
        rankers["uplift_three_calls"].models[0].arms.joint = None
        assert rankers["uplift_merged"].models[0].arms.joint is not None
        for rows in args.rows:
            request = matrix(rows, seed=2)
            for ranker in rankers.values():
                ranker.score(request)  # warm
            runs: dict[str, list[float]] = {name: [] for name in rankers}
            for _ in range(args.rounds):
                for name, ranker in rankers.items():
                    runs[name].append(round(per_call_ms(ranker.score, request, args.calls), 3))
            medians = {name: statistics.median(r) for name, r in runs.items()}
            print(
                json.dumps(
                    {
                        "rows": rows,
                        "omp_threads": os.environ["OMP_NUM_THREADS"],
                        **{f"{name}_ms": round(m, 3) for name, m in medians.items()},
                        "merged_over_response": round(
                            medians["uplift_merged"] / medians["response"], 3
                        ),
                        "three_calls_over_response": round(
                            medians["uplift_three_calls"] / medians["response"], 3
                        ),
                        "runs_ms": runs,
                    }
                )
            )


if __name__ == "__main__":
    main()
