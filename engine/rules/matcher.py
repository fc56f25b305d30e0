"""Evaluating a compiled pattern (``engine.rules.pattern``) over a step's rows.

The rows are the pattern's events of one step, sorted by (customer, event time, arrival).
Two evaluators give the same matches (the property tests hold both to the per-event
reference):

* the compiled per-event loop (``engine.rules.sequential``), the default: 10 M events/s with
  customers spread evenly and 16 M with a Zipf-skewed stream on one core here
  (docs/benchmarks.md);
* vector operations (``rounds`` > 0): between two matches of a customer the registers evolve
  without branching, each state's register being the running maximum, since its last kill, of
  the starts that enter it; one segmented cumulative maximum per state, in element order. A
  match cuts (with ``skip: past_last_event`` everything restarts after it), so the rows after
  each customer's first match are evaluated again in the next round, and after ``rounds``
  rounds the compiled loop takes the rest. It ran at 3.4-4 M events/s evenly and 0.03 M (2 M
  with the loop taking over) skewed, which is why the loop is the default.

Timers: a deadline is due when the next row of the customer is later, or, after its last row,
when the horizon (the watermark less one: an event at the watermark may still come) reaches
it. Customers with no rows here but a stored deadline at or before the horizon fire (or free
registers whose ``within`` has passed) from the deadline column alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from engine.rules.pattern import Automaton
from engine.rules.sequential import NONE as _NONE
from engine.rules.sequential import sequential, tables
from engine.state.store import NEVER

#: vectorized rounds (one per match of a customer) before the compiled per-event loop: none by
#: default, the loop being faster (see the module's docstring)
ROUNDS = 0


@dataclass
class PatternResult:
    """Matches of one pattern in one step, and the registers to store after it."""

    #: per match: customer slot, time (event time or deadline), row (index into the rows given;
    #: -1 for a deadline)
    slots: np.ndarray
    ts: np.ndarray
    rows: np.ndarray
    #: the customers whose registers change, and their new values (registers x customers, in
    #: ``Automaton.register_names`` order)
    write_slots: np.ndarray
    write_values: np.ndarray

    @property
    def timers(self) -> np.ndarray:
        """Which matches completed at a deadline."""
        return self.rows < 0


def _seg_running(values: np.ndarray, starts: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Running maximum of ``values`` restarting at ``starts`` (``starts[0]`` must be true).

    Values are NEVER or times in [lo, hi]: shifted to [0, span] and offset by the segment
    number, one cumulative maximum does every segment at once.
    """
    n = values.size
    if n == 0:
        return values.copy()
    span = hi - lo + 2
    seg = np.cumsum(starts, dtype=np.int64) - 1
    if n * span >= 2**62:  # a batch and a time span too wide to pack: segment by segment
        out = values.copy()
        bounds = np.append(np.flatnonzero(starts), n)
        for a, b in itertools.pairwise(bounds):
            out[a:b] = np.maximum.accumulate(values[a:b])
        return out
    shifted = np.where(values == NEVER, 0, values - lo + 1)
    packed = np.maximum.accumulate(seg * span + shifted)
    rel = packed - seg * span
    return np.where(rel == 0, NEVER, rel + lo - 1)


def _before(after: np.ndarray, first: np.ndarray, carry: np.ndarray) -> np.ndarray:
    """Each row's value just before it: the previous row's, or ``carry`` at a first row."""
    out = np.empty_like(after)
    out[1:] = after[:-1]
    out[first] = carry[first]
    return out


@dataclass
class _Pass:
    """One pass over rows: registers after each row, and what happens at each row."""

    registers: np.ndarray  # states x rows, after the row
    wait: np.ndarray  # after the row (_NONE: none)
    completes: np.ndarray  # the row completes the positive part
    due_before: np.ndarray  # a deadline passes before the row
    deadline_before: np.ndarray


