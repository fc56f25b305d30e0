"""The pattern stage alone, on one core: events per second, deadlines fired, bytes per customer.

For each pattern (the cart-abandonment absence with a 30-minute deadline, "three heavy usage
events within two hours", and a four-step sequence with an absence and an optional step), over
65,536-event micro-batches of 100,000 customers (kinds in telco shares: half usage), sorted as a
shard sorts them; the stage is what a shard runs: the steps' conditions over the view, then
the state machine over the pattern's events:

* ``even``: customers drawn uniformly; ``zipf``: a Zipf(1.2) skew (the hottest customer holds
  a large share of every batch);
* ``loop`` is the compiled per-event loop (the default), ``vector`` the vectorized rounds.

Then 1,000,000 customers with a pending deadline, all due: the time to fire them
(``run_pattern`` from the deadline column), and the time to add their rows to a step's view
(``with_timer_rows``, as the shard does to decide them: the rows merged into the view, and
one sort of the million deadlines into (deadline, customer) order).

Each figure is the median of ``--repeat`` runs, the runs beside it.

    python loadtests/bench_patterns.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.events.schema import ROUTED_SCHEMA
from engine.rules.matcher import run_pattern
from engine.rules.sequential import warm
from engine.rules.spec import parse_rules_text
from engine.rules.timers import pattern_bits, with_timer_rows
from engine.state.store import CustomerStore
from engine.state.view import BatchView

RULES = parse_rules_text("""
rules:
  - id: cart_abandoned
    type: pattern
    pattern:
      - {begin: added, on: cart_add}
      - {not_followed_by: paid, on: checkout, within: 30m}
  - id: heavy_thrice
    type: pattern
    pattern:
      - {begin: heavy, on: usage, times: 3}
    within: 2h
  - id: browse_buy
    type: pattern
    pattern:
      - {begin: added, on: cart_add}
      - {not_followed_by: left, on: checkout}
      - {followed_by: viewed, on: page_view, optional: true}
      - {followed_by: bought, on: purchase}
    within: 1d
""")
T0 = 1_772_323_200_000
BATCH = 65_536
CUSTOMERS = 100_000


KINDS = np.array([0, 1, 3, 4, 5, 2], dtype=np.int8)  # usage, location, page_view, cart, ...
KIND_SHARE = [0.5, 0.2, 0.15, 0.06, 0.05, 0.04]


def views(dist: str, n: int, seed: int, store: CustomerStore) -> list[BatchView]:
    """Micro-batches as a shard sees them: sorted by (customer, time), kinds in telco shares."""
    rng = np.random.default_rng(seed)
    out = []
    now = T0
    for _ in range(n):
        if dist == "even":
            slots = rng.integers(0, CUSTOMERS, BATCH)
        else:
            slots = np.minimum(rng.zipf(1.2, BATCH) - 1, CUSTOMERS - 1)
        ts = now + np.sort(rng.integers(0, 60_000, BATCH))
        now += 60_000
        table = pa.table(
            {
                "customer_key": pa.array(store.keys[slots]),
                "ts": pa.array(ts, type=pa.int64()),
                "kind": pa.array(rng.choice(KINDS, BATCH, p=KIND_SHARE), type=pa.int8()),
            }
        )
        order = np.lexsort((np.arange(BATCH), ts, slots))
        out.append(BatchView(table, order, slots[order], store))
    return out


def stage(rule_id: str, dist: str, rounds: int, repeat: int) -> dict[str, object]:
    """The stage as a shard runs it: the steps' conditions over the view, then the machine."""
    rule = next(r for r in RULES.rules if r.id == rule_id)
    a = rule.pattern
    assert a is not None
    store = CustomerStore(capacity=CUSTOMERS)
    store.slots_for(np.arange(1, CUSTOMERS + 1, dtype=np.uint64))
    data = views(dist, 20, 1, store)
    runs = []
    taken = 0
    for _ in range(repeat):
        store.ensure_rules([])
        store.ensure_rules(rule.state_keys)
        state = [store.rule_state[k] for k in rule.state_keys]
        started = time.perf_counter()
        for view in data:
            bits, relevant = pattern_bits(a, view)
            ts = view.ts[relevant]
            result = run_pattern(a, bits, view.slot[relevant], ts, state,
                                 int(view.ts.max()) - 1, CUSTOMERS, rounds)  # fmt: skip
            for k in range(len(state)):
                state[k][result.write_slots] = result.write_values[k]
            taken += relevant.size
        runs.append(len(data) * BATCH / (time.perf_counter() - started))
    return {
        "pattern": rule_id,
        "stream": dist,
        "evaluator": "loop" if rounds == 0 else f"vector({rounds} rounds)",
        "events_per_s": round(statistics.median(runs)),
        "runs": [round(r) for r in runs],
        "pattern_event_share": round(taken / (repeat * len(data) * BATCH), 2),
        "bytes_per_customer": 8 * len(a.register_names),
    }


def timers(repeat: int, customers: int = 1_000_000) -> dict[str, object]:
    rule = next(r for r in RULES.rules if r.id == "cart_abandoned")
    a = rule.pattern
    assert a is not None
    fire, grow = [], []
    for _ in range(repeat):
        store = CustomerStore(capacity=customers)
        keys = np.random.default_rng(5).integers(1, 2**63, customers).astype(np.uint64)
        store.slots_for(keys)  # pseudonyms: random 64-bit keys
        store.ensure_rules(rule.state_keys)
        wait, deadline = (store.rule_state[k] for k in rule.state_keys)
        wait[:customers] = T0 + np.arange(customers) % 60_000
        deadline[:customers] = wait[:customers] + a.trailing_ms
        state = [store.rule_state[k] for k in rule.state_keys]
        empty = np.zeros((len(a.conditions), 0), dtype=bool)
        none = np.zeros(0, dtype=np.int64)
        started = time.perf_counter()
        result = run_pattern(a, empty, none, none, state, T0 + 10**9, customers)
        fire.append(time.perf_counter() - started)
        assert result.slots.size == customers
        view = BatchView(ROUTED_SCHEMA.empty_table(), none, none, store)
        started = time.perf_counter()
        grown, fired = with_timer_rows(view, [(rule, result)], store)
        grow.append(time.perf_counter() - started)
        assert grown.size == customers and fired[rule.id].size == customers
        del grown, view
    return {
        "due_deadlines": customers,
        "fire_ms": round(1000 * statistics.median(fire), 1),
        "fire_runs_ms": [round(1000 * s, 1) for s in fire],
        "rows_in_view_ms": round(1000 * statistics.median(grow), 1),
        "rows_in_view_runs_ms": [round(1000 * s, 1) for s in grow],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vector", action="store_true", help="also the vectorized rounds")
    args = parser.parse_args()
    print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                      "pyarrow": pa.__version__}))  # fmt: skip
    warm()
    for rule_id in ("cart_abandoned", "heavy_thrice", "browse_buy"):
        for dist in ("even", "zipf"):
            print(json.dumps(stage(rule_id, dist, 0, args.repeat)), flush=True)
            if args.vector:
                print(json.dumps(stage(rule_id, dist, 4, args.repeat)), flush=True)
    print(json.dumps(timers(args.repeat)), flush=True)


if __name__ == "__main__":
    main()
