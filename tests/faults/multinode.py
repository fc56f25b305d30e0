"""The engine on a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): shards
on both nodes, a shard of the second node killed, then the second node removed, during a replay
with checkpoints. Prints one JSON line: the outputs' digests with and without the faults, the
nodes the shards ran on, the recoveries. Run by ``tests/faults/test_multinode.py`` in a process
of its own (a driver joins one cluster per process).

    python -m tests.faults.multinode --events 300000
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from deploy.replay import replay
from engine.config import EngineSettings
from engine.rules.spec import load_rules
from engine.synthetic.telco import events, population
from loadtests.digest import digests
from tests.conftest import RULES_FILE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=300_000)
    args = parser.parse_args()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 300 << 20},
    )
    second = cluster.add_node(num_cpus=2, object_store_memory=300 << 20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    rules = load_rules(RULES_FILE)
    settings = EngineSettings(shards=4, allowed_lateness_s=60, dedupe_window_s=3600)
    stream = events(population(args.events // 20, seed=2), args.events, days=30, seed=2)
    out = Path(tempfile.mkdtemp())
    clean = replay(stream, settings, rules, out / "clean", chunk=10_000, shard_cpus=0.25)
    second_id = second.node_id
    seen_nodes: set[str] = set()
    faults: list[str] = []
    step = 0

    def on_step(supervisor, pipeline) -> None:
        nonlocal step
        step += 1
        try:
            stats = ray.get([s.stats.remote() for s in supervisor.shards])
        except ray.exceptions.RayActorError:
            return  # killed, not noticed by the pipeline yet
        seen_nodes.update(s["node"] for s in stats)
        on_second = [
            sh for sh, s in zip(supervisor.shards, stats, strict=True) if s["node"] == second_id
        ]
        if not faults and on_second:
            after = 2
        elif len(faults) == 1 and len(pipeline.recoveries) == 1:
            after = 4
        else:
            return
        if pipeline.epoch < after:
            # checkpoints are due every 0.2 s; on a machine fast enough to read the stream
            # between two, begin one here so each fault comes after its checkpoint
            if not pipeline.checkpoint_in_flight:
                pipeline.begin_checkpoint()
        elif not faults:
            ray.kill(on_second[0])
            faults.append("a shard on the second node killed")
        else:
            cluster.remove_node(second)
            faults.append("the second node removed")

    faulty = replay(
        stream, settings, rules, out / "faulty", chunk=10_000, shard_cpus=0.25,
        checkpoint_every_s=0.2, on_step=on_step,
    )  # fmt: skip
    print(
        json.dumps(
            {
                "clean": digests(out / "clean", clean.run),
                "faulty": digests(out / "faulty", faulty.run),
                "applied": [clean.stats["applied"], faulty.stats["applied"]],
                "nodes": len(seen_nodes),
                "second_node_used": second_id in seen_nodes,
                "faults": faults,
                "recoveries": [[r.error, round(r.seconds, 2)] for r in faulty.recoveries],
            }
        )
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
