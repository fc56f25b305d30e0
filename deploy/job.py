"""Ray job entry point: replays and simulations submitted to a running cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m deploy.job replay --generate 200000 --customers 20000 --shards 4
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m deploy.job replay --file s3://bucket/events.parquet
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m deploy.job simulate --customers 20000 --days 84

The job joins the cluster it runs on (Ray sets RAY_ADDRESS for it), prints its progress and
ends with one JSON line, the result, which ``ray job logs`` shows. Exit status 2 and one line
on stderr for a bad argument or input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from deploy.paths import DEFAULT_OFFERS, DEFAULT_REFERENCE, DEFAULT_RULES
from engine.errors import EngineError


def _replay(args: argparse.Namespace) -> dict[str, Any]:
    from actors.runtime import init_ray
    from deploy.replay import replay
    from engine.config import EngineSettings
    from engine.decision.catalog import load_catalog
    from engine.reference import load_reference
    from engine.rules.spec import load_rules

    rules = load_rules(args.rules)
    catalog = load_catalog(args.offers_file) if args.offers else None
    reference = load_reference(args.reference)
    if args.file:
        from engine.eventfile import read_events

        source = read_events(args.file)
        table, unreadable, lines = source.table, source.dead_letters, source.positions
    else:
        from engine.synthetic.telco import events, population

        table = events(population(args.customers, args.seed), args.generate, seed=args.seed)
        unreadable, lines = [], None
    init_ray()
    if catalog is not None:
        from deploy.ranker import start_ranker

        start_ranker(str((Path(args.out) / "models").resolve()), rules, catalog)
    settings = EngineSettings(shards=args.shards)
    print(f"replaying {table.num_rows:,} events through {args.shards} shards", flush=True)
    report = replay(
        table,
        settings,
        rules,
        Path(args.out),
        unreadable=unreadable,
        lines=lines,
        catalog=catalog,
        reference=reference,
    )
    stats = report.stats
    return {
        "job": "replay",
        "events": report.events,
        "seconds": round(report.seconds, 2),
        "events_per_s": round(report.events_per_s),
        "applied": stats["applied"],
        "rejected": stats["rejected"],
        "duplicates": stats["duplicates"],
        "triggers": stats["triggers"],
        "triggers_by_rule": stats["triggers_by_rule"],
        "decisions": stats["decisions"],
        "p99_ms": round(stats["p99_ms"], 1),
    }


def _simulate(args: argparse.Namespace) -> dict[str, Any]:
    from engine.decision.catalog import load_catalog
    from engine.rules.spec import load_rules
    from models.simulate import Simulation, SimulationConfig, report

    config = SimulationConfig(
        customers=args.customers, days=args.days, warmup_days=args.warmup_days, seed=args.seed
    )
    if args.warmup_days >= args.days:
        raise EngineError(f"--warmup-days ({args.warmup_days}) must be less than --days")
    sim = Simulation(
        config,
        load_rules(args.rules),
        load_catalog(args.offers_file),
        str((Path(args.out) / "models").resolve()),
    )
    out: dict[str, Any] = {"job": "simulate"}
    for name in args.policies.split(","):
        print(f"simulating policy {name}", flush=True)
        out[name] = report(sim.run(name), args.customers, sim.warmup_end, sim.t0)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.job", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--rules", default=str(DEFAULT_RULES))
    common.add_argument("--offers-file", default=str(DEFAULT_OFFERS))
    common.add_argument("--reference", default=str(DEFAULT_REFERENCE))
    common.add_argument("--seed", type=int, default=7)
    common.add_argument("--out", default="kairos-data/jobs", help="output folder (or URI)")
    r = sub.add_parser("replay", parents=[common], help="replay events through the engine")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="Parquet or NDJSON event file (a path or pyarrow.fs URI)")
    src.add_argument("--generate", type=int, help="generate this many synthetic events")
    r.add_argument("--customers", type=int, default=20_000)
    r.add_argument("--shards", type=int, default=2)
    r.add_argument("--offers", action="store_true", help="decide through the Serve ranker")
    s = sub.add_parser("simulate", parents=[common], help="closed-loop policy comparison")
    s.add_argument("--customers", type=int, default=20_000)
    s.add_argument("--days", type=int, default=84)
    s.add_argument("--warmup-days", type=int, default=42)
    s.add_argument("--policies", default="blanket,rules,kairos,oracle")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    started = time.perf_counter()
    try:
        result = _replay(args) if args.command == "replay" else _simulate(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["wall_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
