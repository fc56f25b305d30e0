"""Pattern rules: what compiles (and what is refused, by name), Flink's examples, timers.

Flink's CEP examples (``NotPatternITCase``, ``AfterMatchSkipITCase``) that this subset supports
are rewritten here with the events as Kairos kinds: a = cart_add, b = checkout, c = page_view,
d = purchase, e = location; Flink's list order is the event time order (1 ms apart unless the
example gives times). Flink reports every match; Kairos fires once per completing event (and
once per moment with skip past_last_event), so a Flink result is the set of its last events.
Not rewritten: examples with next/notNext (strict contiguity), oneOrMore, times ranges, an
optional last step, and skip-to-first/last strategies, which this subset refuses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine.config import EngineSettings
from engine.errors import RuleError
from engine.local import LocalEngine
from engine.rules.spec import parse_rules, parse_rules_text
from engine.shard import ShardLogic
from engine.state.store import NEVER
from engine.testing import EventFactory

T0 = 1_772_323_200_000  # 2026-03-01
KINDS = {"a": "cart_add", "b": "checkout", "c": "page_view", "d": "purchase", "e": "location"}
FIELDS: dict[str, dict[str, Any]] = {
    "cart_add": {"item": "sku", "amount": 1.0},
    "page_view": {"page": "home"},
    "purchase": {"amount": 5.0},
    "location": {"lat": 1.0, "lon": 1.0},
}


def step(link: str, name: str, letter: str, **more: Any) -> dict[str, Any]:
    return {link: name, "on": KINDS[letter], **more}


def fires(steps: list[dict[str, Any]], events: list[tuple[str, int]], **rule: Any) -> list[int]:
    """Times (ms after T0) at which the pattern fires over ``events`` (letter, ms after T0)."""
    rules = parse_rules({"rules": [{"id": "p", "type": "pattern", "pattern": steps, **rule}]})
    engine = LocalEngine(EngineSettings(shards=1, allowed_lateness_s=60), rules)
    rows = []
    for i, (letter, t) in enumerate(events):
        kind = KINDS[letter]
        rows.append({"event_id": i + 1, "customer_id": "c", "kind": kind, "ts": T0 + t,
                     **FIELDS.get(kind, {})})  # fmt: skip
    assert engine.submit_rows(rows) == []
    engine.end_stream()
    ts = engine.trigger_table().column("ts").cast("int64").to_pylist()
    return sorted(t - T0 for t in ts)


def in_order(letters: str) -> list[tuple[str, int]]:
    """Flink's list order as event times 1, 2, 3, ... ms."""
    return [(letter, i + 1) for i, letter in enumerate(letters)]


# -- Flink's NotPatternITCase ---------------------------------------------------------------
def test_not_followed_by() -> None:
    """testNotFollowedBy: a, not b, c, d over a1 c1 b1 c2 d: one match, (a1 c1 d)."""
    steps = [step("begin", "a", "a"), step("not_followed_by", "nb", "b"),
             step("followed_by", "c", "c"), step("followed_by", "d", "d")]  # fmt: skip
    assert fires(steps, in_order("acbcd"), skip="no_skip") == [5]


def test_not_followed_by_before_optional() -> None:
    """testNotFollowedByBeforeOptional: a, not b, c optional, d over a1 c1 b1 c2 d: (a1 c1 d)
    only: skipping c, b1 is between a1 and d."""
    steps = [step("begin", "a", "a"), step("not_followed_by", "nb", "b"),
             step("followed_by", "c", "c", optional=True),
             step("followed_by", "d", "d")]  # fmt: skip
    assert fires(steps, in_order("acbcd"), skip="no_skip") == [5]
    # without c1 nothing fits: b1 comes between a1 and every later c or the d
    assert fires(steps, in_order("abcd"), skip="no_skip") == []


def test_not_followed_by_with_branching_at_start() -> None:
    """testNotFollowedByWithBranchingAtStart: a1 b1 c1 a2 c2 d: (a2 c2 d)."""
    steps = [step("begin", "a", "a"), step("not_followed_by", "nb", "b"),
             step("followed_by", "c", "c"), step("followed_by", "d", "d")]  # fmt: skip
    assert fires(steps, in_order("abcacd"), skip="no_skip") == [6]


