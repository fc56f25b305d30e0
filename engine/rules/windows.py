"""Window rules: named aggregates over event time, usable in every other rule's expressions.

``type: window`` names a number (a count of the window's events, or the ``sum`` of an
expression over them) that other rules read like any other name, as of each event:

* ``session: 30m``: the events of the customer's current session, a session ending when none
  came for the gap; 0 once the gap has passed (so ``browsing > 0`` at a deadline says the visit
  is still going);
* ``tumbling: hour | day | billing_cycle`` (the customer's local calendar) or a duration
  (aligned to the epoch, UTC): the events of the current period, 0 in a new one;
* ``sliding: 1h`` with ``every: 5m``: the events of the last hour, counted in 5-minute buckets
  (those that start after the event's time less the hour): exact for bucket edges, at most one
  bucket early inside one. ``every`` may be a calendar period (``hour``, ``day``,
  ``billing_cycle``, the customer's local calendar); ``sliding`` is then a number of them
  (``sliding: 6, every: billing_cycle``: this cycle and the five before).
* ``distinct: true`` (sliding, a count): each bucket counts once, if an event came in it: the
  number of buckets (periods) of the window with an event (``on: usage, when: cycle_usage_mb >
  plan_data_cap_mb, sliding: 6, every: billing_cycle, distinct: true``: of the last six billing
  cycles, those in which the customer went over the cap).

Each window keeps a few int64 columns per customer in the golden record (its key time, and
the aggregate's bits; a sliding window one per bucket), so checkpoints and rescaling carry it.
The as-of values are vector operations over the step's view (``BatchView``), computed when a
rule or the write-back asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from engine.events.schema import EventKind
from engine.rules.expr import Expression
from engine.rules.rows import rows_where
from engine.state.store import NEVER
from engine.state.view import RowsView, segmented_count, segmented_cumsum
from engine.units import HOUR_MS

if TYPE_CHECKING:
    from engine.state.view import BatchView

#: most buckets of a sliding window (its bytes per customer are 8 x (buckets + 1))
MAX_BUCKETS = 60


@dataclass(frozen=True)
class Window:
    """A compiled window rule."""

    name: str
    kinds: tuple[EventKind, ...]
    when: Expression | None
    value: Expression | None  # None: a count
    shape: str  # session | tumbling | sliding
    size_ms: int = 0  # the gap, the period (a duration) or the sliding window's length
    every_ms: int = 0  # a sliding window's bucket
    period: str | None = None  # a tumbling window's calendar period, a sliding window's bucket
    keys: tuple[str, ...] = field(default=())  # its state columns in the store
    distinct: bool = False  # a sliding count of buckets with an event, not of events

    @property
    def buckets(self) -> int:
        """A sliding window's buckets (with a calendar bucket, ``size_ms`` is their number)."""
        if self.shape != "sliding":
            return 0
        return self.size_ms if self.period is not None else self.size_ms // self.every_ms

    @property
    def register_names(self) -> list[str]:
        if self.shape == "sliding":
            return ["bucket", *(f"b{i}" for i in range(self.buckets))]
        return ["key", "total"]

    def _running(self, values: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Running sums restarting at ``starts``: a count adds whole numbers, exactly summed
        by the fast ``segmented_count``; a sum of an expression, by ``segmented_cumsum`` (the
        same rounding however the stream is cut)."""
        if self.value is None:
            return segmented_count(values, starts)
        return segmented_cumsum(values, starts)

    def events(self, view: BatchView) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the window's events, what each adds: 1, or the sum's value, NaN as 0)."""
        rows = rows_where(self.kinds, self.when, view)
        if self.value is None or rows.size == 0:
            return rows, np.ones(rows.size, dtype=np.float64)
        values = np.asarray(self.value.evaluate(RowsView(view, rows)), dtype=np.float64)
        return rows, np.nan_to_num(values, nan=0.0)

    def contributions(self, view: BatchView) -> np.ndarray:
        """What each row adds (0 on rows that are not the window's events)."""
        rows, values = self.events(view)
        out = np.zeros(view.size, dtype=np.float64)
        out[rows] = values
        return out

    def store_after(self, view: BatchView) -> None:
        """Write each customer's state after the step's last row (``BatchView.write_back``;
        ``view.window_state`` computed it before any write)."""
        last = np.flatnonzero(view.group_last)
        slots = view.slot[last]
        _, state = view.window_state(self.name)
        for key, values in zip(self.keys, state, strict=True):
            view.store.rule_state[key][slots] = values

    # -- as of each row -----------------------------------------------------------------------
    def as_of(self, view: BatchView) -> tuple[np.ndarray, np.ndarray]:
        """(value per row, state: registers x customers, as stored after each customer's last
        row of the step)."""
        if view.size == 0:
            return np.zeros(0), np.zeros((len(self.keys), 0), dtype=np.int64)
        if self.shape == "tumbling":
            state = [view.store.rule_state[k][view.slot] for k in self.keys]
            return self._tumbling(view, state[0], _floats(state[1]))
        heads = view.slot[view.group_first]  # stored registers read at each customer's first row
        state = [view.store.rule_state[k][heads] for k in self.keys]
        if self.shape == "sliding":
            return self._sliding(view, state)
        return self._session(view, state[0], _floats(state[1]))

    def _session(
        self, view: BatchView, stored_at: np.ndarray, stored_total: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``stored_at`` (the last event's time) and ``stored_total``: per customer of the
        step. Only customers with an event of the window here, or a session still open at
        their first row, are computed: the others read 0, their registers unchanged."""
        rows, adds = self.events(view)
        group = np.cumsum(view.group_first) - 1
        total = np.where(stored_at == NEVER, 0.0, stored_total)
        values = np.zeros(view.size)
        state = np.stack([stored_at, _bits(total)])
        live = (stored_at != NEVER) & (view.ts[view.group_first] - stored_at <= self.size_ms)
        live[group[rows]] = True
        if not live.any():
            return values, state
        sel, mine = np.flatnonzero(live[group]), np.flatnonzero(live)
        values[sel], state[:, mine] = self._session_rows(
            view.ts[sel],
            view.group_first[sel],
            np.searchsorted(sel, rows),  # the customers of ``rows`` are live: all in ``sel``
            adds,
            stored_at[mine],
            total[mine],
        )
        return values, state

    def _session_rows(
        self,
        ts: np.ndarray,
        first: np.ndarray,
        rows: np.ndarray,
        adds: np.ndarray,
        stored_at: np.ndarray,
        stored_total: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Values and registers after the step of whole customers' rows (``first``: each
        customer's first row; ``rows``: the window's events, adding ``adds``)."""
        n = ts.size
        group = np.cumsum(first) - 1
        start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        at = np.full(n, NEVER, dtype=np.int64)  # the customer's last window event so far
        agg = np.zeros(n, dtype=np.float64)
        if rows.size:
            r_first = start[rows] != np.append(-1, start[rows[:-1]])
            prev = np.empty(rows.size, dtype=np.int64)
            prev[1:] = ts[rows[:-1]]
            prev[r_first] = stored_at[group[rows[r_first]]]
            fresh = (prev == NEVER) | (ts[rows] - prev > self.size_ms)
            carry = np.where(r_first & ~fresh, stored_total[group[rows]], 0.0)
            sums = self._running(adds + carry, r_first | fresh)
            at[rows] = ts[rows]
            agg[rows] = sums
        has = np.zeros(n, dtype=bool)
        has[rows] = True
        src = np.maximum.accumulate(np.where(has, np.arange(n), -1))
        mine = src >= start
        at = np.where(mine, at[np.maximum(src, 0)], stored_at[group])
        agg = np.where(mine, agg[np.maximum(src, 0)], stored_total[group])
        open_ = (at != NEVER) & (ts - at <= self.size_ms)
        last = np.append(first[1:], True)
        return np.where(open_, agg, 0.0), np.stack([at[last], _bits(agg[last])])

    def _period(self, view: BatchView) -> np.ndarray:
        if self.period == "day":
            return view.column("@local_day").astype(np.int64)
        if self.period == "hour":
            return view.column("@local_ms").astype(np.int64) // HOUR_MS
        if self.period == "billing_cycle":
            return view.column("@cycle").astype(np.int64)
        return view.ts // self.size_ms

    def _tumbling(
        self, view: BatchView, key: np.ndarray, total: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        period = self._period(view)
        starts = view.group_first.copy()
        starts[1:] |= period[1:] != period[:-1]
        carry = np.where(view.group_first & (key == period), total, 0.0)
        values = self._running(self.contributions(view) + carry, starts)
        last = view.group_last
        return values, np.stack([period[last], _bits(values[last])])

    def _sliding(self, view: BatchView, state: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``state``: the stored registers per customer of the step, in view order.

        Only "live" customers (an event of the window in the step, or a stored bucket with a
        count) get the full computation: the others read 0 on every row, and their registers
        after the step are the newest bucket and zeros. For a rare event (over the cap) and a
        stream of many customers, that is nearly all of them."""
        events, adds = self.events(view)
        first = view.group_first
        group = np.cumsum(first) - 1
        stored_b = state[0]
        ring = np.stack([_floats(s) for s in state[1:]])  # k x customers
        period = view.ts // self.every_ms if self.period is None else self._period(view)
        # a customer's bucket never goes back (a calendar one could: a changed time zone or
        # cycle day): the newest is the stored one or the step's greatest
        top = np.maximum.reduceat(period, np.flatnonzero(first))
        newest = np.where(stored_b == NEVER, top, np.maximum(stored_b, top))
        values = np.zeros(view.size)
        state_after = np.zeros((1 + self.buckets, newest.size), dtype=np.int64)
        state_after[0] = newest  # zeros are the bits of 0.0
        # a fresh customer's registers are NEVER (not 0.0 as floats): they hold no count
        live = (stored_b != NEVER) & (ring != 0).any(axis=0)
        live[group[events]] = True
        if not live.any():
            return values, state_after
        rows, mine = np.flatnonzero(live[group]), np.flatnonzero(live)
        first, stored_b, ring = first[rows], stored_b[mine], ring[:, mine]
        group = np.cumsum(first) - 1
        c = np.zeros(rows.size)
        c[np.searchsorted(rows, events)] = adds  # the customers of events are all live
        bucket = period[rows]
        if self.period is not None:  # never below the stored bucket, nor an earlier row's
            floor = stored_b[group]
            bucket = np.where(floor == NEVER, bucket, np.maximum(bucket, floor))
            low = int(bucket.min())
            span = int(bucket.max()) - low + 1
            bucket = np.maximum.accumulate(group * span + (bucket - low)) - group * span + low
        if self.distinct:
            c = _once_per_bucket(c, bucket, group, stored_b, ring)
        state_after[1:, mine] = self._sliding_ring(c, bucket, first, newest[mine], stored_b, ring)
        values[rows] = self._sliding_values(c, bucket, first, stored_b, ring)
        return values, state_after

    def _sliding_values(
        self,
        c: np.ndarray,
        bucket: np.ndarray,
        first: np.ndarray,
        stored_b: np.ndarray,
        ring: np.ndarray,
    ) -> np.ndarray:
        """The value per row of whole customers' rows (``first``: each customer's first row;
        ``stored_b`` and ``ring`` are theirs, in the same order)."""
        k = self.buckets
        n = c.size
        group = np.cumsum(first) - 1
        start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        # this step's events of the window, per row: a running sum less the part too old
        running = self._running(c, first)
        span = int(bucket.max() - bucket.min()) + k + 2
        keyed = group * span + (bucket - int(bucket.min()))
        first_in = np.searchsorted(keyed, keyed - k + 1, side="left")
        before = np.where(first_in > start, running[np.maximum(first_in - 1, 0)], 0.0)
        inside = running - before
        # the stored buckets still inside: a circular range of each customer's ring (slot j
        # holds the bucket b with b % k == j), summed from prefix sums over the slots
        prefix = np.zeros((k + 1, stored_b.size))
        np.cumsum(ring, axis=0, out=prefix[1:])
        newest_stored = stored_b[group]
        count = np.clip(newest_stored - bucket + k, 0, k)
        count = np.where(newest_stored == NEVER, 0, count)
        hi = newest_stored % k
        lo = (newest_stored - count + 1) % k
        whole = prefix[k, group]
        straight = prefix[hi + 1, group] - prefix[lo, group]
        wrapped = whole - prefix[lo, group] + prefix[hi + 1, group]
        old = np.where(count == 0, 0.0, np.where(lo <= hi, straight, wrapped))
        old = np.where(count == k, whole, old)
        return inside + old

    def _sliding_ring(
        self,
        c: np.ndarray,
        bucket: np.ndarray,
        first: np.ndarray,
        newest: np.ndarray,
        stored_b: np.ndarray,
        ring: np.ndarray,
    ) -> np.ndarray:
        """The ring's bits after each customer's last row (k x customers), of whole customers'
        rows as in ``_sliding_values``; ``newest``: each customer's bucket after the step."""
        k = self.buckets
        customers = newest.size
        group = np.cumsum(first) - 1
        # slot j after the step holds the bucket b in (newest - k, newest] with b % k == j;
        # the stored value of that slot is the same bucket's if it is not newer than stored
        slot = np.arange(k)[:, None]
        b = newest[None, :] - ((newest[None, :] - slot) % k)
        keep = (stored_b[None, :] != NEVER) & (b <= stored_b[None, :])
        out = np.where(keep, ring, 0.0)
        adds = (c != 0) & (bucket > newest[group] - k)
        flat = (bucket[adds] % k) * customers + group[adds]
        out += np.bincount(flat, weights=c[adds], minlength=k * customers).reshape(k, customers)
        return _bits(out)


def _once_per_bucket(
    c: np.ndarray, bucket: np.ndarray, group: np.ndarray, stored_b: np.ndarray, ring: np.ndarray
) -> np.ndarray:
    """``c`` (0 or 1 per row) kept at each customer's first event of each bucket, and only if
    the stored ring has not counted that bucket already."""
    rows = np.flatnonzero(c != 0)
    out = np.zeros_like(c)
    if rows.size == 0:
        return out
    g, b = group[rows], bucket[rows]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = (g[1:] != g[:-1]) | (b[1:] != b[:-1])
    rows, g, b = rows[first], g[first], b[first]
    k = ring.shape[0]
    newest = stored_b[g]
    held = (newest != NEVER) & (b <= newest) & (b > newest - k)
    counted = held & (ring[b % k, g] != 0)
    out[rows[~counted]] = 1.0
    return out


def _floats(bits: np.ndarray) -> np.ndarray:
    """A state column's int64 bits as the float64 they hold."""
    return np.ascontiguousarray(bits, dtype=np.int64).view(np.float64)


def _bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float64).view(np.int64)
