"""Kill shard actors during a replay: the engine recovers by itself and its outputs equal a run
without faults.

Each run replays the same synthetic telco stream with decisions (a fixed scorer, so no Serve),
checkpoints every 0.2 s, and kills a random shard actor after chosen steps. Compared with
the fault-free run: the trigger and decision logs (row counts and a SHA-256 over every column,
``loadtests/digest.py``), the events applied and dropped as duplicates (shard counters, which a
checkpoint holds and a restore rolls back: an event applied twice would count twice), and the
golden records of a sample of customers. Each recovery (from the failed call to the source
rewound, every shard restored) takes under 3 s.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import ray

from deploy.replay import replay
from engine.config import EngineSettings
from engine.decision.catalog import load_catalog
from engine.synthetic.telco import events, population
from engine.testing import FixedScorer
from loadtests.digest import digests
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def _settings(shards: int) -> EngineSettings:
    return EngineSettings(shards=shards, allowed_lateness_s=60, dedupe_window_s=3600)


def _run(stream, shards, out: Path, rules, kills: int, gap: int = 2, seed: int = 0):
    """Replay ``stream``; ``kills`` times, ``gap`` steps after the previous recovery (or the
    start) and a checkpoint, kill a random shard actor."""
    chooser = random.Random(seed)
    done = 0
    since = 0
    epoch = 0

    def on_step(supervisor, pipeline) -> None:
        """Kill when the last kill was recovered from (its spare replaced too), ``gap`` steps
        went by and a checkpoint came since. Checkpoints are due every 0.2 s; a machine fast
        enough to read the whole stream between two would see too few kills, so one is begun
        here when none came. The kill waits for the spares the supervisor keeps to have
        started: a kill while both are still starting is a second fault before the first
        healed, whose recovery includes starting an actor (1.5-3 s here)."""
        nonlocal done, since, epoch
        since += 1
        if done == kills or len(pipeline.recoveries) != done or since < gap:
            return
        if pipeline.epoch > epoch:
            ray.get([spare.loaded.remote() for spare in supervisor.spares], timeout=120)
            ray.kill(chooser.choice(supervisor.shards))
            done += 1
            since = 0
            epoch = pipeline.epoch
        elif not pipeline.checkpoint_in_flight:
            pipeline.begin_checkpoint()

    catalog = load_catalog(ROOT / "deploy" / "config" / "offers.yaml")
    report = replay(
        stream, _settings(shards), rules, out, chunk=10_000, catalog=catalog,
        scorer=FixedScorer(keep=False), checkpoint_every_s=0.2, on_step=on_step,
        shard_cpus=0.25,
    )  # fmt: skip
    assert done == kills
    return report


def _outcome(out: Path, report) -> dict:
    shard = report.shard_stats
    return {
        "logs": digests(out, report.run),
        "applied": sum(s["applied"] for s in shard),
        "duplicates": sum(s["duplicates"] for s in shard),
        "customers": sum(s["customers"] for s in shard),
        "stats": {k: report.stats[k] for k in ("ingested", "rejected", "applied", "triggers")},
    }


def check_kills(rules, tmp_path: Path, events_n: int, shards: int, kills: int) -> None:
    stream = events(population(max(events_n // 20, 1_000), seed=11), events_n, days=30, seed=11)
    clean = _run(stream, shards, tmp_path / "clean", rules, kills=0)
    faulty = _run(stream, shards, tmp_path / "faulty", rules, kills=kills)
    assert len(faulty.recoveries) == kills
    assert all(r.seconds < 3.0 for r in faulty.recoveries), faulty.recoveries
    expected = _outcome(tmp_path / "clean", clean)
    assert expected["logs"]["triggers"]["rows"] > 0 and expected["logs"]["decisions"]["rows"] > 0
    assert _outcome(tmp_path / "faulty", faulty) == expected


def test_killed_shards_recover_with_the_outputs_of_a_run_without_faults(
    ray_cluster, rules, tmp_path
) -> None:
    check_kills(rules, tmp_path, 200_000, 2, kills=2)


@pytest.mark.faults
@pytest.mark.parametrize("shards", [2, 4])
def test_four_kills_in_two_million_events(ray_cluster, rules, tmp_path, shards) -> None:
    n = int(os.environ.get("KAIROS_FAULT_EVENTS", "2000000"))
    check_kills(rules, tmp_path, n, shards, kills=4)
