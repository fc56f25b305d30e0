"""Throughput benchmark: Parquet in memory -> router -> shard actors -> triggers collected.

Prints one JSON line per shard count with events_per_s (end to end), p50_ms / p99_ms (micro-
batch latency, router in -> triggers out), state_bytes_per_customer and peak_rss_mb.

    python loadtests/bench_throughput.py --events 2000000 --customers 200000 --shards 1 2 4
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
from actors.supervisor import Supervisor
from engine.config import EngineSettings
from engine.rules.spec import load_rules
from engine.synthetic.telco import events, population

RULES = Path(__file__).resolve().parents[1] / "deploy" / "config" / "rules.yaml"


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


def run(data: bytes, shards: int, batch: int, out_dir: str, micro: int) -> dict[str, object]:
    settings = EngineSettings(shards=shards, allowed_lateness_s=10, micro_batch_max_events=micro)
    rules = load_rules(RULES)
    supervisor = Supervisor(
        settings,
        rules,
        trigger_uri=f"{out_dir}/triggers-{shards}",
        shard_cpus=min(0.5, 1.8 / shards),
        namespace_prefix=f"bench{shards}",
    )
    ray.get([s.stats.remote() for s in supervisor.shards])  # actors up before the clock starts
    started = time.perf_counter()
    table = pq.read_table(pa.BufferReader(data), read_dictionary=["customer_id"])
    for start in range(0, table.num_rows, batch):
        supervisor.router.submit(table.slice(start, batch))
    written = supervisor.router.flush()
    elapsed = time.perf_counter() - started
    stats = supervisor.router.stats
    shard_stats = supervisor.shard_stats()
    customers = sum(s["customers"] for s in shard_stats)
    result = {
        "shards": shards,
        "events": table.num_rows,
        "events_per_s": round(table.num_rows / elapsed),
        "seconds": round(elapsed, 3),
        "p50_ms": round(stats.percentile(50), 2),
        "p99_ms": round(stats.percentile(99), 2),
        "micro_batches": stats.micro_batches,
        "applied": stats.applied,
        "rejected": stats.rejected,
        "duplicates": stats.duplicates,
        "triggers": stats.triggers,
        "triggers_written": written.get("rows"),
        "triggers_by_rule": dict(stats.triggers_by_rule),
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
        "--micro-batch",
        type=int,
        default=EngineSettings().micro_batch_max_events,
        help="max events per shard call",
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
        for shards in args.shards:
            print(json.dumps(run(data, shards, args.batch, out_dir, args.micro_batch)), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
