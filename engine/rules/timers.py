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
    (deadlines in (time, slot) order after the matches at events).

    The view is in (slot, time) order already: the deadline rows, put in that order too (the
    matcher gives them so, but for stored deadlines and later rounds), are merged into it, not
    sorted with it; each goes after the customer's events of its time."""
    timed = [(rule, m) for rule, m in matches if m.timers.any()]
    if not timed:
        return view, {rule.id: m.rows for rule, m in matches}
    table = view.table
    picked = [np.flatnonzero(m.timers) for _, m in timed]
    t_slots = np.concatenate([m.slots[t] for (_, m), t in zip(timed, picked, strict=True)])
    t_ts = np.concatenate([m.ts[t] for (_, m), t in zip(timed, picked, strict=True)])
    t_ids = np.concatenate([
        timer_event_ids(store.keys[m.slots[t]], m.ts[t], rule.id)
        for (rule, m), t in zip(timed, picked, strict=True)
    ])  # fmt: skip
    by_key = None if _in_order(t_slots, t_ts) else sort_order(t_slots, t_ts)  # stable
    if by_key is not None:
        t_slots, t_ts, t_ids = t_slots[by_key], t_ts[by_key], t_ids[by_key]
    n, m_count = view.size, t_slots.size
    at = _merge_positions(view.slot, view.ts, t_slots, t_ts)  # each deadline row's position
    is_timer = np.zeros(n + m_count, dtype=bool)
    is_timer[at] = True
    at_row = np.flatnonzero(~is_timer)  # each event row's position
    rows = np.empty(n + m_count, dtype=np.int64)
    rows[at_row] = view.order
    rows[at] = table.num_rows + np.arange(m_count)
    slots = np.empty(n + m_count, dtype=view.slot.dtype)
    slots[at_row] = view.slot
    slots[at] = t_slots
    extra = _timer_table(table.schema, store.keys[t_slots], t_ts, t_ids)
    combined = pa.concat_tables([table, extra])
    grown = BatchView(combined, rows, slots, store, view.windows, view.reference)
    # deadline rows' positions in the order the rules gave them (rule by rule)
    given = at if by_key is None else np.empty_like(at)
    if by_key is not None:
        given[by_key] = at
    fired: dict[str, np.ndarray] = {}
    offset = 0
    for rule, m in matches:
        at_event = at_row[m.rows[m.rows >= 0]]
        count = int(m.timers.sum())
        mine = given[offset : offset + count]
        offset += count
        fired[rule.id] = np.concatenate([at_event, _by_deadline(mine, grown.ts[mine])])
    return grown, fired


def _in_order(slots: np.ndarray, ts: np.ndarray) -> bool:
    """Whether rows are in (slot, time) order already."""
    if slots.size < 2:
        return True
    ds = np.diff(slots.astype(np.int64))
    return bool(((ds > 0) | ((ds == 0) & (np.diff(ts) >= 0))).all())


def _merge_positions(
    v_slots: np.ndarray, v_ts: np.ndarray, t_slots: np.ndarray, t_ts: np.ndarray
) -> np.ndarray:
    """Positions of the (slot, time)-ordered rows ``t`` merged into the (slot, time)-ordered
    rows ``v``, each after the ``v`` rows of its (slot, time): a binary search of each, on
    (slot, time) packed into one integer where they fit in 63 bits (else a sort of both)."""
    lo = int(min(v_ts.min(), t_ts.min())) if v_ts.size else int(t_ts.min())
    hi = int(max(v_ts.max(), t_ts.max())) if v_ts.size else int(t_ts.max())
    top = int(max(v_slots.max(), t_slots.max())) if v_slots.size else int(t_slots.max())
    ts_bits = max(1, (hi - lo).bit_length())
    if ts_bits + max(1, top.bit_length()) <= 63:
        v_key = (v_slots.astype(np.int64) << ts_bits) | (v_ts - lo)
        t_key = (t_slots.astype(np.int64) << ts_bits) | (t_ts - lo)
        before = np.searchsorted(v_key, t_key, side="right")
    else:  # a stable sort of both (steps spanning centuries): rows of ``v`` first on ties
        order = np.lexsort((np.concatenate([v_ts, t_ts]), np.concatenate([v_slots, t_slots])))
        where = np.empty_like(order)
        where[order] = np.arange(order.size)
        return where[v_slots.size :]
    return before + np.arange(t_slots.size)


def _by_deadline(positions: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """``positions`` (of one rule's deadline rows in the grown view) in (deadline, position)
    order: the view is in slot order, so a deadline's ties go by position. Stable radix
    passes of 16 bits (numpy's counting sort of uint16): the positions first where they are
    not ascending already, then the deadlines less the earliest (one pass when the due
    deadlines span a minute, two for 49 days). A million: 9-60 ms, where one sort of packed
    64-bit keys took 67-70 ms on this VM."""
    if positions.size < 2:
        return positions
    order = None
    if not (positions[1:] > positions[:-1]).all():
        order = _radix(positions - positions.min(), None)
    return positions[_radix(ts - ts.min(), order)]


def _radix(key: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """``order`` (None: the rows as they are) sorted stably by ``key`` (non-negative int64,
    one per row), 16 bits a pass from the lowest, until no higher bits are left."""
    order = np.arange(key.size) if order is None else order
    rest = key[order]
    while True:
        step = np.argsort((rest & 0xFFFF).astype(np.uint16), kind="stable")
        order = order[step]
        rest = rest[step] >> 16
        if not rest.any():
            return order
