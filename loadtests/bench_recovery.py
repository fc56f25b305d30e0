"""Recovery benchmark: checkpoint and restore an engine holding ~1,000,000 customers, and the
time from a shard kill to the next applied micro-batch.

Builds the state once (a replay of --events over --customers on --shards shards), then
``--repeat`` times: takes a checkpoint (an aligned cut: drain, snapshots, manifest, CURRENT),
restores it into the same shards (``Supervisor.recover``: every shard reads its snapshot), kills
a shard and times the pipeline until the next micro-batch is applied (spare takes over, every
shard restored, the source rewound). Prints one JSON line with the medians and every run.

    python loadtests/bench_recovery.py --customers 1000000 --events 3000000 --shards 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.runtime import init_ray
from actors.supervisor import Supervisor
from deploy.paths import DEFAULT_RULES as RULES
from engine.config import EngineSettings
from engine.errors import WorkerLostError
from engine.pipeline import Pipeline
from engine.rules.spec import load_rules
from engine.source import TableSource
from engine.synthetic.telco import events, population


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    init_ray(num_cpus=max(2, args.shards), object_store_mb=3072)
    table = events(population(args.customers, seed=1), args.events, days=30, seed=1)
    settings = EngineSettings(shards=args.shards, allowed_lateness_s=10)
    with tempfile.TemporaryDirectory() as folder:
        supervisor = Supervisor(
            settings, load_rules(RULES), shard_cpus=min(0.5, 1.8 / args.shards),
            checkpoint_root=f"{folder}/checkpoints", namespace_prefix="bench-recovery",
        )  # fmt: skip
        supervisor.ready(spares=True)
        source = TableSource(table, "bench")
        pipeline = Pipeline(source, supervisor, None, chunk=100_000)
        pipeline.start()
        stretch = 200_000 * max(1, args.repeat)  # kept for the kills: each needs calls
        while source.position < table.num_rows - stretch:
            pipeline.step()
        customers = sum(s["customers"] for s in supervisor.shard_stats())
        writes, restores, kills = [], [], []
        for _ in range(max(1, args.repeat)):
            started = time.perf_counter()
            pipeline.checkpoint()
            writes.append(time.perf_counter() - started)
            started = time.perf_counter()
            supervisor.recover()
            restores.append(time.perf_counter() - started)
            ray.kill(supervisor.shards[0])
            started = time.perf_counter()
            before = len(pipeline.recoveries)
            while len(pipeline.recoveries) == before:  # the next call finds the shard gone
                pipeline.step()
                try:
                    supervisor.router.drain()
                except WorkerLostError as exc:
                    pipeline.recover(exc)
            pipeline.step()  # a micro-batch after the recovery ...
            supervisor.router.drain()  # ... applied
            kills.append(time.perf_counter() - started)
        restored = sum(s["customers"] for s in supervisor.shard_stats())
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 3
        supervisor.shutdown()
    print(
        json.dumps(
            {
                "customers": customers,
                "customers_after_restore": restored,
                "shards": args.shards,
                "checkpoint_mb": round(size / 1e6, 1),
                "checkpoint_s_median": round(statistics.median(writes), 3),
                "checkpoint_s_runs": [round(x, 3) for x in writes],
                "restore_s_median": round(statistics.median(restores), 3),
                "restore_s_runs": [round(x, 3) for x in restores],
                "kill_to_applied_s_median": round(statistics.median(kills), 3),
                "kill_to_applied_s_runs": [round(x, 3) for x in kills],
            }
        )
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
