"""Pattern rules compiled to small deterministic state machines.

A pattern is a list of steps, each naming itself with its link to the step before:

* ``begin``: the first step (an event that starts a partial match);
* ``followed_by``: an event of this step comes later (any events may come between);
* ``not_followed_by``: no event of this step comes between the steps around it; at the end
  of a pattern, with ``within``, no such event within that time of the last step's event:
  the match then completes at that deadline, on an event-time timer.

A positive step may take ``times: n`` events (in order, others between them allowed) and may be
``optional`` (skipped whole); the pattern's ``within`` bounds the time from its first event to
its last positive one. Each step has ``on`` (event kinds) and an optional ``when``. An absence
between steps forbids its events from the previous step's first event (as Flink's
``notFollowedBy`` after ``times``) to the next step's first.

**What a match is.** Per customer, events are taken in event-time order (ties in arrival
order). A match completes at the first event (or deadline) at which some choice of the
customer's events since the last match fits the pattern. ``skip: past_last_event`` (the
default) then drops every partial match begun at or before that moment, so one moment gives
one trigger; ``skip: no_skip`` keeps them, and the rule fires at every event that completes
some match (not allowed with an absence at the end, whose pending deadlines would need a queue).

**Why this is a small state machine.** A partial match is "the last positive element taken,
and the next one it will take" (an optional step makes two such states: one that will take it,
one that will skip it and is guarded by the absences beyond it). Partial matches in the same
state behave alike except for their start times, and under ``within`` the latest start is
the best one to keep; so one register per state holds the latest start (``NEVER`` if none).
The absence at the end needs only the earliest pending entry: an event of the absence ends
every pending one at once, and the earliest deadline fires first and, skipping past the
match, drops the rest. So the state per customer is a handful of int64 registers plus a
deadline, stored as columns of the golden record (``engine.state.store``), and a batch is
evaluated with segmented cumulative maxima (``engine.rules.matcher``).

What does not compile (strict contiguity ``next``/``not_next``, ``times`` ranges, an optional
first or last step, ...) is refused with the rule, the step and the construct named.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from engine.events.schema import EventKind
from engine.rules.duration import parse_duration_ms
from engine.rules.expr import Expression

if TYPE_CHECKING:
    from engine.rules.spec import PatternSpec

#: the state after the last positive element: a completed match (or the trailing wait)
END = -1
#: most ``times`` of one step, and most registers of one pattern
MAX_TIMES = 16
MAX_REGISTERS = 24


@dataclass(frozen=True)
class Condition:
    """What an event must be to take a step: one of ``kinds`` and ``when`` true."""

    step: str
    kinds: tuple[EventKind, ...]
    when: Expression | None


@dataclass(frozen=True)
class State:
    """Partial matches that took element ``last`` and will take ``next`` (an element index);
    an event of any condition in ``kills`` ends them (an absence between the two)."""

    last: int
    next: int
    kills: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"s{self.last}_{self.next}"


@dataclass(frozen=True)
class Automaton:
    """A compiled pattern. Elements are the positive steps' events in order (a step with
    ``times: 3`` is three elements); conditions are one per step."""

    conditions: tuple[Condition, ...]
    element_cond: tuple[int, ...]
    states: tuple[State, ...]
    #: condition of the absence at the end, or None; and its time
    trailing: int | None
    trailing_ms: int
    within_ms: int | None
    skip: str
    words: str

    @property
    def elements(self) -> int:
        return len(self.element_cond)

    @property
    def register_names(self) -> list[str]:
        """State columns: one per state, the trailing wait, and the deadline."""
        names = [s.name for s in self.states]
        if self.trailing is not None:
            names.append("wait")
        return [*names, "deadline"]

    @property
    def digest(self) -> str:
        """Identifies the machine: a rule whose pattern changes starts its state afresh."""
        parts = [
            repr([(c.kinds, c.when.source if c.when else None) for c in self.conditions]),
            repr(self.element_cond),
            repr(self.states),
            repr((self.trailing, self.trailing_ms, self.within_ms, self.skip)),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]

    def entering(self, element: int) -> list[int]:
        """Indices of the states whose next element is ``element``."""
        return [i for i, s in enumerate(self.states) if s.next == element]

    def leaving(self, element: int) -> list[int]:
        """Indices of the states entered by taking ``element``."""
        return [i for i, s in enumerate(self.states) if s.last == element]


def _times(value: Any) -> int | str:
    """The step's ``times`` as a count, or why it is refused."""
    if isinstance(value, list):
        return (
            "a range of times is not compiled: with followed_by (any events between) "
            "'between n and m' cannot be told from 'at least n'; write times: n"
        )
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TIMES:
        return f"times must be a whole number from 1 to {MAX_TIMES}"
    return value


