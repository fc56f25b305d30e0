"""One released micro-batch, sorted by (customer, event time, arrival), seen against the store.

Rules need values *as of each event*: the profile after the profile updates before it, the
data used in the billing cycle so far including it. They are computed for the whole batch at
once: group-wise forward fill for profile fields, segmented cumulative sums for aggregates.
Columns are computed on first use and cached; ``write_back`` stores each customer's last
values in the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.calendar import billing_cycle, days_left, local_day, local_hour, local_ms
from engine.events.schema import ALL_CHANNELS, CHANNEL_BITS, ROUTED_SCHEMA, TIMER_KIND, EventKind
from engine.fields import expression_names, names
from engine.reference import EMPTY, Pooled, ReferenceData
from engine.state.store import NEVER, PROFILE_COLUMNS, STRING_COLUMNS, CustomerStore

#: event-time bits of the packed sort key (70 years of milliseconds)
TS_BITS = 41
_EVENT_NAMES = expression_names("event")
_STRING_EVENT_FIELDS = tuple(n for n, t in _EVENT_NAMES.items() if t == "str")
_NUMERIC_EVENT_FIELDS = tuple(n for n, t in _EVENT_NAMES.items() if t == "num")
AGGREGATES = names("aggregate")
#: running counts of 0/1 increments per row
_COUNTS = ("overage_cycles", "purchase_count", "offers_accepted", "offers_declined")
#: counts a profile update may set outright (from the billing system's history)
SEEDED_COUNTS = ("overage_cycles",)
#: where the phone is as of each event: the latest location event's (lat, lon), this one's if it
#: is one (the golden record's last_lat/last_lon before the batch)
CURRENT_LOCATION = ("current_lat", "current_lon")


def _nulls(name: str, size: int) -> np.ndarray:
    typ = ROUTED_SCHEMA.field(name).type
    if pa.types.is_floating(typ):
        return np.full(size, np.nan)
    return np.full(size, None, dtype=object)


def segmented_cumsum(
    values: np.ndarray, starts: np.ndarray, first: np.ndarray | None = None
) -> np.ndarray:
    """Running sum of ``values`` that restarts at every row where ``starts`` is true.

    Each segment is summed left to right on its own, exactly as a loop over its events would:
    the result of a row depends only on the rows of its segment, never on what else is in the
    batch. (A cumulative sum over the whole batch less the total before the segment is faster
    but rounds differently with every batch: a replay that cuts micro-batches elsewhere, after a
    recovery, would then differ in the last bits and, now and then, at a threshold.)

    Segments are padded into rows of a matrix and summed along them; grouping segments by
    length (powers of two) keeps the padding under the batch's size. ``first`` is accepted for
    callers that have each row's segment start; it is not needed.
    """
    del first
    n = values.size
    out = np.array(values, dtype=np.float64, copy=True)
    if n < 2:
        return out
    bounds = np.flatnonzero(starts)
    if bounds.size == 0 or bounds[0] != 0:
        bounds = np.concatenate(([0], bounds))
    lengths = np.diff(np.append(bounds, n))
    longer = lengths > 1
    if not longer.any():
        return out
    bounds, lengths = bounds[longer], lengths[longer]
    buckets = np.ceil(np.log2(lengths)).astype(np.int64)
    for bucket in np.unique(buckets).tolist():
        chosen = buckets == bucket
        heads, sizes = bounds[chosen], lengths[chosen]
        columns = np.arange(int(sizes.max()))
        index = heads[:, None] + columns[None, :]
        inside = columns[None, :] < sizes[:, None]
        padded = np.where(inside, out[np.minimum(index, n - 1)], 0.0)
        out[index[inside]] = np.cumsum(padded, axis=1)[inside]
    return out


def segmented_count(
    values: np.ndarray, starts: np.ndarray, first: np.ndarray | None = None
) -> np.ndarray:
    """``segmented_cumsum`` of whole numbers (counts and their carried values), faster: a
    cumulative sum over the batch less the total before each segment, exact for integers below
    2**53, so it too depends on nothing but the segment."""
    total = np.cumsum(values)
    if first is None:
        first = np.maximum.accumulate(np.where(starts, np.arange(values.size), 0))
    return total - (total[first] - values[first])


def sort_order(slots: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Stable order by (slot, ts); rows arrive in sequence order, so ties keep it.

    When slot, time offset and row number fit in 64 bits together (a micro-batch of 64k
    events spanning up to ~3 days of 100k-customer shard: 17 + 28 + 16 bits), the packed keys
    are unique and a plain value sort orders them (SIMD sort, ~20x a stable argsort); the row
    number is read back from the low bits. Otherwise a stable argsort or a lexsort.
    """
    n = slots.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lo = int(ts.min())
    span = int(ts.max()) - lo
    top = int(slots.max())
    row_bits = max(1, (n - 1).bit_length())
    ts_bits = max(1, span.bit_length())
    if top.bit_length() + ts_bits + row_bits <= 64:
        key = slots.astype(np.uint64) << np.uint64(ts_bits + row_bits)
        key |= (ts - lo).astype(np.uint64) << np.uint64(row_bits)
        key |= np.arange(n, dtype=np.uint64)
        key.sort()
        return (key & np.uint64((1 << row_bits) - 1)).astype(np.int64)
    if span < (1 << TS_BITS) and top < (1 << (63 - TS_BITS)):
        key = (slots.astype(np.int64) << TS_BITS) | (ts - lo)
        return np.argsort(key, kind="stable")
    return np.lexsort((ts, slots))


