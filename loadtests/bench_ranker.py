"""Ranker benchmark: candidate rows scored per second through a Ray Serve handle.

Deploys the ranker and sends feature matrices of --rows rows, --concurrency requests in
flight, for --seconds. Prints one JSON line: rows_per_s, requests_per_s, p50_ms / p99_ms per
request, the in-process Booster rate on the same matrix for comparison, and the model's size.

The model (--model): ``full`` (default) is the largest the training settings allow, 150 trees
grown to depth 5 on labels that depend on many features, the worst case for scoring speed;
``bootstrap`` is the champion a fresh service trains on a short simulated log (shallower
trees: its data is small and recency-weighted); ``uplift`` is an uplift model (issue 16) of
three boosters of ``UPLIFT_ROUNDS`` (50) depth-5 trees (P(convert | offer), P(convert | no
action), P(opt-out)) with calibration lines for every offer: as many trees per row as
``full``.

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

from ray import serve

from actors.runtime import init_ray
from deploy.paths import DEFAULT_OFFERS, DEFAULT_RULES
from deploy.ranker import start_ranker
from engine.decision.catalog import load_catalog
from engine.decision.features import CONTEXT_FIELDS, build_features, feature_spec
from engine.decision.scorer import RANKER_APP, RANKER_DEPLOYMENT, ScoreRequest
from engine.rules.spec import load_rules
from models.promotion import UPLIFT_ROUNDS
from models.ranker import Ranker, RankerConfig
from models.registry import ModelRegistry
from models.training import fit


def matrix(rows: int, seed: int = 0) -> ScoreRequest:
    catalog = load_catalog(DEFAULT_OFFERS)
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


def full_model(registry: ModelRegistry, sample: ScoreRequest) -> str:
    """Register and promote a model of the largest size training allows; its version."""
    x = sample.features
    rng = np.random.default_rng(2)
    logit = np.sin(x[:, :8] / 7.0).sum(axis=1) + 0.5 * x[:, 13:].sum(axis=1) - 1.0
    labels = (rng.random(x.shape[0]) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    booster = fit(x, labels, sample.feature_names)
    artifact = registry.register(booster, sample.feature_names, {"benchmark": "full"})
    registry.set_champion(artifact.version)
    return artifact.version


def uplift_model(registry: ModelRegistry, sample: ScoreRequest) -> str:
    """Register and promote an uplift model of three boosters of ``UPLIFT_ROUNDS`` trees (the
    size ``uplift_round`` trains); its version."""
    x = sample.features
    rng = np.random.default_rng(3)
    boosters = []
    for shift in (0.0, -1.0, -3.0):
        logit = np.sin(x[:, :8] / 7.0).sum(axis=1) + 0.5 * x[:, 13:].sum(axis=1) + shift
        labels = (rng.random(x.shape[0]) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        boosters.append(fit(x, labels, sample.feature_names, rounds=UPLIFT_ROUNDS))
    lines = {name.split("=", 1)[1]: (0.01, 0.5) for name in sample.feature_names
             if name.startswith("offer=")}  # fmt: skip
    artifact = registry.register(boosters[0], sample.feature_names, {"benchmark": "uplift"},
                                 uplift=(boosters[1], boosters[2]), lines=lines)  # fmt: skip
    registry.set_champion(artifact.version)
    return artifact.version


def model_size(registry: ModelRegistry, version: str) -> dict[str, float]:
    trees = registry.load(version).booster.get_dump()
    leaves = [tree.count("leaf=") for tree in trees]
    return {"trees": len(trees), "leaves_per_tree": round(float(np.mean(leaves)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--model", choices=("full", "bootstrap", "uplift"), default="full")
    args = parser.parse_args()
    init_ray(num_cpus=2, object_store_mb=1024)
    with tempfile.TemporaryDirectory() as root:
        registry = ModelRegistry(root)
        request = matrix(args.rows)
        version = None  # bootstrap: the registry's first champion
        if args.model == "full":
            version = full_model(registry, matrix(50_000, seed=1))
        elif args.model == "uplift":
            version = uplift_model(registry, matrix(50_000, seed=1))
        version = start_ranker(
            registry.uri,
            load_rules(DEFAULT_RULES),
            load_catalog(DEFAULT_OFFERS),
            version=version,
            replicas=args.replicas,
            num_cpus=0.5,
        )
        config = RankerConfig(registry=registry.uri, champion=version)
        handle = serve.get_deployment_handle(RANKER_DEPLOYMENT, app_name=RANKER_APP)
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
                    "model": args.model,
                    "model_version": version,
                    **model_size(registry, version),
                }
            )
        )


if __name__ == "__main__":
    main()
