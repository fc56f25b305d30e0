"""Throughput benchmark: Parquet in memory -> router -> shard actors -> triggers collected.

Prints one JSON line per shard count with events_per_s (end to end), p50_ms / p99_ms (micro-
batch latency, router in -> triggers out), state_bytes_per_customer and peak_rss_mb. With
--decisions every trigger is also decided (shipped offer catalog, the ranker on Ray Serve,
the decision log written by day), and decide_p50_ms / decide_p99_ms give the time from a
step's triggers to its logged decisions (a shard applies a micro-batch in steps of at most
--decision-step events, 16,384 by default, one scoring request each). Each shard count runs
``--repeat`` times (3) on fresh shards; the median run is printed, with every run's
events_per_s and the first one's.

``--compare-rules FILE`` runs each repeat twice, alternately with the shipped rules and with
FILE (``loadtests/rules_before_patterns.yaml``: the shipped rules before patterns, windows and
reference data), and prints both medians and their ratio (the shipped rules' events/s over
FILE's: 0.8 means the shipped rules keep 80 % of FILE's throughput).
Every run has the shipped reference tables (``deploy/config/reference.yaml``).

``--checkpoint-every S`` runs each repeat twice, alternately: without checkpoints and through
the durable pipeline (``engine.pipeline``: a checkpoint every S seconds and one at the end, the
sinks committed with them), and prints both medians and their ratio.

    python loadtests/bench_throughput.py --events 2000000 --customers 200000 --shards 1 2 4
    python loadtests/bench_throughput.py --shards 2 --repeat 5 --checkpoint-every 1
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.runtime import init_ray, peak_rss_mb
from actors.scorer import ServeScorer
from actors.supervisor import Supervisor
from deploy.paths import DEFAULT_OFFERS as OFFERS
from deploy.paths import DEFAULT_REFERENCE
from deploy.paths import DEFAULT_RULES as RULES
from deploy.ranker import start_ranker as deploy_champion
from engine.config import EngineSettings
from engine.decision.catalog import Catalog, load_catalog
from engine.pipeline import Pipeline
from engine.reference import load_reference
from engine.rules.spec import load_rules
from engine.source import TableSource
from engine.synthetic.telco import events, population


def parquet_bytes(customers: int, total: int, seed: int) -> bytes:
    table = events(population(customers, seed), total, seed=seed)
    sink = io.BytesIO()
    pq.write_table(
        table,
        sink,
        row_group_size=500_000,
        use_dictionary=["customer_id", "kind"],
        dictionary_pagesize_limit=64 << 20,
    )
    return sink.getvalue()


def start_ranker(out_dir: str, uplift: bool = False) -> Catalog:
    """Deploy the ranker with a bootstrapped champion (``uplift``: an uplift model of three
    full-size boosters, as ``bench_ranker.py --model uplift``); returns the catalog it serves."""
    catalog = load_catalog(OFFERS)
    if not uplift:
        deploy_champion(f"{out_dir}/models", load_rules(RULES), catalog)
        return catalog
    from loadtests.bench_ranker import matrix, uplift_model
    from models.registry import ModelRegistry

    registry = ModelRegistry(f"{out_dir}/models-uplift")
    version = uplift_model(registry, matrix(50_000, seed=1))
    deploy_champion(registry.uri, catalog=catalog, version=version)
    return catalog


def run(
    data: bytes,
    settings: EngineSettings,
    batch: int,
    out_dir: str,
    catalog: Catalog | None,
    checkpoint_every: float | None = None,
    rules_path: str | Path = RULES,
) -> dict[str, object]:
    shards = settings.shards
    rules = load_rules(rules_path)
    root = f"{out_dir}/checkpoints-{shards}-{time.time_ns()}" if checkpoint_every else None
    supervisor = Supervisor(
        settings,
        rules,
        trigger_uri=f"{out_dir}/triggers-{shards}",
        shard_cpus=min(0.5, 1.8 / shards),
        namespace_prefix=f"bench{shards}",
        catalog=catalog,
        scorer=ServeScorer() if catalog else None,
        decision_uri=f"{out_dir}/decisions-{shards}" if catalog else None,
        checkpoint_root=root,
        reference=load_reference(DEFAULT_REFERENCE),
    )
    supervisor.ready(spares=True)  # every actor (shards, sinks) is up before the clock starts
    if catalog is not None:
        supervisor.connect_scorers()  # as a service does at start, not on the first decision
    started = time.perf_counter()
    table = pq.read_table(pa.BufferReader(data), read_dictionary=["customer_id"])
    checkpoints = 0
    if checkpoint_every is None:
        for start in range(0, table.num_rows, batch):
            supervisor.router.submit(table.slice(start, batch))
        written = supervisor.router.end_stream()
    else:
        pipeline = Pipeline(TableSource(table, "bench"), supervisor, checkpoint_every, chunk=batch)
        pipeline.start()
        pipeline.run()
        checkpoints = pipeline.epoch
        written = ray.get(supervisor.sink.summary.remote()) if supervisor.sink else {}
    elapsed = time.perf_counter() - started
    stats = supervisor.router.stats
    shard_stats = supervisor.shard_stats()
    customers = sum(s["customers"] for s in shard_stats)
    result = {
        "shards": shards,
        "events": table.num_rows,
        "events_per_s": round(table.num_rows / elapsed),
        "checkpoint_every_s": checkpoint_every,
        "checkpoints": checkpoints,
        "checkpoint_times": getattr(supervisor, "checkpoint_times", []),
        "seconds": round(elapsed, 3),
        "p50_ms": round(stats.percentile(50), 2),
        "p99_ms": round(stats.percentile(99), 2),
        "micro_batches": stats.micro_batches,
        "micro_batch_max_events": settings.micro_batch_max_events,
        "decision_step_max_events": settings.decision_step_max_events if catalog else None,
        "applied": stats.applied,
        "rejected": stats.rejected,
        "duplicates": stats.duplicates,
        "triggers": stats.triggers,
        "triggers_written": written.get("rows"),
        "triggers_by_rule": dict(stats.triggers_by_rule),
        "decisions": stats.decisions,
        "decide_p50_ms": round(stats.percentile(50, stats.decide_ms), 2),
        "decide_p99_ms": round(stats.percentile(99, stats.decide_ms), 2),
        "decide_ms_all": [round(x, 1) for x in stats.decide_ms],
        **_scoring(shard_stats),
        "customers": customers,
        "state_bytes_per_customer": round(
            sum(s["state_bytes"] for s in shard_stats) / customers, 1
        ),
        "state_bytes_per_customer_columns": shard_stats[0]["state_bytes_per_customer"],
        "peak_rss_mb": round(peak_rss_mb() + sum(s["peak_rss_mb"] for s in shard_stats), 1),
        "peak_rss_mb_driver": round(peak_rss_mb(), 1),
        "peak_rss_mb_per_shard": round(max(s["peak_rss_mb"] for s in shard_stats), 1),
    }
    supervisor.shutdown()
    return result


def _scoring(shard_stats: list[dict]) -> dict[str, object]:
    """Scoring requests over all shards: how many, their mean rows, and the mean time a shard
    waited for one (the ranker's share of a decision step, with the hop to it)."""
    requests = sum(s.get("score_requests", 0) for s in shard_stats)
    if not requests:
        return {}
    return {
        "score_requests": requests,
        "scored_rows_mean": round(sum(s["scored_rows"] for s in shard_stats) / requests, 1),
        "score_ms_mean": round(sum(s["score_ms"] for s in shard_stats) / requests, 2),
    }


def median_run(runs: list[dict[str, object]]) -> dict[str, object]:
    """The run with the median throughput, with every run's throughput beside it.

    This VM's speed wanders by +-10 % from minute to minute, and the first run in a fresh
    process pays for warming its memory (page faults on the object store and the driver's
    heap): one run says little. ``events_per_s_first`` keeps that first, cold run visible.
    """
    ordered = sorted(runs, key=lambda r: float(r["events_per_s"]))  # type: ignore[arg-type]
    middle = dict(ordered[(len(ordered) - 1) // 2])
    middle["events_per_s_runs"] = [r["events_per_s"] for r in runs]
    middle["events_per_s_first"] = runs[0]["events_per_s"]
    middle["runs"] = len(runs)
    return middle


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--shards", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=100_000, help="rows per router submit")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per shard count (fresh shards each time); the median run is reported",
    )
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=EngineSettings().micro_batch_max_events,
        help="max events per shard call",
    )
    parser.add_argument(
        "--decision-step",
        type=int,
        default=EngineSettings().decision_step_max_events,
        help="with --decisions: max events a shard applies per step (one scoring request each)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=None,
        help="also run through the durable pipeline, checkpointing every S seconds; compare",
    )
    parser.add_argument(
        "--decisions",
        action="store_true",
        help="decide on every trigger: shipped catalog, ranker on Ray Serve, decision log",
    )
    parser.add_argument(
        "--uplift",
        action="store_true",
        help="with --decisions: the ranker serves an uplift model (three boosters)",
    )
    parser.add_argument(
        "--compare-rules",
        type=Path,
        default=None,
        help="also run with this rule file, alternately with the shipped one; compare",
    )
    args = parser.parse_args()
    data = parquet_bytes(args.customers, args.events, args.seed)
    init_ray(num_cpus=max(2, *args.shards), object_store_mb=2048)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "cpus": __import__("os").cpu_count(),
                "parquet_mb": round(len(data) / 1e6, 1),
            }
        ),
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as out_dir:
        catalog = start_ranker(out_dir, args.uplift) if args.decisions else None
        for shards in args.shards:
            settings = EngineSettings(
                shards=shards,
                allowed_lateness_s=10,
                micro_batch_max_events=args.micro_batch,
                decision_step_max_events=args.decision_step,
            )
            if args.compare_rules is not None:
                shipped, other = [], []
                for _ in range(max(1, args.repeat)):  # alternately: the VM's speed drifts
                    shipped.append(run(data, settings, args.batch, out_dir, catalog))
                    other.append(
                        run(data, settings, args.batch, out_dir, catalog, None, args.compare_rules)
                    )
                a, b = median_run(shipped), median_run(other)
                print(json.dumps({"shipped_rules": a}), flush=True)
                print(json.dumps({"rules": str(args.compare_rules), **b}), flush=True)
                ratio = float(a["events_per_s"]) / float(b["events_per_s"])  # type: ignore[arg-type]
                print(
                    json.dumps({"shards": shards, "throughput_ratio": round(ratio, 3)}), flush=True
                )
                continue
            if args.checkpoint_every is None:
                runs = [
                    run(data, settings, args.batch, out_dir, catalog)
                    for _ in range(max(1, args.repeat))
                ]
                print(json.dumps(median_run(runs)), flush=True)
                continue
            plain, durable = [], []
            for _ in range(max(1, args.repeat)):  # alternately: the VM's speed drifts
                plain.append(run(data, settings, args.batch, out_dir, catalog))
                durable.append(
                    run(data, settings, args.batch, out_dir, catalog, args.checkpoint_every)
                )
            a, b = median_run(plain), median_run(durable)
            print(json.dumps({"without_checkpoints": a}), flush=True)
            print(json.dumps({"with_checkpoints": b}), flush=True)
            ratio = float(b["events_per_s"]) / float(a["events_per_s"])  # type: ignore[arg-type]
            print(json.dumps({"shards": shards, "throughput_ratio": round(ratio, 3)}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