def test_not_followed_by_within_at_end() -> None:
    """testNotFollowedByWithinAtEnd: a, not b within 3 ms over a1@1 b1@2 a2@4 c@5 b2@10 a3@11
    b3@13: only a2 matches, completing at its deadline, 7."""
    steps = [step("begin", "a", "a"), step("not_followed_by", "nb", "b", within="3ms")]
    events = [("a", 1), ("b", 2), ("a", 4), ("c", 5), ("b", 10), ("a", 11), ("b", 13)]
    assert fires(steps, events) == [7]


def test_ignore_state_of_times_with_not_followed_by() -> None:
    """testIgnoreStateOfTimesWithNotFollowedBy: a, not b, c times 2 optional, d over
    a1 d1 e b1 c1 c2 d2: (a1 d1) only; b1 ends every partial match waiting for c or d."""
    steps = [step("begin", "a", "a"), step("not_followed_by", "nb", "b"),
             step("followed_by", "c", "c", times=2, optional=True),
             step("followed_by", "d", "d")]  # fmt: skip
    assert fires(steps, in_order("adebccd"), skip="no_skip") == [2]


def test_not_followed_by_before_optional_times() -> None:
    """testNotFollowedByBeforeOptionalTimes: a, not b, c times 2 optional, d over
    a1 c1 b1 c2 d: (a1 c1 c2 d); the absence before c guards until c's first event."""
    steps = [step("begin", "a", "a"), step("not_followed_by", "nb", "b"),
             step("followed_by", "c", "c", times=2, optional=True),
             step("followed_by", "d", "d")]  # fmt: skip
    assert fires(steps, in_order("acbcd"), skip="no_skip") == [5]


@pytest.mark.parametrize(("letters", "want"), [("abcbd", []), ("adebbcd", [])])
def test_times_with_not_followed_by(letters: str, want: list[int]) -> None:
    """testTimesWithNotFollowedBy and ...After: a, b times 2, not c, d: a c between the b's, or
    after them, ends the match (the absence guards from the step's first event on)."""
    steps = [step("begin", "a", "a"), step("followed_by", "b", "b", times=2),
             step("not_followed_by", "nc", "c"), step("followed_by", "d", "d")]  # fmt: skip
    assert fires(steps, in_order(letters), skip="no_skip") == want
    assert fires(steps, in_order("abbd"), skip="no_skip") == [4]


# -- Flink's AfterMatchSkipITCase -----------------------------------------------------------
def test_skip_past_last_event_and_no_skip() -> None:
    """testSkipPastLast: a times 3 over six a's: (a1 a2 a3), (a4 a5 a6); testNoSkip: every
    window of three, completing at a3, a4, a5, a6."""
    steps = [step("begin", "a", "a", times=3)]
    assert fires(steps, in_order("aaaaaa")) == [3, 6]
    assert fires(steps, in_order("aaaaaa"), skip="no_skip") == [3, 4, 5, 6]


def test_skip_past_last_event_drops_partial_matches() -> None:
    """testSkipPastLast2: a, b, c, d over a1 a2 b1 b2 c1 c2 d1 d2: one match, at d1."""
    steps = [step("begin", "a", "a"), step("followed_by", "b", "b"),
             step("followed_by", "c", "c"), step("followed_by", "d", "d")]  # fmt: skip
    events = [*in_order("aabbcc"), ("d", 7), ("d", 7)]
    assert fires(steps, events) == [7]


