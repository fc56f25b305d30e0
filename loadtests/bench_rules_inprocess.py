"""Two rule files on the same stream in one process (no Ray): the engine's own cost of rules.

The shipped rules (patterns, windows, reference data) against ``--baseline`` (default
``loadtests/rules_before_patterns.yaml``), alternately, on synthetic telco events in
micro-batches of 65,536 through ``LocalEngine`` with the shipped reference tables. Prints the
median seconds of each, every run beside it, and the throughput ratio (shipped over baseline).
Without Ray's processes competing for the two cores, this isolates what the rules cost from
the replay benchmark's noise (``bench_throughput.py --compare-rules``).

    python loadtests/bench_rules_inprocess.py --events 400000 --customers 100000 --repeat 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.paths import DEFAULT_REFERENCE, DEFAULT_RULES
from engine.config import EngineSettings
from engine.local import LocalEngine
from engine.reference import load_reference
from engine.rules.spec import RuleSet, load_rules
from engine.synthetic import telco

BASELINE = Path(__file__).parent / "rules_before_patterns.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    args = parser.parse_args()
    stream = telco.events(telco.population(args.customers, seed=7), args.events, seed=7)
    reference = load_reference(DEFAULT_REFERENCE)

    def run(rules: RuleSet) -> float:
        settings = EngineSettings(shards=args.shards, allowed_lateness_s=10)
        engine = LocalEngine(settings, rules, reference=reference)
        started = time.perf_counter()
        for start in range(0, stream.num_rows, 65_536):
            engine.submit(stream.slice(start, 65_536))
        engine.end_stream()
        return time.perf_counter() - started

    shipped, baseline = load_rules(DEFAULT_RULES), load_rules(args.baseline)
    run(shipped), run(baseline)  # warm: imports, the compiled pattern loop
    a: list[float] = []
    b: list[float] = []
    for _ in range(args.repeat):  # alternately: the VM's speed drifts
        b.append(run(baseline))
        a.append(run(shipped))
    ma, mb = statistics.median(a), statistics.median(b)
    print(json.dumps({
        "events": stream.num_rows, "shards": args.shards,
        "shipped_s": round(ma, 3), "shipped_runs_s": [round(x, 3) for x in a],
        "baseline_s": round(mb, 3), "baseline_runs_s": [round(x, 3) for x in b],
        "throughput_ratio": round(mb / ma, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
