"""Ranker benchmark: candidate rows scored per second through a Ray Serve handle.

Deploys the ranker (XGBoost Booster bootstrapped on a simulated log) and sends feature
matrices of --rows rows, --concurrency requests in flight, for --seconds. Prints one JSON
line: rows_per_s, requests_per_s, p50_ms / p99_ms per request, and the in-process
Booster rate on the same matrix for comparison.

    python loadtests/bench_ranker.py --rows 100000 --concurrency 2 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.runtime import init_ray
from engine.decision.catalog import load_catalog
from engine.decision.features import CONTEXT_FIELDS, build_features, feature_spec
from engine.decision.scorer import ScoreRequest
from engine.rules.spec import load_rules
from models.bootstrap import ensure_champion
from models.deployment import deploy_ranker
from models.ranker import Ranker, RankerConfig
from models.registry import ModelRegistry

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "config"


def matrix(rows: int, seed: int = 0) -> ScoreRequest:
    catalog = load_catalog(CONFIG / "offers.yaml")
    spec = feature_spec(catalog.trigger_ids, catalog.offer_ids)
    rng = np.random.default_rng(seed)
    context = {name: rng.uniform(0, 50, rows).astype(np.float32) for name in CONTEXT_FIELDS}
    x = build_features(
        context,
        rng.choice(np.array(spec.triggers, dtype=object), rows),
        rng.choice(np.array(spec.offers, dtype=object), rows),
        spec,
    )
    keys = rng.integers(0, 2**63, rows, dtype=np.int64).astype(np.uint64)
    return ScoreRequest(x, spec.names, keys)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    init_ray(num_cpus=2, object_store_mb=1024)
    with tempfile.TemporaryDirectory() as root:
        registry = ModelRegistry(root)
        version = ensure_champion(
            registry, load_rules(CONFIG / "rules.yaml"), load_catalog(CONFIG / "offers.yaml")
        )
        config = RankerConfig(registry=registry.uri, champion=version)
        handle = deploy_ranker(config, replicas=args.replicas, num_cpus=0.5)
        request = matrix(args.rows)
        local = Ranker(config)
        started = time.perf_counter()
        local.score(request)
        local_rate = args.rows / (time.perf_counter() - started)
        handle.remote(request).result(timeout_s=60)  # warm
        latencies: list[float] = []
        rows = 0
        deadline = time.perf_counter() + args.seconds
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            pending = [handle.remote(request) for _ in range(args.concurrency)]
            for p in pending:
                p.result(timeout_s=60)
                rows += args.rows
            latencies.append((time.perf_counter() - sent) * 1000)
        elapsed = time.perf_counter() - started
        print(
            json.dumps(
                {
                    "rows_per_request": args.rows,
                    "concurrency": args.concurrency,
                    "replicas": args.replicas,
                    "features": len(request.feature_names),
                    "rows_per_s": round(rows / elapsed),
                    "requests_per_s": round(rows / args.rows / elapsed, 1),
                    "p50_ms": round(float(np.percentile(latencies, 50)), 1),
                    "p99_ms": round(float(np.percentile(latencies, 99)), 1),
                    "in_process_rows_per_s": round(local_rate),
                    "model_version": version,
                }
            )
        )


if __name__ == "__main__":
    main()
