"""Pattern rules inside a shard's step: which rows they see, and deadlines as rows.

A match that completes at an event is that event's row. A match that completes at a deadline
(an absence at the end of a pattern) has no event: the step gets a row of its own for it, kind
``TIMER_KIND``, at the deadline's time, sorted after the customer's events of that time. Every
as-of column of the view (profile, aggregates, local time, billing cycle) is then computed for
it as for any row, so the trigger's values and the decision are those of that moment; no rule
listens to it, and the golden record counts no event for it (``BatchView.write_back``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from engine.events.schema import TIMER_KIND, TS_TYPE
from engine.partition import mix64, rule_salt
from engine.rules.matcher import PatternResult, run_pattern
from engine.rules.rows import rows_where
from engine.state.store import CustomerStore
from engine.state.view import BatchView, sort_order

if TYPE_CHECKING:
    from engine.rules.pattern import Automaton
    from engine.rules.spec import CompiledRule


def pattern_bits(a: Automaton, view: BatchView) -> tuple[np.ndarray, np.ndarray]:
    """(conditions x rows: the row is an event of that step, the rows any step takes)."""
    bits = np.zeros((len(a.conditions), view.size), dtype=bool)
    for c, cond in enumerate(a.conditions):
        bits[c, rows_where(cond.kinds, cond.when, view)] = True
    relevant = np.flatnonzero(bits.any(axis=0))
    return bits[:, relevant], relevant


def match_pattern(
    rule: CompiledRule, view: BatchView, store: CustomerStore, horizon: int
) -> PatternResult:
    """``rule``'s matches in ``view`` (rows are view rows; -1 for a deadline) and its state."""
    assert rule.pattern is not None
    bits, relevant = pattern_bits(rule.pattern, view)
    state = [store.rule_state[key] for key in rule.state_keys]
    result = run_pattern(
        rule.pattern, bits, view.slot[relevant], view.ts[relevant], state, horizon, store.size
    )
    rows = np.full(result.rows.size, -1, dtype=np.int64)
    at_event = result.rows >= 0
    rows[at_event] = relevant[result.rows[at_event]]
    return replace(result, rows=rows)


def timer_event_ids(keys: np.ndarray, ts: np.ndarray, rule_id: str) -> np.ndarray:
    """The id a deadline's trigger carries (decision ids derive from it): stable on replay."""
    mixed = mix64(np.asarray(ts, dtype=np.int64).astype(np.uint64) ^ np.uint64(rule_salt(rule_id)))
    return mix64(np.asarray(keys, dtype=np.uint64) ^ mixed)


def deadline_order(slots: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slots, deadlines) sorted by deadline, then by the shard's customer order (slot): a
    customer's deadlines in time order, and one order for every replay of the step. When
    (deadline offset, slot) fit in 63 bits together (they do but for steps spanning years),
    one value sort of packed keys, read back from the sorted keys (a million deadlines:
    about 25 ms, where a lexsort by (deadline, pseudonym) took 250)."""
    if ts.size == 0:
        return slots, ts
    lo = int(ts.min())
    slot_bits = max(1, int(slots.max()).bit_length())
    if (int(ts.max()) - lo).bit_length() + slot_bits <= 63:
        packed = ((ts - lo) << slot_bits) | slots.astype(np.int64)
        packed.sort()
        return packed & ((1 << slot_bits) - 1), (packed >> slot_bits) + lo
    order = np.lexsort((slots, ts))
    return slots[order], ts[order]


def _timer_table(schema: pa.Schema, keys: np.ndarray, ts: np.ndarray, ids: np.ndarray) -> pa.Table:
    """Deadline rows in the step's schema (its key group is not read: 0; seq 0)."""
    n = keys.size
    known = {
        "event_id": pa.array(ids, type=pa.uint64()),
        "customer_key": pa.array(keys, type=pa.uint64()),
        "key_group": pa.array(np.zeros(n, dtype=np.uint16), type=pa.uint16()),
        "seq": pa.array(np.zeros(n, dtype=np.uint64), type=pa.uint64()),
        "kind": pa.array(np.full(n, TIMER_KIND, dtype=np.int8), type=pa.int8()),
        "ts": pa.array(ts, type=pa.int64()).cast(TS_TYPE),
    }
    columns = [
        known[f.name].cast(f.type) if f.name in known else pa.nulls(n, f.type) for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def with_timer_rows(
    view: BatchView, matches: list[tuple[CompiledRule, PatternResult]], store: CustomerStore
) -> tuple[BatchView, dict[str, np.ndarray]]:
    """The view with a row for every match at a deadline, and each rule's matched rows in it
    (deadlines in (time, slot) order after the matches at events: ``deadline_order``)."""
    timed = [(rule, m) for rule, m in matches if m.timers.any()]
    if not timed:
        return view, {rule.id: m.rows for rule, m in matches}
    table = view.table
    slots, ts, ids = [], [], []
    for rule, m in timed:
        t = np.flatnonzero(m.timers)
        t_slot, t_ts = deadline_order(m.slots[t], m.ts[t])
        slots.append(t_slot)
        ts.append(t_ts)
        ids.append(timer_event_ids(store.keys[t_slot], t_ts, rule.id))
    t_slots, t_ts, t_ids = np.concatenate(slots), np.concatenate(ts), np.concatenate(ids)
    extra = _timer_table(table.schema, store.keys[t_slots], t_ts, t_ids)
    combined = pa.concat_tables([table, extra])
    rows = np.concatenate([view.order, table.num_rows + np.arange(t_slots.size)])
    all_slots = np.concatenate([view.slot, t_slots])
    order = sort_order(all_slots, np.concatenate([view.ts, t_ts]))  # stable: after events
    grown = BatchView(combined, rows[order], all_slots[order], store, view.windows, view.reference)
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    fired: dict[str, np.ndarray] = {}
    next_timer = view.size
    for rule, m in matches:
        at_event = position[m.rows[m.rows >= 0]]
        count = int(m.timers.sum())
        at_deadline = position[next_timer : next_timer + count]
        next_timer += count
        fired[rule.id] = np.concatenate([at_event, at_deadline])
    return grown, fired