def _pass(
    a: Automaton,
    bits: np.ndarray,
    ts: np.ndarray,
    first: np.ndarray,
    carry: np.ndarray,
    carry_wait: np.ndarray,
) -> _Pass:
    n = ts.size
    finite = carry[carry != NEVER]
    lo = int(min(ts.min(), finite.min(initial=ts.min())))
    hi = int(max(ts.max(), finite.max(initial=ts.max())))
    registers = np.full((len(a.states), n), NEVER, dtype=np.int64)
    entry = np.full(n, NEVER, dtype=np.int64)
    for element in range(a.elements):
        taken = bits[a.element_cond[element]]
        if element == 0:
            entry = np.where(taken, ts, NEVER)
        else:
            best = np.full(n, NEVER, dtype=np.int64)
            for s in a.entering(element):
                prev = _before(registers[s], first, carry[s])
                ok = prev != NEVER
                if a.within_ms is not None:
                    ok &= ts - prev <= a.within_ms
                best = np.maximum(best, np.where(ok, prev, NEVER))
            entry = np.where(taken, best, NEVER)
        for s in a.leaving(element):
            killed = np.zeros(n, dtype=bool)
            for c in a.states[s].kills:
                killed |= bits[c]
            starts = first | killed
            init = np.where(first & ~killed, carry[s], NEVER)
            registers[s] = _seg_running(np.maximum(entry, init), starts, lo, hi)
    completes = entry != NEVER  # the last element's entry
    wait = np.full(n, _NONE, dtype=np.int64)
    due_before = np.zeros(n, dtype=bool)
    deadline_before = np.zeros(n, dtype=np.int64)
    if a.trailing is not None:
        killed = bits[a.trailing]
        starts = first | killed
        init = np.where(first & ~killed, carry_wait, _NONE)
        entered = np.where(completes, ts, _NONE)
        # a running minimum is a running maximum of the negated times
        neg = np.minimum(entered, init)
        neg = np.where(neg == _NONE, NEVER, -neg)
        pending = carry_wait[carry_wait != _NONE]
        top = int(max(hi, pending.max(initial=hi)))
        bottom = int(min(lo, pending.min(initial=lo)))
        running = _seg_running(neg, starts, -top, -bottom)
        wait = np.where(running == NEVER, _NONE, -running)
        before = _before(wait, first, carry_wait)
        pending = before != _NONE
        deadline_before = np.where(pending, before + a.trailing_ms, 0)
        due_before = pending & (ts > deadline_before)
    return _Pass(registers, wait, completes, due_before, deadline_before)