class RowsView:
    """The rows ``rows`` of a BatchView, as an expression Context of their own."""

    def __init__(self, view: BatchView, rows: np.ndarray) -> None:
        self.view = view
        self.rows = rows
        self.size = int(rows.size)
        self.reference = view.reference

    def column(self, name: str) -> np.ndarray:
        return self.view.column(name)[self.rows]

    def pooled(self, name: str) -> Pooled | None:
        found = self.view.pooled(name)
        return None if found is None else found.take(self.rows)


class BatchView:
    """A sorted batch with per-row slots; implements the expression Context."""

    def __init__(
        self,
        table: pa.Table,
        order: np.ndarray,
        slots: np.ndarray,
        store: CustomerStore,
        windows: Mapping[str, Any] | None = None,
        reference: ReferenceData = EMPTY,
    ) -> None:
        """``order``: rows of ``table`` in (customer, time, arrival) order; ``slots`` match it.
        ``windows``: the window rules' names and their computations (``engine.rules.windows``:
        ``as_of(view)`` and ``store_after(view)``), read like any column. ``reference``: the
        tables the reference functions of expressions read."""
        self.windows: Mapping[str, Any] = windows or {}
        self.reference = reference
        self.table = table
        self.order = order
        self.slot = slots
        self.store = store
        self.size = int(order.size)
        n = self.size
        self._cache: dict[str, np.ndarray] = {}
        self._windows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.kind = self.gather("kind")
        self.ts = self.gather("ts")
        self.group_first = np.ones(n, dtype=bool)
        if n > 1:
            self.group_first[1:] = slots[1:] != slots[:-1]
        self.group_last = np.ones(n, dtype=bool)
        if n > 1:
            self.group_last[:-1] = self.group_first[1:]
        self.group_start = np.maximum.accumulate(np.where(self.group_first, np.arange(n), 0))
        self.updated: set[str] = set()

    def gather(self, name: str) -> np.ndarray:
        """A table column as numpy, in the view's row order (cached)."""
        key = f"@raw:{name}"
        cached = self._cache.get(key)
        if cached is None:
            if name not in self.table.column_names:  # left out of the batch: null everywhere
                cached = _nulls(name, self.size)
                self._cache[key] = cached
                return cached
            column = self.table.column(name)
            if name == "ts":
                column = column.cast(pa.int64())
            cached = np.asarray(column.to_numpy())[self.order]
            self._cache[key] = cached
        return cached

    def arrow(self, name: str, rows: np.ndarray) -> pa.Array | pa.ChunkedArray:
        """A table column's values at view rows ``rows``, as Arrow."""
        if name not in self.table.column_names:
            return pa.nulls(rows.size, ROUTED_SCHEMA.field(name).type)
        return self.table.column(name).take(pa.array(self.order[rows]))

    # -- the expression Context -------------------------------------------------------------
    def column(self, name: str) -> np.ndarray:
        cached = self._cache.get(name)
        if cached is None:
            cached = self._compute(name)
            self._cache[name] = cached
        return cached

    def pooled(self, name: str) -> Pooled | None:
        """A golden-record string column (time zone, device model) as of each row, as codes
        into the store's string pool (``engine.reference.Pooled``); None for other names."""
        if name not in STRING_COLUMNS:
            return None
        return Pooled(self.profile(name), self.store.strings)

    def window_state(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(value per row, state registers per customer after the step) of window ``name``
        (cached)."""
        key = f"@window:{name}"
        cached = self._windows.get(key)
        if cached is None:
            cached = self.windows[name].as_of(self)
            self._windows[key] = cached
        return cached

    def _compute(self, name: str) -> np.ndarray:
        if name in self.windows:
            return self.window_state(name)[0]
        if name in _NUMERIC_EVENT_FIELDS:
            return self._numeric(name)
        if name in _STRING_EVENT_FIELDS:
            return self.gather(name).astype(object)
        if name in STRING_COLUMNS:
            return self.store.strings.strings_of(self.profile(name))
        if name in PROFILE_COLUMNS:
            return self.profile(name).astype(np.float64)
        if name == "cycle_usage_mb":
            return self._cycle_usage()
        if name in CURRENT_LOCATION:
            return self.last_location()[CURRENT_LOCATION.index(name)]
        if name in _COUNTS:
            return self._count_running(name, self._increments(name))
        if name == "cart_items":
            return self._cart_items()
        if name == "@days_left":
            return days_left(self._local, self._cycle[1])
        if name == "@local_hour":
            return local_hour(self._local)
        if name == "@local_day":
            return local_day(self._local)
        if name == "@local_ms":
            return self._local
        if name == "@cycle":
            return self._cycle[0].astype(np.int64)
        raise KeyError(f"unknown column '{name}'")

    def _numeric(self, name: str) -> np.ndarray:
        return self.gather(name).astype(np.float64)

    # -- profile as of each event ---------------------------------------------------------------
    def _updates(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(has_update, value) per row for one profile field."""
        is_update = self.kind == EventKind.PROFILE_UPDATE
        dtype = self.store.cols[name].dtype
        values = np.zeros(self.size, dtype=dtype)
        if not is_update.any():
            return is_update, values
        candidates = np.flatnonzero(is_update)
        col = self.arrow(name, candidates)
        present = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        has = np.zeros(self.size, dtype=bool)
        rows = candidates[present]
        has[rows] = True
        if rows.size == 0:
            return has, values
        col = col.filter(pa.array(present))
        if name in STRING_COLUMNS:
            encoded = pc.dictionary_encode(col)
            if isinstance(encoded, pa.ChunkedArray):
                encoded = encoded.combine_chunks()
            pool_ids = self.store.strings.ids_of(encoded.dictionary.to_pylist())
            values[rows] = pool_ids[encoded.indices.to_numpy(zero_copy_only=False)]
        elif name == "channels":
            flat = pc.list_flatten(col)
            parent = pc.list_parent_indices(col).to_numpy()
            encoded = pc.dictionary_encode(flat)
            if isinstance(encoded, pa.ChunkedArray):
                encoded = encoded.combine_chunks()
            bit_of = np.array(
                [CHANNEL_BITS.get(c, 0) for c in encoded.dictionary.to_pylist()], dtype=np.uint8
            )
            bits = bit_of[encoded.indices.to_numpy(zero_copy_only=False)]
            mask = np.zeros(rows.size, dtype=np.uint8)
            np.bitwise_or.at(mask, parent, bits)
            values[rows] = mask
        else:
            values[rows] = col.to_numpy(zero_copy_only=False).astype(dtype)
        return has, values

    def profile(self, name: str) -> np.ndarray:
        """Profile field ``name`` as of each event, in the store's dtype."""
        key = f"@profile:{name}"
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        base = self.store.cols[name][self.slot]
        has, values = self._updates(name)
        if has.any():
            src = np.maximum.accumulate(np.where(has, np.arange(self.size), -1))
            valid = src >= self.group_start
            out = np.where(valid, values[np.maximum(src, 0)], base)
            self.updated.add(name)
        else:
            out = base
        self._cache[key] = out
        return out

    # -- time and billing cycles ------------------------------------------------------------------
    @cached_property
    def _local(self) -> np.ndarray:
        return local_ms(self.ts, self.profile("tz"), self.store.strings.values)

    @cached_property
    def _cycle(self) -> tuple[np.ndarray, np.ndarray]:
        return billing_cycle(self._local, self.profile("cycle_day"))

    # -- aggregates as of each event --------------------------------------------------------------
    @cached_property
    def _cycle_segments(self) -> tuple[np.ndarray, np.ndarray]:
        """(segment starts, continues_stored_cycle) for the (customer, billing cycle) runs."""
        cycle = self._cycle[0]
        starts = self.group_first.copy()
        if self.size > 1:
            starts[1:] |= cycle[1:] != cycle[:-1]
        stored = self.store.cols["cycle_id"][self.slot]
        continues = self.group_first & (stored == cycle)
        return starts, continues

    def _cycle_usage(self) -> np.ndarray:
        starts, continues = self._cycle_segments
        used = np.where(self.kind == EventKind.USAGE, np.nan_to_num(self._numeric("mb")), 0.0)
        carry = np.where(continues, self.store.cols["cycle_usage_mb"][self.slot], 0.0)
        return segmented_cumsum(used + carry, starts)

    def _increments(self, name: str) -> np.ndarray:
        """Per row, what it adds to the running count ``name`` (0 or 1)."""
        if name == "purchase_count":
            return self.kind == EventKind.PURCHASE
        if name in ("offers_accepted", "offers_declined"):
            responses = self.kind == EventKind.OFFER_RESPONSE
            if responses.any():
                wanted = "accepted" if name == "offers_accepted" else "declined"
                responses &= self.gather("response") == wanted
            return responses
        return self._overage_increments()

    def _overage_increments(self) -> np.ndarray:
        """Cycles ended with usage over the cap; a cycle ends at the first event of the next."""
        starts, continues = self._cycle_segments
        usage = self.column("cycle_usage_mb")
        prev_usage = np.empty(self.size)
        prev_usage[0:1] = 0.0
        prev_usage[1:] = usage[:-1]
        first = self.group_first
        stored_cycle = self.store.cols["cycle_id"][self.slot]
        prev_usage = np.where(first, self.store.cols["cycle_usage_mb"][self.slot], prev_usage)
        rollover = starts & ~continues & ~(first & (stored_cycle < 0))
        cap = self.profile("plan_data_cap_mb")
        with np.errstate(invalid="ignore"):
            return rollover & (prev_usage > cap)

    def _count_running(self, column: str, increments: np.ndarray) -> np.ndarray:
        base = self.store.cols[column][self.slot].astype(np.float64)
        start_values = np.where(self.group_first, base, 0.0)
        seeded, seeds = self._seeds(column)
        if seeded is None:
            return segmented_count(
                increments.astype(np.float64) + start_values, self.group_first, self.group_start
            )
        # a profile update that carries the count (billing history) restarts it at its value;
        # the event's own increment (a cycle it closes) still counts
        start_values = np.where(seeded, seeds.astype(np.float64), start_values)
        return segmented_count(
            increments.astype(np.float64) + start_values, self.group_first | seeded
        )

    def _seeds(self, column: str) -> tuple[np.ndarray | None, np.ndarray]:
        """(rows whose profile update sets ``column``, their values), or (None, _) if none."""
        if column not in SEEDED_COUNTS or not (self.kind == EventKind.PROFILE_UPDATE).any():
            return None, np.zeros(0)
        if column not in self.table.column_names:
            return None, np.zeros(0)
        has, values = self._updates(column)
        return (has, values) if has.any() else (None, values)

    def _final(self, name: str, last: np.ndarray) -> np.ndarray:
        """Aggregate ``name`` after each customer's last row (``last``: those rows).

        A running column some rule or feature already asked for is read at those rows; a
        count nobody read is summed per customer instead of accumulated row by row.
        """
        cached = self._cache.get(name)
        if cached is None and name in _COUNTS and self._seeds(name)[0] is None:
            increments = self._increments(name).astype(np.int64)
            if not increments.any():
                return self.store.cols[name][self.slot[last]]
            starts = np.flatnonzero(self.group_first)
            added = np.add.reduceat(increments, starts)
            return self.store.cols[name][self.slot[last]] + added
        return (cached if cached is not None else self.column(name))[last]

    def _cart_items(self) -> np.ndarray:
        checkout = self.kind == EventKind.CHECKOUT
        added = (self.kind == EventKind.CART_ADD).astype(np.float64)
        starts = self.group_first | checkout
        carry = np.where(
            self.group_first & ~checkout, self.store.cols["cart_items"][self.slot], 0.0
        )
        return segmented_count(np.where(checkout, 0.0, added) + carry, starts)

    # -- writing each customer's final values back ------------------------------------------------
    def write_back(self) -> None:
        """Store every customer's state after the last event of the batch.

        Every value is computed before the first write: as-of columns read the store lazily
        and must see it as it was before this batch. A value no rule asked for as of each row
        is taken straight from each customer's last row that sets it.
        """
        last = np.flatnonzero(self.group_last)
        slots = self.slot[last]
        for name in self.windows:  # before any write: they read the store as it was
            self.window_state(name)
        writes: list[tuple[str, np.ndarray, np.ndarray]] = []  # (column, slots, values)
        if (self.kind == EventKind.PROFILE_UPDATE).any():
            for name in PROFILE_COLUMNS:
                cached = self._cache.get(f"@profile:{name}")
                if cached is not None:
                    if name in self.updated:
                        writes.append((name, slots, cached[last]))
                    continue
                has, values = self._updates(name)
                rows = self._last_rows(np.flatnonzero(has))
                if rows.size:
                    writes.append((name, self.slot[rows], values[rows]))
        writes.append(("cycle_id", slots, self._cycle[0][last]))
        for name in AGGREGATES:
            writes.append((name, slots, self._final(name, last)))
        writes.extend(self._location_writes(last))
        writes.extend(self._consent_writes(last))
        cols = self.store.cols
        for name, where, values in writes:
            cols[name][where] = values
        heads = np.flatnonzero(self.group_first)
        timer = self.kind == TIMER_KIND  # a pattern's deadline: the state as of it, not an event
        if timer.any():
            newest = np.maximum.reduceat(np.where(timer, NEVER, self.ts), heads)
            sizes = np.add.reduceat((~timer).astype(np.int64), heads)
        else:
            newest = self.ts[last]
            sizes = np.diff(np.append(heads, self.size))
        cols["last_event_ms"][slots] = np.maximum(cols["last_event_ms"][slots], newest)
        cols["event_count"][slots] += sizes.astype(np.int32)
        for window in self.windows.values():
            window.store_after(self)

    def _last_rows(self, rows: np.ndarray) -> np.ndarray:
        """Of ``rows`` (ascending view rows), each customer's last one."""
        if rows.size < 2:
            return rows
        cand = self.slot[rows]
        return rows[np.append(cand[1:] != cand[:-1], True)]

    def _as_of(self, has: np.ndarray, values: np.ndarray, base: np.ndarray) -> np.ndarray:
        """Per row: ``values`` at the customer's latest ``has`` row so far, else ``base``."""
        src = np.maximum.accumulate(np.where(has, np.arange(self.size), -1))
        return np.where(src >= self.group_start, values[np.maximum(src, 0)], base)

    def last_location(self) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) of each customer's latest location as of each row."""
        key = "@last_location"
        if key not in self._cache:
            is_loc = self.kind == EventKind.LOCATION
            lat = self.store.cols["last_lat"][self.slot].astype(np.float64)
            lon = self.store.cols["last_lon"][self.slot].astype(np.float64)
            if is_loc.any():
                lat = self._as_of(is_loc, self._numeric("lat"), lat)
                lon = self._as_of(is_loc, self._numeric("lon"), lon)
            self._cache[key] = np.stack([lat, lon])
        both = self._cache[key]
        return both[0], both[1]

    def consent(self) -> tuple[np.ndarray, np.ndarray]:
        """(granted, withdrawn) channel bitmasks as of each row, consent events applied."""
        key = "@consent"
        if key not in self._cache:
            granted = self.store.cols["consent_granted"][self.slot]
            withdrawn = self.store.cols["consent_withdrawn"][self.slot]
            rows = np.flatnonzero(self.kind == EventKind.CONSENT)
            if rows.size:
                g_after, w_after = self._consent_after(rows)
                has = np.zeros(self.size, dtype=bool)
                has[rows] = True
                g_vals = np.zeros(self.size, dtype=np.uint8)
                w_vals = np.zeros(self.size, dtype=np.uint8)
                g_vals[rows], w_vals[rows] = g_after, w_after
                granted = self._as_of(has, g_vals, granted)
                withdrawn = self._as_of(has, w_vals, withdrawn)
            self._cache[key] = np.stack([granted, withdrawn])
        both = self._cache[key]
        return both[0], both[1]

    def _consent_after(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The masks right after each consent row (rows sorted by customer, then time)."""
        channels = self.arrow("channel", rows).to_pylist()
        granted = self.arrow("granted", rows).to_pylist()
        g_out = np.empty(rows.size, dtype=np.uint8)
        w_out = np.empty(rows.size, dtype=np.uint8)
        g = w = 0
        prev_slot = -1
        for i, (row, channel, ok) in enumerate(zip(rows, channels, granted, strict=True)):
            slot = int(self.slot[row])  # rare path: consent events are a small share
            if slot != prev_slot:
                g = int(self.store.cols["consent_granted"][slot])
                w = int(self.store.cols["consent_withdrawn"][slot])
                prev_slot = slot
            bits = ALL_CHANNELS if channel == "all" else CHANNEL_BITS[channel]
            if ok:
                g, w = g | bits, w & ~bits & 0xFF
            else:
                g, w = g & ~bits & 0xFF, w | bits
            g_out[i], w_out[i] = g, w
        return g_out, w_out

    def _location_writes(self, last: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        is_loc = self.kind == EventKind.LOCATION
        if not is_loc.any():
            return []
        if "@last_location" in self._cache:
            lat, lon = self.last_location()
            where, lat, lon = self.slot[last], lat[last], lon[last]
        else:
            rows = self._last_rows(np.flatnonzero(is_loc))
            where = self.slot[rows]
            lat, lon = self._numeric("lat")[rows], self._numeric("lon")[rows]
        return [("last_lat", where, lat), ("last_lon", where, lon)]

    def _consent_writes(self, last: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        rows = np.flatnonzero(self.kind == EventKind.CONSENT)
        if not rows.size:
            return []
        if "@consent" in self._cache:
            granted, withdrawn = self.consent()
            where, granted, withdrawn = self.slot[last], granted[last], withdrawn[last]
        else:
            g_after, w_after = self._consent_after(rows)
            keep = np.isin(rows, self._last_rows(rows))
            where, granted, withdrawn = self.slot[rows[keep]], g_after[keep], w_after[keep]
        return [("consent_granted", where, granted), ("consent_withdrawn", where, withdrawn)]