# -- what compiles --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "extra", "words"),
    [
        ([step("begin", "a", "a"), step("next", "b", "b")], {}, "'next' (strict contiguity)"),
        ([step("begin", "a", "a"), step("not_next", "b", "b")], {}, "'not_next'"),
        ([step("begin", "a", "a"), step("followed_by", "b", "b", times=[1, 3])], {},
         "a range of times is not compiled"),
        ([step("begin", "a", "a"), step("not_followed_by", "b", "b")], {},
         "needs 'within'"),
        ([step("begin", "a", "a"), step("not_followed_by", "b", "b", within="1m"),
          step("followed_by", "c", "c")], {}, "'within' on a not_followed_by between steps"),
        ([step("begin", "a", "a"), step("not_followed_by", "b", "b", within="1m")],
         {"skip": "no_skip"}, "no_skip with a not_followed_by at the end"),
        ([step("begin", "a", "a", optional=True), step("followed_by", "b", "b")], {},
         "first and the last positive step cannot be optional"),
        ([step("begin", "a", "a"), step("followed_by", "b", "b", optional=True)], {},
         "first and the last positive step cannot be optional"),
        ([step("begin", "a", "a"), step("begin", "b", "b")], {}, "only it, is 'begin'"),
        ([step("followed_by", "a", "a")], {}, "only it, is 'begin'"),
        ([step("begin", "a", "a", times=17)], {}, "times must be a whole number from 1 to 16"),
        ([step("begin", "a", "a", times=16), step("followed_by", "b", "b", times=16)], {},
         "compiles to 32 registers per customer; at most 24"),
    ],
)  # fmt: skip
def test_what_does_not_compile_is_refused_naming_the_rule_step_and_construct(
    steps: list[dict[str, Any]], extra: dict[str, Any], words: str
) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules(
            {"rules": [{"id": "shop_moment", "type": "pattern", "pattern": steps, **extra}]}
        )
    assert "rule 'shop_moment'" in str(info.value)
    assert words in str(info.value)


def test_a_step_names_its_link_once() -> None:
    with pytest.raises(RuleError, match="exactly one of begin, followed_by or not_followed_by"):
        parse_rules_text("""
rules:
  - id: p
    type: pattern
    pattern:
      - {begin: a, followed_by: b, on: cart_add}
""")


CART = """
rules:
  - id: cart_abandoned
    type: pattern
    pattern:
      - {begin: added, on: cart_add}
      - {not_followed_by: paid, on: checkout, within: 30m}
    emit: {items: cart_items}
"""


def test_a_pattern_is_explained_in_words_with_its_state_size() -> None:
    rule = parse_rules_text(CART).rules[0]
    assert rule.pattern is not None
    assert rule.pattern.words.startswith("a cart_add (added), then no checkout within 30m")
    assert "2 registers (16 bytes) per customer" in rule.pattern.words
    assert len(rule.state_keys) == 2


# -- timers in a shard ------------------------------------------------------------------------
MIN = 60_000
HOUR = 60 * MIN


def _shard() -> ShardLogic:
    return ShardLogic(0, EngineSettings(shards=1, allowed_lateness_s=0), parse_rules_text(CART))


def _routed(event: EventFactory, rows: list[tuple[str, str, int]]) -> Any:
    from engine.events.codec import rows_to_batch
    from engine.ingest import Ingestor

    batch, _, _ = rows_to_batch([event(k, c, T0 + t, **FIELDS.get(k, {})) for k, c, t in rows])
    return Ingestor(EngineSettings(shards=1, allowed_lateness_s=3600)).ingest(batch).parts[0]


def test_a_deadline_fires_when_the_watermark_passes_it_never_before(event: EventFactory) -> None:
    shard = _shard()
    added = _routed(event, [("cart_add", "c1", 0)])
    assert shard.apply(added, T0).triggers.num_rows == 0
    # the watermark at the deadline: an event of that time may still come; not yet
    assert shard.apply(None, T0 + 30 * MIN).triggers.num_rows == 0
    fired = shard.apply(None, T0 + 30 * MIN + 1).triggers
    assert fired.num_rows == 1
    assert fired.column("ts").cast("int64").to_pylist() == [T0 + 30 * MIN]
    assert shard.apply(None, T0 + 90 * MIN).triggers.num_rows == 0  # once


def test_a_deadline_due_inside_a_micro_batch_fires_in_its_output(event: EventFactory) -> None:
    shard = _shard()
    batch = _routed(event, [("cart_add", "c1", 0), ("page_view", "c1", 10 * MIN),
                            ("page_view", "c1", 45 * MIN)])  # fmt: skip
    result = shard.apply(batch, T0 + 45 * MIN)
    assert result.triggers.column("ts").cast("int64").to_pylist() == [T0 + 30 * MIN]
    assert dict(result.triggers.column("values")[0].as_py())["items"] == 1


