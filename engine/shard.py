"""ShardLogic: everything a shard does, without Ray. The ShardActor is a thin wrapper.

``apply(batch, watermark)`` queues a routed micro-batch (dropping duplicate event ids) and
releases the events the watermark has passed; it applies them in steps (at most
``decision_step_max_events`` when decisions are on), each in (customer, event time, arrival)
order: the rules are evaluated against each event's as-of state, the triggers some offer
answers are decided (``engine.decision.decider``), and the golden records are updated. It
returns the triggers and the decisions. ``end_stream()`` releases everything pending.

Rules and the catalog can be replaced between micro-batches (state of rules that keep their id
and type carries over, and so does contact history). ``snapshot()`` returns everything the shard
holds as a value (``engine.snapshot.ShardSnapshot``); ``restore()`` takes one back.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from engine.config import EngineSettings
from engine.decision.arbitration import decision_ids
from engine.decision.catalog import Catalog
from engine.decision.decider import INBOUND, Decider
from engine.decision.log import (
    DECISION_SCHEMA,
    conform_decisions,
    decision_id_text,
    empty_decisions,
)
from engine.decision.scorer import OfferScorer
from engine.errors import EngineError
from engine.events.deadletter import DEAD_LETTER_SCHEMA
from engine.events.schema import CHANNELS, ROUTED_SCHEMA, TS_TYPE, EventKind, sparse_routed
from engine.ingest import NO_WATERMARK
from engine.limits import TS_RANGE_TEXT, time_in_range
from engine.reference import EMPTY, ReferenceData, preload_search
from engine.rules.evaluate import candidates, cooldown, once_per_period, period_of
from engine.rules.sequential import warm
from engine.rules.spec import CompiledRule, RuleSet
from engine.rules.timers import match_pattern, with_timer_rows
from engine.snapshot import ShardSnapshot
from engine.state.buffer import EventBuffer, Released, rows_holding
from engine.state.store import COLUMNS, NEVER, CustomerStore
from engine.state.view import BatchView, RowsView, sort_order
from engine.trigger import TRIGGER_SCHEMA, empty_triggers, trigger_table

#: inbound decisions awaiting their log record (``ShardLogic.decide_inbound``), at most
MAX_INBOUND_AWAITED = 100_000

#: release everything: used when a stream ends
END_OF_STREAM = np.iinfo(np.int64).max // 2
#: rows of the newest triggers and decisions a shard keeps for golden-record reads
RECENT_ROWS = 50_000
#: newest triggers and decisions shown per customer
RECENT_PER_CUSTOMER = 10
#: tables a recent window keeps before it merges them into one (lookups loop over them)
_MAX_TABLES = 64


class Recent:
    """The newest ``limit`` rows of a stream of tables (triggers or decisions)."""

    def __init__(self, schema: pa.Schema, limit: int = RECENT_ROWS) -> None:
        self.schema = schema
        self.limit = limit
        self.tables: deque[pa.Table] = deque()
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.tables.append(table)
        self.rows += table.num_rows
        if len(self.tables) > _MAX_TABLES:  # many small ones (inbound decisions, one each)
            self.tables = deque([pa.concat_tables(self.tables).combine_chunks()])
        while self.tables and self.rows - self.tables[0].num_rows >= self.limit:
            self.rows -= self.tables.popleft().num_rows
        if self.rows > self.limit:  # exactly the newest rows: a restored window shows the same
            extra = self.rows - self.limit
            self.tables[0] = self.tables[0].slice(extra)
            self.rows = self.limit

    def to_table(self) -> pa.Table:
        """The window as one table, oldest row first (for a snapshot)."""
        if not self.tables:
            return self.schema.empty_table()
        return pa.concat_tables(self.tables).combine_chunks()

    @classmethod
    def from_table(cls, table: pa.Table, limit: int = RECENT_ROWS) -> Recent:
        recent = cls(table.schema, limit)
        recent.add(table)
        return recent

    def holding(self, column: str, values: np.ndarray) -> pa.Table:
        """The rows whose ``column`` is one of ``values`` (a few), oldest first."""
        parts = []
        for table in self.tables:
            rows = rows_holding(table.column(column).to_numpy(), values)
            if rows.size:
                parts.append(table.take(pa.array(rows)))
        return pa.concat_tables(parts) if parts else self.schema.empty_table()

    def of(self, customer_key: int, columns: list[str], n: int) -> list[dict[str, Any]]:
        """The newest ``n`` rows of one customer, newest first, as plain values."""
        out: list[dict[str, Any]] = []
        for table in reversed(self.tables):
            keys = table.column("customer_key").to_numpy()
            hits = np.flatnonzero(keys == np.uint64(customer_key))
            if hits.size:
                rows = table.select(columns).take(pa.array(hits[::-1])).to_pylist()
                out.extend(rows[: n - len(out)])
            if len(out) >= n:
                break
        return out


@dataclass
class ApplyResult:
    """What one micro-batch did."""

    triggers: pa.Table
    decisions: pa.Table = field(default_factory=empty_decisions)
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    pending: int = 0
    decide_ms: float = 0.0  # time spent deciding (policy, scoring, arbitration), in all
    #: per part of the release that had decisions: its trigger-to-decision time
    decide_ms_parts: list[float] = field(default_factory=list)
    triggers_by_rule: dict[str, int] = field(default_factory=dict)
    #: dead letters of the events of steps that failed (applied by no one; see ``apply``)
    failed: pa.Table = field(default_factory=DEAD_LETTER_SCHEMA.empty_table)


def failed_letters(released: Released, error: BaseException) -> pa.Table:
    """The events of a failed step as dead letters, each with the error; ``index`` is the
    event's arrival sequence number (its position in the stream, not in a request)."""
    rows = released.rows
    table = released.table
    kinds = np.asarray(table.column("kind").to_numpy(zero_copy_only=False))[rows]
    names = np.array([k.wire_name for k in EventKind], dtype=object)
    reason = f"shard_failed: {type(error).__name__}: {error}"[:500]
    return pa.table(
        {
            "index": pa.array(np.asarray(table.column("seq").to_numpy())[rows].astype(np.int64)),
            "event_id": pa.array(np.asarray(table.column("event_id").to_numpy())[rows]),
            "kind": pa.array(names[kinds], type=pa.string()),
            "field": pa.nulls(rows.size, pa.string()),
            "value": pa.nulls(rows.size, pa.string()),
            "reason": pa.array([reason] * rows.size, type=pa.string()),
        },
        schema=DEAD_LETTER_SCHEMA,
    )


