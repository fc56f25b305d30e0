"""One replay in a process of its own, for the crash-point matrix: with ``KAIROS_CRASH_AT`` set
the process (or the sink actor) exits hard at that step; ``--resume`` continues the run from its
last complete checkpoint. Prints one JSON line with the run's output digests.

    KAIROS_CRASH_AT=checkpoint:before_current python -m tests.faults.crashpoint --out DIR
    python -m tests.faults.crashpoint --out DIR --resume
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from actors.runtime import init_ray
from deploy.replay import replay
from engine.config import EngineSettings
from engine.decision.catalog import load_catalog
from engine.rules.spec import load_rules
from engine.synthetic.telco import events, population
from engine.testing import FixedScorer
from loadtests.digest import digests
from tests.conftest import ROOT, RULES_FILE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    init_ray(num_cpus=2, object_store_mb=400)
    stream = events(population(args.events // 20, seed=4), args.events, days=30, seed=4)
    runs = sorted(p.name for p in (args.out / "checkpoints").glob("run-*"))
    report = replay(
        stream,
        EngineSettings(shards=2, allowed_lateness_s=60, dedupe_window_s=3600),
        load_rules(RULES_FILE),
        args.out,
        chunk=10_000,
        catalog=load_catalog(ROOT / "deploy" / "config" / "offers.yaml"),
        scorer=FixedScorer(keep=False),
        checkpoint_every_s=0.0,  # after every step: many checkpoints to crash in
        resume=runs[-1] if args.resume else None,
        shard_cpus=0.25,
    )
    print(json.dumps({"logs": digests(args.out, report.run), "applied": report.stats["applied"],
                      "recoveries": len(report.recoveries)}))  # fmt: skip


if __name__ == "__main__":
    main()
