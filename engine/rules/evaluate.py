"""Vectorized rule operators: which events of a sorted batch fire each rule.

The batch is sorted by (customer, event time, arrival). Semantics are those of applying
events one at a time (see tests/property for the per-event reference they are checked
against); the sequential parts are turned into vector operations:

* once per period: a candidate fires iff its period differs from the previous candidate's
  of the same customer (or, for the first, from the period stored as last fired);
* cooldown: in rounds, each customer's first candidate at least ``cooldown`` after its last
  firing fires; rounds repeat only for customers with candidates left (rare).
"""

from __future__ import annotations

import numpy as np

from engine.rules.rows import rows_where
from engine.rules.spec import CompiledRule
from engine.state.view import BatchView, RowsView


def candidates(rule: CompiledRule, view: BatchView) -> np.ndarray:
    """Row numbers where the rule's event kinds and conditions hold (before once-per/cooldown).

    Conditions are evaluated on the rows of the rule's kinds only.
    """
    rows = rows_where(rule.kinds, rule.when, view)
    if rows.size == 0:
        return rows
    ctx = RowsView(view, rows)
    keep = np.ones(rows.size, dtype=bool)
    if rule.value is not None and rule.threshold is not None:
        with np.errstate(invalid="ignore"):
            keep &= rule.value.evaluate(ctx) >= rule.threshold.evaluate(ctx)
    return rows[keep]


def once_per_period(
    rows: np.ndarray, slots: np.ndarray, period: np.ndarray, last_fired: np.ndarray
) -> np.ndarray:
    """Boolean per candidate row: fires. ``last_fired`` is each customer's stored period."""
    prev = np.empty(rows.size, dtype=np.int64)
    if rows.size:
        cand_slots = slots[rows]
        new_customer = np.ones(rows.size, dtype=bool)
        new_customer[1:] = cand_slots[1:] != cand_slots[:-1]
        prev[1:] = period[rows[:-1]]
        prev[new_customer] = last_fired[cand_slots[new_customer]]
    return period[rows] != prev


def cooldown(
    rows: np.ndarray, slots: np.ndarray, ts: np.ndarray, last_fired: np.ndarray, cooldown_ms: int
) -> np.ndarray:
    """Boolean per candidate row: fires, at most once per ``cooldown_ms`` per customer.

    Sequentially, a candidate fires iff it is at least ``cooldown_ms`` after the customer's
    last firing. Each round fires every customer's first eligible candidate; the earlier ones
    can never become eligible (the last firing only moves forward), so rounds = the most
    firings of one customer in the batch.
    """
    fired = np.zeros(rows.size, dtype=bool)
    if rows.size == 0:
        return fired
    if cooldown_ms <= 0:
        fired[:] = True
        return fired
    cand_slots = slots[rows]  # non-decreasing: the batch is sorted by customer
    cand_ts = ts[rows]
    last = last_fired[cand_slots].astype(np.int64)
    while True:
        idx = np.flatnonzero(~fired & (cand_ts - last >= cooldown_ms))
        if idx.size == 0:
            return fired
        first = np.ones(idx.size, dtype=bool)
        first[1:] = cand_slots[idx[1:]] != cand_slots[idx[:-1]]
        winners = idx[first]
        fired[winners] = True
        win_slots = cand_slots[winners]
        pos = np.minimum(np.searchsorted(win_slots, cand_slots), win_slots.size - 1)
        same = win_slots[pos] == cand_slots
        last = np.where(same, cand_ts[winners][pos], last)


def period_of(rule: CompiledRule, view: BatchView) -> np.ndarray:
    once = getattr(rule.spec, "once_per", "billing_cycle")
    return view.column("@cycle") if once == "billing_cycle" else view.column("@local_day")