def release_parts(released: Released, limit: int) -> list[Released]:
    """``released`` as parts of at most ``limit`` events, in event-time order between parts.

    A release can be far larger than a micro-batch (everything held back by the allowed
    lateness, a backlog after a pause, a restore): applying it in bounded parts bounds the time
    from a trigger to its decision and the memory of one step. Parts are cut in (event time,
    arrival) order, so each customer's events are applied in the same order as in one step
    and the results are the same.
    """
    n = released.num_rows
    if n <= limit:
        return [released]
    ts = np.asarray(released.table.column("ts").cast(pa.int64()).to_numpy())[released.rows]
    by_time = released.rows[np.argsort(ts, kind="stable")]
    return [Released(released.table, np.sort(by_time[i : i + limit])) for i in range(0, n, limit)]


def _merge(parts: list[ApplyResult]) -> ApplyResult:
    if len(parts) == 1:
        return parts[0]
    failed = [p.failed for p in parts if p.failed.num_rows]
    triggers = [p.triggers for p in parts if p.triggers.num_rows]
    decisions = [p.decisions for p in parts if p.decisions.num_rows]
    by_rule: dict[str, int] = {}
    for p in parts:
        for rule, count in p.triggers_by_rule.items():
            by_rule[rule] = by_rule.get(rule, 0) + count
    return ApplyResult(
        pa.concat_tables(triggers) if triggers else parts[0].triggers,
        pa.concat_tables(decisions) if decisions else parts[0].decisions,
        applied=sum(p.applied for p in parts),
        decide_ms=sum(p.decide_ms for p in parts),
        decide_ms_parts=[ms for p in parts for ms in p.decide_ms_parts],
        triggers_by_rule=by_rule,
        failed=pa.concat_tables(failed) if failed else parts[0].failed,
    )