def _finish(
    a: Automaton, registers: np.ndarray, wait: np.ndarray, horizon: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """End of step for customers (columns): a due trailing deadline fires (and clears every
    register); registers whose ``within`` has passed are freed. Returns (fired, deadline time,
    next deadline per customer)."""
    fired = np.zeros(wait.size, dtype=bool)
    at = np.zeros(wait.size, dtype=np.int64)
    if a.trailing is not None:
        pending = wait != _NONE
        at = np.where(pending, wait + a.trailing_ms, 0)
        fired = pending & (at <= horizon)
        registers[:, fired] = NEVER
        wait[fired] = _NONE
    nxt = np.full(wait.size, _NONE, dtype=np.int64)
    if a.within_ms is not None and registers.size:
        live = registers != NEVER
        expires = np.where(live, registers + a.within_ms, _NONE)
        gone = live & (expires <= horizon)
        registers[gone] = NEVER
        expires[gone] = _NONE
        nxt = expires.min(axis=0)
    if a.trailing is not None:
        nxt = np.minimum(nxt, np.where(wait != _NONE, wait + a.trailing_ms, _NONE))
    return fired, at, nxt


def _stored(a: Automaton, state: list[np.ndarray], slots: np.ndarray) -> tuple[np.ndarray, ...]:
    """(registers, wait) of customers ``slots`` from the store's columns."""
    k = len(a.states)
    registers = np.stack([state[i][slots] for i in range(k)]) if k else np.zeros((0, slots.size))
    registers = registers.astype(np.int64)
    if a.trailing is not None:
        wait = state[k][slots].astype(np.int64)
        wait = np.where(wait == NEVER, _NONE, wait)
    else:
        wait = np.full(slots.size, _NONE, dtype=np.int64)
    return registers, wait


def _columns(a: Automaton, registers: np.ndarray, wait: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Registers as stored (``Automaton.register_names`` order; NEVER for none)."""
    parts = [registers]
    if a.trailing is not None:
        parts.append(np.where(wait == _NONE, NEVER, wait)[None, :])
    parts.append(np.where(nxt == _NONE, NEVER, nxt)[None, :])
    return np.concatenate(parts).astype(np.int64)


def run_pattern(
    a: Automaton,
    bits: np.ndarray,
    slots: np.ndarray,
    ts: np.ndarray,
    state: list[np.ndarray],
    horizon: int,
    customers: int,
    rounds: int = ROUNDS,
) -> PatternResult:
    """Evaluate ``a`` over rows (conditions x rows ``bits``; ``slots`` and ``ts`` sorted by
    customer, then time) against the stored ``state`` columns (of ``customers`` slots), with
    deadlines due up to ``horizon``. After ``rounds`` vectorized rounds, the rows of customers
    with more matches go through the compiled per-event loop (``engine.rules.sequential``)."""
    fire_slots: list[np.ndarray] = []
    fire_ts: list[np.ndarray] = []
    fire_rows: list[np.ndarray] = []
    done_slots: list[np.ndarray] = []
    done_regs: list[np.ndarray] = []
    done_wait: list[np.ndarray] = []
    n = ts.size
    sel = np.arange(n)
    fresh = np.zeros(n, dtype=bool)  # rows after a match of their customer: start empty
    done_rounds = 0
    while sel.size:
        s_slots, s_ts = slots[sel], ts[sel]
        first = np.ones(sel.size, dtype=bool)
        first[1:] = s_slots[1:] != s_slots[:-1]
        stored, stored_wait = _stored(a, state, s_slots)
        carry = np.where(fresh[sel][None, :], NEVER, stored)
        carry_wait = np.where(fresh[sel], _NONE, stored_wait)
        if done_rounds >= rounds:  # many matches: one event at a time, compiled
            heads = np.flatnonzero(first)
            group, at, row, regs, waits = sequential(
                a, tables(a), bits[:, sel], s_ts, first, carry[:, heads], carry_wait[heads]
            )
            fire_slots.append(s_slots[heads[group]])
            fire_ts.append(at)
            fire_rows.append(np.where(row >= 0, sel[np.maximum(row, 0)], -1))
            done_slots.append(s_slots[heads])
            done_regs.append(regs)
            done_wait.append(waits)
            break
        done_rounds += 1
        p = _pass(a, bits[:, sel], s_ts, first, carry, carry_wait)
        group = np.cumsum(first) - 1
        heads = np.flatnonzero(first)
        last = np.append(heads[1:] - 1, sel.size - 1)
        event = p.completes.copy() if a.trailing is None else p.due_before.copy()
        if a.skip == "no_skip":  # every completing row fires; nothing cuts
            hit = np.flatnonzero(event)
            fire_slots.append(s_slots[hit])
            fire_ts.append(s_ts[hit])
            fire_rows.append(sel[hit])
            done_slots.append(s_slots[last])
            done_regs.append(p.registers[:, last])
            done_wait.append(p.wait[last])
            break
        hit = np.flatnonzero(event)
        keep = np.ones(hit.size, dtype=bool)
        keep[1:] = group[hit[1:]] != group[hit[:-1]]
        hit = hit[keep]  # each customer's first
        cut = np.zeros(heads.size, dtype=bool)
        cut[group[hit]] = True
        # customers without a match here are done: registers after their last row
        whole = last[~cut]
        done_slots.append(s_slots[whole])
        done_regs.append(p.registers[:, whole])
        done_wait.append(p.wait[whole])
        if a.trailing is None:  # completed at the row; the next round starts after it
            fire_ts.append(s_ts[hit])
            fire_rows.append(sel[hit])
            restart = hit + 1
        else:  # a deadline passed before the row; the next round starts at it
            fire_ts.append(p.deadline_before[hit])
            fire_rows.append(np.full(hit.size, -1, dtype=np.int64))
            restart = hit
        fire_slots.append(s_slots[hit])
        ends = last[group[hit]]
        # a customer whose match ended at its last row is done, empty
        empty = restart > ends
        gone = hit[empty]
        done_slots.append(s_slots[gone])
        done_regs.append(np.full((len(a.states), gone.size), NEVER, dtype=np.int64))
        done_wait.append(np.full(gone.size, _NONE, dtype=np.int64))
        spans = [np.arange(r, e + 1) for r, e in zip(restart[~empty], ends[~empty], strict=True)]
        nxt = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        fresh[sel[nxt]] = True
        sel = sel[nxt]
    touched = np.concatenate(done_slots) if done_slots else np.zeros(0, dtype=np.int64)
    registers = (
        np.concatenate(done_regs, axis=1)
        if done_regs
        else np.zeros((len(a.states), 0), dtype=np.int64)
    )
    wait = np.concatenate(done_wait) if done_wait else np.zeros(0, dtype=np.int64)
    # customers with no rows here whose deadline is due
    deadline = state[-1][:customers]
    due = np.flatnonzero((deadline != NEVER) & (deadline <= horizon))
    if touched.size and due.size:
        due = due[~np.isin(due, touched)]
    if due.size:
        due_regs, due_wait = _stored(a, state, due)
        touched = np.concatenate([touched, due])
        registers = np.concatenate([registers, due_regs], axis=1)
        wait = np.concatenate([wait, due_wait])
    fired, at, nxt = _finish(a, registers, wait, horizon)
    if fired.any():
        fire_slots.append(touched[fired])
        fire_ts.append(at[fired])
        fire_rows.append(np.full(int(fired.sum()), -1, dtype=np.int64))
    result = PatternResult(
        np.concatenate(fire_slots) if fire_slots else np.zeros(0, dtype=np.int64),
        np.concatenate(fire_ts) if fire_ts else np.zeros(0, dtype=np.int64),
        np.concatenate(fire_rows) if fire_rows else np.zeros(0, dtype=np.int64),
        touched.astype(np.int64),
        _columns(a, registers, wait, nxt),
    )
    return result