def test_an_event_at_the_deadline_comes_before_it(event: EventFactory) -> None:
    """A checkout at exactly the deadline is within the 30 minutes: no trigger."""
    shard = _shard()
    batch = _routed(event, [("cart_add", "c1", 0), ("checkout", "c1", 30 * MIN)])
    assert shard.apply(batch, T0 + 60 * MIN).triggers.num_rows == 0


def test_fired_and_expired_partial_matches_leave_no_state(event: EventFactory) -> None:
    rules = parse_rules_text(
        """
rules:
  - id: three_views
    type: pattern
    pattern:
      - {begin: viewed, on: page_view, times: 3}
    within: 1h
"""
        + CART.split("rules:\n", 1)[1]
    )
    shard = ShardLogic(0, EngineSettings(shards=1, allowed_lateness_s=0), rules)
    batch = _routed(event, [("cart_add", "c1", 0), ("page_view", "c2", 0),
                            ("page_view", "c2", MIN)])  # fmt: skip
    shard.apply(batch, T0 + MIN)
    state = shard.store.rule_state
    assert any((state[k][: shard.store.size] != NEVER).any() for k in rules.state_keys)
    result = shard.apply(None, T0 + 2 * 3_600_000)
    assert result.triggers.column("rule_id").to_pylist() == ["cart_abandoned"]
    for key in rules.state_keys:
        assert (state[key][: shard.store.size] == NEVER).all(), key


def test_a_deadline_row_is_not_an_event_of_the_golden_record(event: EventFactory) -> None:
    shard = _shard()
    shard.apply(_routed(event, [("cart_add", "c1", 0)]), T0)
    shard.apply(None, T0 + 31 * MIN)
    key = int(np.asarray(shard.store.keys[:1])[0])
    record = shard.customer(key)
    assert record is not None
    assert record["event_count"] == 1
    assert record["last_event_ms"] == T0
    assert [t["rule_id"] for t in record["recent_triggers"]] == ["cart_abandoned"]


def test_a_late_event_is_dead_lettered_naming_the_rules_that_could_not_see_it() -> None:
    rules = parse_rules_text(CART)
    engine = LocalEngine(EngineSettings(shards=1, allowed_lateness_s=60), rules)
    fresh = {"event_id": 1, "customer_id": "c", "kind": "page_view", "ts": T0 + 10 * MIN,
             "page": "home"}  # fmt: skip
    late = {"event_id": 2, "customer_id": "c", "kind": "checkout", "ts": T0}
    letters = engine.submit_rows([fresh, late])
    assert [letter.reason.split(":")[0] for letter in letters] == ["late"]
    assert letters[0].reason.endswith("rules that could not see it: cart_abandoned")


@pytest.mark.parametrize(
    ("window", "words"),
    [
        ({"on": "usage", "session": "1h", "tumbling": "day"}, "exactly one of session"),
        ({"on": "usage", "sliding": "1h"}, "needs 'every'"),
        ({"on": "usage", "sliding": "1h", "every": "7m"}, "a whole number of buckets"),
        ({"on": "usage", "sliding": "10h", "every": "1m"}, "a whole number of buckets, 1 to 60"),
        ({"on": "usage", "session": "1h", "emit": {"x": "mb"}}, "it emits nothing"),
        ({"on": "usage", "tumbling": "fortnight"}, "is not a duration"),
        ({"on": "usage", "tumbling": "0s"}, "longer than 0"),
        ({"on": "usage", "session": "1h", "sum": "item"}, "field 'sum'"),
        ({"on": "usage", "sliding": "1h", "every": "day"}, "'sliding' is a number of them"),
        ({"on": "usage", "sliding": 61, "every": "billing_cycle"}, "1 to 60"),
        ({"on": "usage", "session": "1h", "distinct": True}, "'distinct' counts the buckets"),
        ({"on": "usage", "sliding": 3, "every": "day", "sum": "mb", "distinct": True}, "no 'sum'"),
    ],
)
def test_a_window_that_cannot_work_is_refused(window: dict[str, Any], words: str) -> None:
    with pytest.raises(RuleError, match=words):
        parse_rules({"rules": [{"id": "w", "type": "window", **window}]})