class ShardLogic:
    """One shard's customers, event buffer and rules."""

    def __init__(
        self,
        shard_id: int,
        settings: EngineSettings,
        rules: RuleSet,
        key_range: tuple[int, int] | None = None,
        catalog: Catalog | None = None,
        scorer: OfferScorer | None = None,
    ) -> None:
        self.shard_id = shard_id
        self.settings = settings
        self.key_range = key_range or (0, settings.key_groups)
        self.store = CustomerStore()
        self.buffer = EventBuffer(settings.dedupe_window_ms)
        self.watermark_ms = NO_WATERMARK
        self.rules = rules
        #: the reference tables rules read (``set_reference``; its version goes in snapshots)
        self.reference: ReferenceData = EMPTY
        self.store.ensure_rules(rules.state_keys)
        if any(r.pattern is not None for r in rules.rules):
            warm(background=True)  # the shard answers at once; a step waits if it must
        self.counters: dict[str, int] = {
            "received": 0,
            "applied": 0,
            "duplicates": 0,
            "triggers": 0,
            "decisions": 0,
            "delivered": 0,
            "failed": 0,
        }
        self.recent_triggers = Recent(TRIGGER_SCHEMA)
        self.recent_decisions = Recent(DECISION_SCHEMA)
        #: inbound decision id -> its time, for decisions applied here whose log record has
        #: not been read back yet (``record_inbound``)
        self.inbound_live: dict[int, int] = {}
        self.decider: Decider | None = None
        if catalog is not None:
            self.set_catalog(catalog, scorer)

    def set_rules(self, rules: RuleSet) -> None:
        """Swap the rule set; state of rules kept (same id and type) carries over."""
        if any(r.pattern is not None for r in rules.rules):
            warm(background=True)
        self.store.ensure_rules(rules.state_keys)
        self.rules = rules

    def set_reference(self, reference: ReferenceData) -> None:
        """Swap the reference tables (between micro-batches: the next step reads the new ones)."""
        if reference.tables["stores"].num_rows:
            preload_search()
        self.reference = reference

    def set_catalog(self, catalog: Catalog | None, scorer: OfferScorer | None = None) -> None:
        """Swap the offer catalog (None: no decisions); contact history carries over."""
        if catalog is None:
            self.decider = None
            return
        if scorer is None:
            if self.decider is None:
                raise EngineError("decisions need a scorer: pass one with the first catalog")
            scorer = self.decider.scorer
        self.decider = Decider(catalog, scorer, self.store)

    def set_scorer(self, scorer: OfferScorer) -> None:
        if self.decider is None:
            raise EngineError("no offer catalog is set: there is nothing to score")
        self.decider.scorer = scorer

    def _check_ownership(self, batch: pa.RecordBatch) -> None:
        groups = batch.column("key_group").to_numpy()
        start, stop = self.key_range
        if groups.size and (groups.min() < start or groups.max() >= stop):
            raise EngineError(
                f"shard {self.shard_id} owns key groups [{start}, {stop}) but received "
                f"[{groups.min()}, {groups.max()}]: the router's shard map is out of date"
            )

    def apply(
        self, batch: pa.RecordBatch | Sequence[pa.RecordBatch] | None, watermark_ms: int
    ) -> ApplyResult:
        """Queue ``batch`` (a routed batch, or several in arrival order), advance the watermark,
        apply what it releases, return triggers."""
        received = duplicates = 0
        batches = [batch] if isinstance(batch, pa.RecordBatch) else list(batch or [])
        checked = []
        for part in batches:
            if not part.num_rows:
                continue
            try:
                routed = sparse_routed(part)
            except (ValueError, pa.ArrowInvalid) as exc:
                raise EngineError(f"shard {self.shard_id}: malformed routed batch: {exc}") from exc
            self._check_ownership(routed)
            checked.append(routed)
        for part in checked:  # all checked first: a bad part leaves the buffer untouched
            received += part.num_rows
            duplicates += self.buffer.add(part)
        self.watermark_ms = max(self.watermark_ms, watermark_ms)
        released = self.buffer.release(self.watermark_ms)
        limit = self.settings.micro_batch_max_events
        if self.decider is not None:  # bounded trigger-to-decision time
            limit = min(limit, self.settings.decision_step_max_events)
        parts = release_parts(released, limit)
        result = _merge(
            [
                self._step(part, horizon)
                for part, horizon in zip(parts, self._horizons(parts), strict=True)
            ]
        )
        result.received = received
        result.duplicates = duplicates
        result.pending = self.buffer.pending_rows
        self.counters["received"] += received
        self.counters["duplicates"] += duplicates
        self.counters["applied"] += result.applied
        self.counters["failed"] += result.failed.num_rows
        self.counters["triggers"] += result.triggers.num_rows
        self.recent_triggers.add(result.triggers)
        self._count_decisions(result.decisions)
        return result

    def _count_decisions(self, decisions: pa.Table) -> None:
        self.counters["decisions"] += decisions.num_rows
        if decisions.num_rows:
            delivered = decisions.column("delivered").to_numpy(zero_copy_only=False)
            self.counters["delivered"] += int(delivered.sum())
        self.recent_decisions.add(decisions)

    def decide_inbound(
        self,
        customer_keys: np.ndarray,
        channels: Sequence[str],
        ts_ms: np.ndarray,
        request_ids: np.ndarray,
        pages: Sequence[str | None] | None = None,
        logged: bool = False,
    ) -> pa.Table:
        """Decide now for customers who ask, each on a channel (web, app, call center).

        Each request is seen as an event at its ``ts_ms`` (a page view, with its page) over the
        customer's current golden record, which it does not change; only the contact it may
        cause is recorded. ``request_ids`` make the decision ids. A request whose decision is
        still in the recent-decisions window (a client retrying after a lost answer or a 503)
        gets that decision again, and no second contact. Returns the decision-log rows in
        request order.

        ``logged``: the caller writes the decisions to the ingest log before answering, and the
        log's reader hands them to ``record_inbound``, which then skips them here (their
        contacts are already recorded) and records them after a restore (they are not).
        """
        if self.decider is None:
            raise EngineError("no offer catalog is set: inbound decisions are off")
        request_ids = np.asarray(request_ids, dtype=np.uint64)
        ids = decision_ids(request_ids, np.full(request_ids.size, INBOUND, dtype=object))
        known = self.recent_decisions.holding("decision_id", np.unique(ids))
        if known.num_rows == 0:
            return self._decide_new(customer_keys, channels, ts_ms, request_ids, pages, logged)
        newest = {int(d): i for i, d in enumerate(known.column("decision_id").to_pylist())}
        again = np.array([int(d) in newest for d in ids.tolist()], dtype=bool)
        fresh = np.flatnonzero(~again)
        answered = known.take(pa.array([newest[int(d)] for d in ids[again].tolist()]))
        if fresh.size:
            decided = self._decide_new(
                np.asarray(customer_keys, dtype=np.uint64)[fresh],
                [channels[i] for i in fresh.tolist()],
                np.asarray(ts_ms, dtype=np.int64)[fresh],
                request_ids[fresh],
                None if pages is None else [pages[i] for i in fresh.tolist()],
                logged,
            )
            answered = pa.concat_tables([answered, decided.cast(answered.schema)])
        back = np.empty(ids.size, dtype=np.int64)
        back[np.concatenate([np.flatnonzero(again), fresh])] = np.arange(ids.size)
        return answered.take(pa.array(back))

    def _decide_new(
        self,
        customer_keys: np.ndarray,
        channels: Sequence[str],
        ts_ms: np.ndarray,
        request_ids: np.ndarray,
        pages: Sequence[str | None] | None,
        logged: bool,
    ) -> pa.Table:
        """``decide_inbound`` for requests not decided before."""
        if self.decider is None:
            raise EngineError("no offer catalog is set: inbound decisions are off")
        keys = np.asarray(customer_keys, dtype=np.uint64)
        unknown = sorted(set(channels) - set(CHANNELS))
        if unknown:
            raise EngineError(f"unknown channel(s) {unknown}; known: {', '.join(CHANNELS)}")
        channel_ix = np.array([CHANNELS.index(c) for c in channels], dtype=np.int8)
        ts = np.asarray(ts_ms, dtype=np.int64)
        if ts.size and not (time_in_range(int(ts.min())) and time_in_range(int(ts.max()))):
            raise EngineError(f"an inbound decision's time is outside {TS_RANGE_TEXT}")
        known = self.store.lookup(keys) >= 0
        if known.all():
            decisions = self._decide_on(self.store, self.decider, keys, channel_ix, ts,
                                        request_ids, pages)  # fmt: skip
        else:
            decisions = self._decide_split(known, keys, channel_ix, ts, request_ids, pages)
        self._count_decisions(decisions)
        if logged:
            self._await_log(decisions)
        return decisions

    def _decide_split(
        self,
        known: np.ndarray,
        keys: np.ndarray,
        channel_ix: np.ndarray,
        ts: np.ndarray,
        request_ids: np.ndarray,
        pages: Sequence[str | None] | None,
    ) -> pa.Table:
        """Customers never seen are decided for as new ones, over a scratch store that is
        thrown away: asking creates no golden record (so neither the shard's memory nor any
        answer tells whether an identifier is known), and their contacts are not kept."""
        assert self.decider is not None
        scratch = CustomerStore()
        scratch.ensure_rules(list(self.store.rule_state))
        d = self.decider
        parts, where = [], []
        for store, decider, sel in (
            (self.store, d, np.flatnonzero(known)),
            (
                scratch,
                Decider(d.catalog, d.scorer, scratch, d.spec, d.outbound),
                np.flatnonzero(~known),
            ),
        ):
            if sel.size:
                picked = None if pages is None else [pages[i] for i in sel.tolist()]
                parts.append(self._decide_on(store, decider, keys[sel], channel_ix[sel], ts[sel],
                                             np.asarray(request_ids)[sel], picked))  # fmt: skip
                where.append(sel)
        table = pa.concat_tables(parts)
        back = np.empty(keys.size, dtype=np.int64)
        back[np.concatenate(where)] = np.arange(keys.size)
        return table.take(pa.array(back))

    def _decide_on(
        self,
        store: CustomerStore,
        decider: Decider,
        keys: np.ndarray,
        channel_ix: np.ndarray,
        ts: np.ndarray,
        request_ids: np.ndarray,
        pages: Sequence[str | None] | None,
    ) -> pa.Table:
        """Inbound decisions over ``store``'s records, in request order."""
        n = keys.size
        slots = store.slots_for(keys)
        order = sort_order(slots, ts)  # a view is in (customer, time) order
        columns = {
            "event_id": pa.array(np.asarray(request_ids, dtype=np.uint64), type=pa.uint64()),
            "customer_key": pa.array(keys, type=pa.uint64()),
            "key_group": pa.array(np.full(n, self.key_range[0]), type=pa.uint16()),
            "seq": pa.array(np.zeros(n, dtype=np.uint64), type=pa.uint64()),
            "kind": pa.array(np.full(n, int(EventKind.PAGE_VIEW)), type=pa.int8()),
            "ts": pa.array(ts, type=pa.int64()).cast(TS_TYPE),
            "page": pa.array(list(pages or [None] * n), type=ROUTED_SCHEMA.field("page").type),
        }
        view = BatchView(
            pa.Table.from_pydict(columns),
            order,
            slots[order],
            store,
            self.rules.windows,
            self.reference,
        )
        decisions = decider.decide_inbound(view, channel_ix[order])
        back = np.empty(n, dtype=np.int64)
        back[order] = np.arange(n)
        return decisions.take(pa.array(back))

    def _await_log(self, decisions: pa.Table) -> None:
        ids = decisions.column("decision_id").to_numpy()
        ts = decisions.column("ts").cast(pa.int64()).to_numpy()
        self.inbound_live.update(zip(ids.tolist(), ts.tolist(), strict=True))
        if len(self.inbound_live) > MAX_INBOUND_AWAITED:  # records that never came (a failed
            # publish answered 503): forget the oldest half
            newest = sorted(self.inbound_live.items(), key=lambda kv: kv[1])
            self.inbound_live = dict(newest[len(newest) // 2 :])

    def record_inbound(self, decisions: pa.Table) -> pa.Table:
        """Inbound decisions read back from the ingest log (see ``decide_inbound``). Those
        decided by this shard since its last restore are only forgotten here (their contacts
        are recorded); the others (a restore went back behind them) have their deliveries
        recorded in the contact state and count as this shard's decisions; a copy read before
        (a retried request, published again) is skipped. Returns the rows the decision log
        has not had: all but the copies."""
        decisions = conform_decisions(decisions)  # a message an older version wrote
        ids = decisions.column("decision_id").to_numpy()
        live = np.array(
            [self.inbound_live.pop(int(i), None) is not None for i in ids.tolist()], dtype=bool
        )
        _, first = np.unique(ids, return_index=True)
        copy = np.ones(ids.size, dtype=bool)
        copy[first] = False  # twice in this stretch
        if not live.all():
            seen = self.recent_decisions.holding("decision_id", np.unique(ids[~live]))
            copy |= ~live & np.isin(ids, seen.column("decision_id").to_numpy())
        replay = decisions.filter(pa.array(~live & ~copy))
        if replay.num_rows and self.decider is not None:
            delivered = replay.filter(replay.column("delivered"))
            # as when it was decided: a customer never seen gets no record from asking
            seen = self.store.lookup(delivered.column("customer_key").to_numpy().astype(np.uint64))
            delivered = delivered.filter(pa.array(seen >= 0))
            keys = delivered.column("customer_key").to_numpy().astype(np.uint64)
            self.decider.record_contacts(
                self.store.slots_for(keys),
                delivered.column("ts").cast(pa.int64()).to_numpy(),
                delivered.column("action").to_pylist(),
            )
        if replay.num_rows:
            self._count_decisions(replay)
        return decisions.filter(pa.array(~copy)) if copy.any() else decisions

    def end_stream(self) -> ApplyResult:
        """Release and apply every pending event (the stream has ended)."""
        return self.apply(None, END_OF_STREAM)

    def _horizons(self, parts: list[Released]) -> list[int]:
        """Up to when each part may fire deadlines: just before the next part's first event,
        and for the last, just before the watermark (an event at the watermark is not late,
        and may still come)."""
        firsts = [
            int(np.asarray(p.table.column("ts").cast(pa.int64()).to_numpy())[p.rows].min())
            for p in parts[1:]
        ]
        return [t - 1 for t in firsts] + [self.watermark_ms - 1]

    def _step(self, released: Released, horizon: int) -> ApplyResult:
        """Apply one step; if it fails, its events are returned as dead letters with the error
        instead of being lost (they were acknowledged upstream), and the shard goes on.

        Bad events never get here (validation dead-letters them at ingest, and a rule or
        catalog that validates runs on representative events); this is the last line. The
        rules' state is written only after the step's decisions and golden-record write-back,
        so a failing step leaves it as it was.
        """
        try:
            return self._process(released, horizon)
        except Exception as exc:  # any failure of one step: keep its events, keep the shard
            return ApplyResult(empty_triggers(), failed=failed_letters(released, exc))

    def _process(self, released: Released, horizon: int) -> ApplyResult:
        patterns = [r for r in self.rules.rules if r.pattern is not None]
        if released.num_rows == 0 and not any(self._due(r, horizon) for r in patterns):
            return ApplyResult(empty_triggers())
        rows = released.rows
        table = released.table
        keys = np.asarray(table.column("customer_key").to_numpy())[rows]
        slots = self.store.slots_for(keys)
        ts = np.asarray(table.column("ts").cast(pa.int64()).to_numpy())[rows]
        order = sort_order(slots, ts)
        view = BatchView(
            table, rows[order], slots[order], self.store, self.rules.windows, self.reference
        )
        matches = [(rule, match_pattern(rule, view, self.store, horizon)) for rule in patterns]
        view, matched = with_timer_rows(view, matches, self.store)
        tables = []
        counts: dict[str, int] = {}
        fired: list[tuple[str, np.ndarray]] = []
        marks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # written last
        for rule in self.rules.rules:
            if rule.window is not None:  # read by other rules; fires nothing
                continue
            if rule.pattern is not None:
                fired_rows = matched[rule.id]
                if rule.when is not None and fired_rows.size:  # a filter on found matches
                    fired_rows = fired_rows[rule.when.evaluate(RowsView(view, fired_rows))]
            else:
                fired_rows = self._fire(rule, view, marks)
            counts[rule.id] = int(fired_rows.size)
            if fired_rows.size == 0:
                continue
            fired.append((rule.id, fired_rows))
            fired_ctx = RowsView(view, fired_rows)
            values = {name: e.evaluate(fired_ctx) for name, e in rule.emit.items()}
            tables.append(
                trigger_table(
                    rule.id,
                    view.gather("customer_key")[fired_rows],
                    view.gather("event_id")[fired_rows],
                    view.gather("seq")[fired_rows],
                    view.ts[fired_rows],
                    values,
                )
            )
        started = time.perf_counter()
        decisions = self.decider.decide(view, fired) if self.decider else empty_decisions()
        decide_ms = (time.perf_counter() - started) * 1000
        view.write_back()
        for state, slots, mark in marks:
            state[slots] = mark
        for rule, match in matches:
            for key, values in zip(rule.state_keys, match.write_values, strict=True):
                self.store.rule_state[key][match.write_slots] = values
        triggers = pa.concat_tables(tables) if tables else empty_triggers()
        return ApplyResult(
            triggers,
            decisions,
            applied=released.num_rows,
            decide_ms=decide_ms,
            decide_ms_parts=[decide_ms] if decisions.num_rows else [],
            triggers_by_rule=counts,
        )

    def _due(self, rule: CompiledRule, horizon: int) -> bool:
        """Whether a deadline of pattern ``rule`` is due by ``horizon``."""
        deadline = self.store.rule_state[rule.state_keys[-1]][: self.store.size]
        return bool(((deadline != NEVER) & (deadline <= horizon)).any())

    def _fire(
        self, rule: Any, view: BatchView, marks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> np.ndarray:
        """The view rows where ``rule`` fires; what its state becomes goes to ``marks``."""
        rows = candidates(rule, view)
        if rows.size == 0:
            return rows
        state = self.store.rule_state[rule.state_key]
        if rule.type == "threshold":
            period = period_of(rule, view)
            fired = rows[once_per_period(rows, view.slot, period, state)]
            mark = period[fired]
        else:
            fired = rows[cooldown(rows, view.slot, view.ts, state, rule.cooldown_ms)]
            mark = view.ts[fired]
        if fired.size:
            # fired rows are sorted by customer then time: keep each customer's last
            last = np.ones(fired.size, dtype=bool)
            last[:-1] = view.slot[fired[1:]] != view.slot[fired[:-1]]
            marks.append((state, view.slot[fired[last]], mark[last]))
        return fired

    # -- snapshots ----------------------------------------------------------------------------
    def snapshot(self, detached: bool = False) -> ShardSnapshot:
        """Everything this shard holds, as a value (call between micro-batches). The golden
        records share the store's memory unless ``detached`` (a copy: the value then stays as
        it is while later steps run, for an asynchronous checkpoint); the other tables are
        immutable Arrow data either way."""
        pending, seen = self.buffer.to_arrow()
        return ShardSnapshot(
            shard_id=self.shard_id,
            key_range=self.key_range,
            watermark_ms=self.watermark_ms,
            counters=dict(self.counters),
            customers=self.store.to_arrow(copy=detached),
            pending=pending,
            seen=seen,
            recent_triggers=self.recent_triggers.to_table(),
            recent_decisions=self.recent_decisions.to_table(),
            inbound=tuple(self.inbound_live),
            reference_version=self.reference.version,
        )

    def restore(self, snapshot: ShardSnapshot) -> None:
        """Replace this shard's state with ``snapshot``'s; rules, catalog and scorer stay.

        Refuses a snapshot of other key groups. Rule and decision state of rules and offers
        that are no longer configured is dropped, of new ones started fresh (as on a swap).
        """
        snapshot.check_owner(self.key_range)
        store = CustomerStore.from_arrow(snapshot.customers)
        store.ensure_rules(self.rules.state_keys)
        buffer = EventBuffer.from_arrow(
            self.settings.dedupe_window_ms, snapshot.pending, snapshot.seen
        )
        self.store, self.buffer = store, buffer
        self.watermark_ms = snapshot.watermark_ms
        self.counters = {**dict.fromkeys(self.counters, 0), **snapshot.counters}
        self.recent_triggers = Recent.from_table(snapshot.recent_triggers.cast(TRIGGER_SCHEMA))
        self.recent_decisions = Recent.from_table(conform_decisions(snapshot.recent_decisions))
        self.inbound_live = dict.fromkeys(snapshot.inbound, self.watermark_ms)
        if self.decider is not None:  # the decider reads and writes the new store
            self.decider = Decider(self.decider.catalog, self.decider.scorer, self.store)

    # -- reading state ------------------------------------------------------------------------
    def customer(self, customer_key: int) -> dict[str, Any] | None:
        """One golden record as plain values, or None if the shard has never seen the customer."""
        slot = int(self.store.lookup(np.array([customer_key], dtype=np.uint64))[0])
        if slot < 0:
            return None
        record: dict[str, Any] = {"customer_key": customer_key}
        for name, arr in self.store.cols.items():
            value = arr[slot].item()
            if name in ("tz", "device_model"):
                value = self.store.strings.values[value] or None
            elif name == "channels":
                value = [c for i, c in enumerate(CHANNELS) if int(value) >> i & 1]
            elif (isinstance(value, float) and np.isnan(value)) or (
                name == "last_event_ms" and value == COLUMNS[name].default
            ):
                value = None
            record[name] = value
        record["rules"] = {
            key: (None if arr[slot] == NEVER else int(arr[slot]))
            for key, arr in self.store.rule_state.items()
        }
        record["contacts"] = {
            key: (None if arr[slot] == NEVER else int(arr[slot]))
            for key, arr in self.store.decision_state.items()
        }
        triggers = self.recent_triggers.of(
            customer_key, ["rule_id", "ts", "event_id", "values"], RECENT_PER_CUSTOMER
        )
        for t in triggers:
            t["values"] = dict(t["values"] or [])
        record["recent_triggers"] = triggers
        decisions = self.recent_decisions.of(
            customer_key,
            ["decision_id", "ts", "rule_id", "action", "channel", "reason", "delivered",
             "control", "model_version"],
            RECENT_PER_CUSTOMER,
        )  # fmt: skip
        for d in decisions:
            d["decision_id"] = decision_id_text(np.array([d["decision_id"]], dtype=np.uint64))[0]
        record["recent_decisions"] = decisions
        return record

    @property
    def customers(self) -> int:
        return self.store.size
