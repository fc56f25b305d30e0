"""The per-event loop of a pattern's state machine, compiled with Numba.

One event at a time per customer, the transitions of ``engine.rules.pattern``: the entry of
each element is the best valid register of the states waiting for it just before the event; a
state's register becomes the larger of that entry and its old value (unless an absence's event
ends it); a completed match fires (and, skipping past it, clears every register), or enters
the wait of an absence at the end, whose deadline fires before the first later event. Tens of
nanoseconds an event, however skewed the stream (``engine.rules.matcher`` has the vectorized
alternative and the numbers). Compiled once per process and cached on disk; ``warm`` compiles
it (or starts to, in the background) before the first step needs it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from engine.preload import preload
from engine.rules.pattern import Automaton
from engine.state.store import NEVER

#: "no pending entry" of the trailing wait (a running minimum)
NONE = np.iinfo(np.int64).max // 4


@dataclass(frozen=True)
class Tables:
    """An automaton as flat arrays for the compiled loop (CSR lists of states and kills)."""

    element_cond: np.ndarray
    enter_ptr: np.ndarray
    enter_idx: np.ndarray
    leave_ptr: np.ndarray
    leave_idx: np.ndarray
    kill_ptr: np.ndarray
    kill_idx: np.ndarray


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(lists) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(x) for x in lists])
    idx = np.array([v for x in lists for v in x], dtype=np.int64)
    return ptr, idx


def tables(a: Automaton) -> Tables:
    enter = _csr([a.entering(j) for j in range(a.elements)])
    leave = _csr([a.leaving(j) for j in range(a.elements)])
    kills = _csr([list(s.kills) for s in a.states])
    return Tables(np.array(a.element_cond, dtype=np.int64), *enter, *leave, *kills)


def _loop(
    element_cond: np.ndarray,
    enter_ptr: np.ndarray,
    enter_idx: np.ndarray,
    leave_ptr: np.ndarray,
    leave_idx: np.ndarray,
    kill_ptr: np.ndarray,
    kill_idx: np.ndarray,
    trailing: int,
    trailing_ms: int,
    within_ms: int,
    past_last: bool,
    bits: np.ndarray,
    ts: np.ndarray,
    heads: np.ndarray,
    carry: np.ndarray,
    carry_wait: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n_states = carry.shape[0]
    groups = heads.size - 1
    elements = element_cond.size
    fire_group = np.empty(ts.size, dtype=np.int64)
    fire_ts = np.empty(ts.size, dtype=np.int64)
    fire_row = np.empty(ts.size, dtype=np.int64)
    fires = 0
    out = carry.copy()
    out_wait = carry_wait.copy()
    regs = np.empty(n_states, dtype=np.int64)
    new = np.empty(n_states, dtype=np.int64)
    for g in range(groups):
        for s in range(n_states):
            regs[s] = carry[s, g]
        wait = carry_wait[g]
        for r in range(heads[g], heads[g + 1]):
            t = ts[r]
            if trailing >= 0 and wait != NONE and t > wait + trailing_ms:
                fire_group[fires] = g
                fire_ts[fires] = wait + trailing_ms
                fire_row[fires] = -1
                fires += 1
                for s in range(n_states):
                    regs[s] = NEVER
                wait = NONE
            for s in range(n_states):
                new[s] = regs[s]
            entry = NEVER
            for j in range(elements):
                entry = NEVER
                if bits[element_cond[j], r]:
                    if j == 0:
                        entry = t
                    else:
                        for k in range(enter_ptr[j], enter_ptr[j + 1]):
                            v = regs[enter_idx[k]]
                            if v != NEVER and (within_ms < 0 or t - v <= within_ms) and v > entry:
                                entry = v
                for k in range(leave_ptr[j], leave_ptr[j + 1]):
                    s = leave_idx[k]
                    killed = False
                    for c in range(kill_ptr[s], kill_ptr[s + 1]):
                        if bits[kill_idx[c], r]:
                            killed = True
                    old = NEVER if killed else regs[s]
                    new[s] = entry if entry > old else old
            for s in range(n_states):
                regs[s] = new[s]
            if trailing >= 0:
                if bits[trailing, r]:
                    wait = NONE
                if entry != NEVER and t < wait:
                    wait = t
            elif entry != NEVER:
                fire_group[fires] = g
                fire_ts[fires] = t
                fire_row[fires] = r
                fires += 1
                if past_last:
                    for s in range(n_states):
                        regs[s] = NEVER
        for s in range(n_states):
            out[s, g] = regs[s]
        out_wait[g] = wait
    return fire_group[:fires], fire_ts[:fires], fire_row[:fires], out, out_wait


#: one compile per process, though a warming thread and a step may ask at once
_COMPILE = threading.Lock()


def compiled_loop() -> Callable[..., Any]:
    """``_loop`` compiled and loaded (Numba is imported here, so a process without patterns
    never pays for it; the machine code is cached on disk beside this file)."""
    with _COMPILE:
        return compile_loop()


@cache
def compile_loop() -> Callable[..., Any]:
    """``_loop`` compiled and called once (unlocked: call ``compiled_loop``)."""
    from numba import njit

    loop = njit(cache=True, nogil=True)(_loop)
    a = np.zeros(1, dtype=np.int64)  # the first call compiles, or loads the cached code
    loop(a, np.zeros(2, dtype=np.int64), a[:0], np.zeros(2, dtype=np.int64), a[:0],
         np.zeros(1, dtype=np.int64), a[:0], -1, 0, -1, True, np.zeros((1, 0), dtype=bool),
         a[:0], np.zeros(1, dtype=np.int64), np.zeros((0, 0), dtype=np.int64), a[:0])  # fmt: skip
    return loop


def sequential(
    a: Automaton,
    t: Tables,
    bits: np.ndarray,
    ts: np.ndarray,
    first: np.ndarray,
    carry: np.ndarray,
    carry_wait: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows (grouped by customer, ``first`` marking each group's first) one at a time.

    ``carry``/``carry_wait``: per group, the registers before its first row. Returns
    (group, time, row or -1 for a deadline) of each match, and each group's registers and wait
    after its last row."""
    heads = np.append(np.flatnonzero(first), ts.size).astype(np.int64)
    return compiled_loop()(
        t.element_cond, t.enter_ptr, t.enter_idx, t.leave_ptr, t.leave_idx, t.kill_ptr,
        t.kill_idx, -1 if a.trailing is None else a.trailing, a.trailing_ms,
        -1 if a.within_ms is None else a.within_ms, a.skip == "past_last_event",
        np.ascontiguousarray(bits), np.ascontiguousarray(ts, dtype=np.int64), heads,
        np.ascontiguousarray(carry, dtype=np.int64).reshape(len(a.states), heads.size - 1),
        np.ascontiguousarray(carry_wait, dtype=np.int64),
    )  # fmt: skip


def warm(background: bool = False) -> None:
    """Compile (or load from the on-disk cache) the loop now, not in the first step; with
    ``background``, start that in a thread and return (``engine.preload``)."""
    if background:
        preload("pattern-loop", compiled_loop)
    else:
        compiled_loop()