def test_a_window_is_read_by_name_and_may_not_hide_a_known_name() -> None:
    rules = parse_rules_text("""
rules:
  - {id: views, type: window, on: page_view, session: 30m}
  - {id: busy_cart, type: condition, on: cart_add, when: views >= 3}
""")
    assert [r.id for r in rules.rules] == ["views", "busy_cart"]
    assert "views" in rules.rules[1].names
    with pytest.raises(RuleError, match="must not be a known name"):
        parse_rules_text("rules:\n  - {id: cart_items, type: window, on: cart_add, session: 1h}")
    with pytest.raises(RuleError, match="unknown name 'viewz'"):
        parse_rules_text("""
rules:
  - {id: views, type: window, on: page_view, session: 30m}
  - {id: busy_cart, type: condition, on: cart_add, when: viewz >= 3}
""")


def test_a_calendar_bucket_never_goes_back_however_the_stream_is_cut() -> None:
    """A customer moving from UTC+14 to UTC-11 goes back a local day: the window's bucket stays
    at the newest day seen (in the same micro-batch or an earlier one), so the second heavy day
    is the same bucket, counted once, for micro-batches of 1 event as for one of all."""
    rules = parse_rules_text("""
rules:
  - {id: heavy_days, type: window, on: usage, when: mb > 100, sliding: 3, every: day,
     distinct: true}
  - {id: read, type: condition, on: usage, when: 1 == 1, emit: {days: heavy_days}}
""")
    rows = [
        {"event_id": 1, "customer_id": "c", "kind": "profile_update", "ts": T0 + 11 * HOUR,
         "tz": "Pacific/Kiritimati"},
        {"event_id": 2, "customer_id": "c", "kind": "usage", "ts": T0 + 11 * HOUR, "mb": 500.0},
        {"event_id": 3, "customer_id": "c", "kind": "profile_update", "ts": T0 + 12 * HOUR,
         "tz": "Pacific/Pago_Pago"},
        {"event_id": 4, "customer_id": "c", "kind": "usage", "ts": T0 + 12 * HOUR, "mb": 500.0},
    ]  # fmt: skip
    got = []
    for size in (1, len(rows)):
        engine = LocalEngine(EngineSettings(shards=1, allowed_lateness_s=60), rules)
        for start in range(0, len(rows), size):
            assert engine.submit_rows(rows[start : start + size]) == []
        engine.end_stream()
        got.append([dict(t["values"])["days"] for t in engine.trigger_table().to_pylist()])
    assert got == [[1.0, 1.0], [1.0, 1.0]]


def _grown_by_sorting(view, matches, store):
    """The obvious way (the engine's before the merge): every deadline row in (time, slot)
    order rule by rule, appended, and the whole sorted again, stably, by (slot, time)."""
    from engine.rules.timers import timer_event_ids

    timed = [(rule, m) for rule, m in matches if m.timers.any()]
    slots, ts = [], []
    for _, m in timed:
        t = np.flatnonzero(m.timers)
        order = np.lexsort((m.slots[t], m.ts[t]))
        slots.append(m.slots[t][order])
        ts.append(m.ts[t][order])
    t_slots, t_ts = np.concatenate(slots), np.concatenate(ts)
    all_slots = np.concatenate([view.slot, t_slots])
    all_ts = np.concatenate([view.ts, t_ts])
    order = np.lexsort((all_ts, all_slots))  # stable: events, then deadlines as appended
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    fired, next_timer = {}, view.size
    for rule, m in matches:
        count = int(m.timers.sum())
        fired[rule.id] = np.concatenate(
            [position[m.rows[m.rows >= 0]], position[next_timer : next_timer + count]]
        )
        next_timer += count
    ids = [timer_event_ids(store.keys[s], t, rule.id)
           for (rule, _), s, t in zip(timed, slots, ts, strict=True)]  # fmt: skip
    return all_slots[order], all_ts[order], fired, np.concatenate(ids)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("span", [60_000, 2**61])  # packed keys, and the sort beyond them
