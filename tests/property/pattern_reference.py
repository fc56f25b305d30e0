"""A per-event reference for pattern rules: every partial match kept, one event at a time.

Written from the rule's steps directly, the obvious way, without the state machine's tricks
(one register per state, the latest start, segmented maxima, rounds): a partial match is (start,
step it works on, events of that step taken, absences that would end it), every one is kept,
and each event advances, keeps or ends each of them. Deadlines of an absence at the end fire
before the first later event, and at the end up to the horizon.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.rules.duration import parse_duration_ms
from engine.rules.spec import PatternSpec


@dataclass(frozen=True)
class Partial:
    start: int
    step: int  # index into the steps of the positive step it works on
    taken: int  # events of that step taken so far
    guards: frozenset[int]  # absence steps whose events end it


@dataclass
class ReferencePattern:
    """One customer's partial matches of one pattern."""

    spec: PatternSpec
    partials: set[Partial] = field(default_factory=set)
    waits: list[int] = field(default_factory=list)  # entry times of the absence at the end

    def __post_init__(self) -> None:
        steps = self.spec.pattern
        self.positive = [i for i, s in enumerate(steps) if not s.absent]
        last = self.positive[-1]
        self.trailing = next((i for i in range(last + 1, len(steps))), None)
        self.trailing_ms = (
            parse_duration_ms(steps[self.trailing].within or 0) if self.trailing is not None else 0
        )
        self.within = parse_duration_ms(self.spec.within) if self.spec.within else None

    def _after(self, start: int, step: int) -> tuple[list[Partial], bool]:
        """Partials waiting for the positive steps after ``step`` (optional ones may be
        skipped), and whether the pattern's positive part is complete."""
        steps = self.spec.pattern
        out: list[Partial] = []
        guards: set[int] = set()
        for k in range(step + 1, len(steps)):
            if k == self.trailing:
                break
            if steps[k].absent:
                guards.add(k)
                continue
            out.append(Partial(start, k, 0, frozenset(guards)))
            if not steps[k].optional:
                return out, False
        return out, True

    def _guards_after(self, step: int) -> frozenset[int]:
        """The absences between ``step`` and the next positive step."""
        steps = self.spec.pattern
        guards = set()
        for k in range(step + 1, len(steps)):
            if k == self.trailing or not steps[k].absent:
                break
            guards.add(k)
        return frozenset(guards)

    def pending_deadline(self) -> int | None:
        return min(self.waits) + self.trailing_ms if self.waits else None

    def fire_due(self, before: int) -> int | None:
        """The deadline that passes before time ``before`` (exclusive), if any; it fires and
        (skip past last event) every partial match goes."""
        deadline = self.pending_deadline()
        if deadline is not None and deadline < before:
            self.partials.clear()
            self.waits.clear()
            return deadline
        return None

    def event(self, ts: int, bits: list[bool]) -> bool:
        """Apply one event (``bits[i]``: it is an event of step i); True if a match completes
        at it."""
        steps = self.spec.pattern
        kept: set[Partial] = set()
        completed = False

        def take(p: Partial) -> None:
            nonlocal completed
            if p.taken + 1 < steps[p.step].times:  # the absences after the step guard already
                kept.add(Partial(p.start, p.step, p.taken + 1, self._guards_after(p.step)))
                return
            nxt, done = self._after(p.start, p.step)
            kept.update(nxt)
            completed |= done

        for p in self.partials:
            valid = self.within is None or ts - p.start <= self.within
            if valid and bits[p.step]:
                take(p)
            if not any(bits[g] for g in p.guards):  # any event may come between steps
                kept.add(p)
        if bits[0]:
            take(Partial(ts, 0, 0, frozenset()))
        if self.trailing is not None:
            if bits[self.trailing]:
                self.waits.clear()
            if completed:
                self.waits.append(ts)
            self.partials = kept
            return False
        if completed and self.spec.skip == "past_last_event":
            kept.clear()
        # no_skip: the partial that completed is gone (it took the event), the others stay
        self.partials = kept
        return completed


def reference_matches(
    spec: PatternSpec,
    events: list[tuple[int, int, list[bool]]],
    horizon: int,
) -> list[tuple[int, int, bool]]:
    """(customer, time, at_deadline) of every match. ``events``: (customer, ts, bits) in
    arrival order; each customer's are taken in (ts, arrival) order."""
    by_customer: dict[int, list[tuple[int, int, list[bool]]]] = {}
    for arrival, (customer, ts, bits) in enumerate(events):
        by_customer.setdefault(customer, []).append((ts, arrival, bits))
    out: list[tuple[int, int, bool]] = []
    for customer, evs in sorted(by_customer.items()):
        ref = ReferencePattern(spec)
        for ts, _, bits in sorted(evs, key=lambda e: (e[0], e[1])):
            fired = ref.fire_due(ts)
            if fired is not None:
                out.append((customer, fired, True))
            if ref.event(ts, bits):
                out.append((customer, ts, False))
        fired = ref.fire_due(horizon + 1)
        if fired is not None:
            out.append((customer, fired, True))
    return out