def compile_pattern(
    spec: PatternSpec,
    expr: Callable[[str, str | None], Expression | None],
    refuse: Callable[[str, str], None],
) -> Automaton | None:
    """The state machine of ``spec``, or None after reporting each construct that does not
    compile through ``refuse(field, message)``. ``expr(field, text)`` compiles a condition."""
    steps = spec.pattern
    problems_before = [False]

    def no(fieldname: str, message: str) -> None:
        problems_before[0] = True
        refuse(fieldname, message)

    conditions: list[Condition] = []
    element_cond: list[int] = []
    optional: list[bool] = []
    block: list[int] = []  # elements left in the step from each element on
    #: absence conditions between element i and element i + 1 (by element index)
    gap_kills: dict[int, list[int]] = {}
    trailing: int | None = None
    trailing_ms = 0
    positives = [i for i, s in enumerate(steps) if not s.absent]
    for i, step in enumerate(steps):
        where = f"pattern[{i}] ({step.name})"
        if step.link in ("next", "not_next"):
            no(where, f"'{step.link}' (strict contiguity) is not compiled; use followed_by "
                      "or not_followed_by")  # fmt: skip
            continue
        if (i == 0) != (step.link == "begin"):
            no(where, "the first step, and only it, is 'begin'")
            continue
        when = expr(f"{where}.when", step.when)
        kinds = tuple(EventKind.from_wire(k) for k in step.on)
        cond = len(conditions)
        conditions.append(Condition(step.name, kinds, when))
        if step.absent:
            if step.times != 1 or step.optional:
                no(where, "an absence takes neither times nor optional")
            if i > positives[-1]:  # at the end
                if trailing is not None:
                    no(where, "one not_followed_by at the end, at most")
                if step.within is None:
                    no(where, "a not_followed_by at the end needs 'within': the time after "
                              "the step before it when the match completes")  # fmt: skip
                else:
                    trailing, trailing_ms = cond, parse_duration_ms(step.within)
            else:
                if step.within is not None:
                    no(where, "'within' on a not_followed_by between steps is not compiled; "
                              "the pattern's within bounds the whole match")  # fmt: skip
                gap_kills.setdefault(len(element_cond) - 1, []).append(cond)
            continue
        if step.within is not None:
            no(where, "'within' belongs to the pattern or to a not_followed_by at the end")
        times = _times(step.times)
        if isinstance(times, str):
            no(f"{where}.times", times)
            continue
        if step.optional and (i == 0 or i == positives[-1]):
            no(where, "the first and the last positive step cannot be optional")
        for k in range(times):  # an optional step is skipped whole: from its first element
            element_cond.append(cond)
            optional.append(step.optional and k == 0)
            block.append(times - k)
    if problems_before[0] or not element_cond:
        return None
    states = _states(element_cond, optional, block, gap_kills)
    registers = len(states) + (trailing is not None) + 1
    if registers > MAX_REGISTERS:
        no("pattern", f"compiles to {registers} registers per customer; at most "
                      f"{MAX_REGISTERS} (fewer times or optional steps)")  # fmt: skip
        return None
    if spec.skip == "no_skip" and trailing is not None:
        no("skip", "no_skip with a not_followed_by at the end is not compiled: each pending "
                   "deadline would need its own state")  # fmt: skip
        return None
    within_ms = parse_duration_ms(spec.within) if spec.within is not None else None
    automaton = Automaton(
        tuple(conditions), tuple(element_cond), tuple(states), trailing, trailing_ms,
        within_ms, spec.skip, "",
    )  # fmt: skip
    return replace(automaton, words=explain(spec, automaton))


def _states(
    element_cond: list[int],
    optional: list[bool],
    block: list[int],
    gap_kills: dict[int, list[int]],
) -> list[State]:
    """Every (last taken, next to take) pair: an optional step may be skipped (all its
    elements), and a state that skips it is guarded by the absences of every gap it spans."""
    n = len(element_cond)
    states: list[State] = []
    for last in range(n - 1):
        nxt = last + 1
        # an absence after a step with times guards from the step's first event on (Flink's
        # notFollowedBy after times(n)); the gap's own kills are those after its last element
        kills = list(gap_kills.get(last + block[last] - 1, []))
        while True:
            states.append(State(last, nxt, tuple(kills)))
            if not optional[nxt]:
                break
            after = nxt + block[nxt]  # the first element after the optional step
            if after >= n:
                break
            kills += gap_kills.get(after - 1, [])
            nxt = after
    return states


def _duration_words(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0 and ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def explain(spec: PatternSpec, automaton: Automaton) -> str:
    """The pattern in words, for ``kairos rules check``."""
    parts: list[str] = []
    for i, step in enumerate(spec.pattern):
        kinds = " or ".join(step.on)
        what = kinds + (f" where {step.when}" if step.when else "")
        if step.absent:
            if step.within is not None and i > max(
                j for j, s in enumerate(spec.pattern) if not s.absent
            ):
                parts.append(
                    f"then no {what} within {_duration_words(parse_duration_ms(step.within))}"
                )
            else:
                parts.append(f"with no {what} before the next step")
            continue
        count = f"{step.times} x " if step.times != 1 else ""
        lead = "a" if i == 0 else "then" + (" (optionally)" if step.optional else "")
        parts.append(f"{lead} {count}{what} ({step.name})")
    text = ", ".join(parts)
    if automaton.within_ms is not None:
        text += f"; all within {_duration_words(automaton.within_ms)} of the first"
    if automaton.trailing is not None:
        text += (
            f". Fires {_duration_words(automaton.trailing_ms)} after the earliest pending "
            "match's last step, on an event-time timer"
        )
    else:
        text += ". Fires at the event that completes it"
    text += (
        "; then drops every partial match begun before"
        if automaton.skip == "past_last_event"
        else "; keeps other partial matches (fires at every completing event)"
    )
    regs = len(automaton.register_names)
    return f"{text}. State: {regs} registers ({regs * 8} bytes) per customer."