def test_deadline_rows_merged_into_the_view_equal_sorting_everything_again(
    seed: int, span: int
) -> None:
    """Deadline rows of several rules, in any order the matcher gives, some at the time of an
    event of theirs: the merged view and each rule's fired rows (events, then deadlines in
    (time, slot) order) equal appending and sorting everything."""
    import pyarrow as pa

    from engine.events.schema import ROUTED_SCHEMA, TIMER_KIND, TS_TYPE
    from engine.rules.matcher import PatternResult
    from engine.rules.timers import with_timer_rows
    from engine.state.store import CustomerStore
    from engine.state.view import BatchView, sort_order

    rng = np.random.default_rng(seed)
    customers, n = 50, int(rng.integers(0, 300))
    store = CustomerStore(capacity=customers)
    store.slots_for(rng.permutation(np.arange(1, customers + 1, dtype=np.uint64)))
    step = max(span // 40, 1)
    ev_slots = rng.integers(0, customers, n)
    ev_ts = T0 + rng.integers(0, 40, n) * step
    columns = {f.name: pa.nulls(n, f.type) for f in ROUTED_SCHEMA}
    columns["ts"] = pa.array(ev_ts, type=pa.int64()).cast(TS_TYPE)
    columns["kind"] = pa.array(np.zeros(n, dtype=np.int8))
    columns["customer_key"] = pa.array(store.keys[ev_slots])
    table = pa.Table.from_pydict(columns, schema=ROUTED_SCHEMA)
    order = sort_order(ev_slots, ev_ts)
    view = BatchView(table, order, ev_slots[order], store)
    matches = []
    for r in range(int(rng.integers(1, 4))):
        k = int(rng.integers(0, 200))
        at_event = (rng.random(k) < 0.3) & (n > 0)
        rows = np.where(at_event, rng.integers(0, max(n, 1), k), -1)
        slots = rng.integers(0, customers, k)
        ts = np.where(rng.random(k) < 0.5, T0 + rng.integers(0, 40, k) * step,
                      T0 + rng.integers(0, span, k))  # fmt: skip
        if n:
            slots = np.where(at_event, view.slot[np.maximum(rows, 0)], slots)
            ts = np.where(at_event, view.ts[np.maximum(rows, 0)], ts)
        rule = type("Rule", (), {"id": f"r{r}"})()
        empty = np.zeros((0, 0), dtype=np.int64)
        matches.append((rule, PatternResult(slots.astype(np.int64), ts.astype(np.int64), rows,
                                            np.zeros(0, dtype=np.int64), empty)))  # fmt: skip
    grown, fired = with_timer_rows(view, matches, store)
    if not any(m.timers.any() for _, m in matches):
        assert grown is view
        return
    want_slots, want_ts, want_fired, want_ids = _grown_by_sorting(view, matches, store)
    np.testing.assert_array_equal(grown.slot, want_slots)
    np.testing.assert_array_equal(grown.ts, want_ts)
    assert fired.keys() == want_fired.keys()
    for rule_id, rows in want_fired.items():
        np.testing.assert_array_equal(fired[rule_id], rows)
    timer = grown.kind == TIMER_KIND
    assert int(timer.sum()) == sum(int(m.timers.sum()) for _, m in matches)
    # each deadline row carries its own id (and key): the same set as the obvious way's
    ids = grown.arrow("event_id", np.flatnonzero(timer)).to_pylist()
    assert sorted(ids) == sorted(want_ids.tolist())
    np.testing.assert_array_equal(
        grown.gather("customer_key")[timer], store.keys[grown.slot[timer]]
    )


@pytest.mark.parametrize("seed", range(20))
def test_deadlines_sorted_by_radix_passes_equal_a_lexsort(seed: int) -> None:
    """Deadline positions in (deadline, position) order, by 16-bit radix passes: equal to a
    lexsort, for positions ascending or not, ties, and spans of one pass up to four."""
    from engine.rules.timers import _by_deadline

    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 3000))
    span = int(rng.choice([1, 60_000, 2**20, 2**40, 2**62]))
    positions = rng.choice(10 * n + 1, size=n, replace=False).astype(np.int64)
    if seed % 2:
        positions.sort()  # as the view gives them, mostly
    ts = T0 + rng.integers(0, span, n) if seed % 3 else np.full(n, T0)
    want = positions[np.lexsort((positions, ts))]
    np.testing.assert_array_equal(_by_deadline(positions, ts.astype(np.int64)), want)
