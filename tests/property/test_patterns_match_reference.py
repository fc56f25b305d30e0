"""Pattern rules: the state machine (compiled loop and vector operations) equals the per-event
reference.

Random patterns (begin, followed_by with times and optional, not_followed_by between steps and
at the end with within, the pattern's within, both skip strategies) over random streams (1-6
customers, equal timestamps, any disorder of arrival), cut into steps at random event times
as the watermark would release them: the matches, their times and whether each came at a
deadline equal the reference's (``tests/property/pattern_reference.py``).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.errors import RuleError
from engine.rules.matcher import ROUNDS, run_pattern
from engine.rules.pattern import Automaton
from engine.rules.spec import PatternSpec, parse_rules
from engine.state.store import NEVER
from engine.yamlfile import load_yaml
from tests.conftest import ROOT
from tests.property.pattern_reference import reference_matches
from tests.pure import QUICK

KINDS = ["usage", "page_view", "cart_add", "checkout"]
MINUTE = 60_000
END = 10**15


@st.composite
def patterns(draw: Any) -> dict[str, Any]:
    def kinds() -> list[str]:
        return draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=2, unique=True))

    steps: list[dict[str, Any]] = [{"begin": "s0", "on": kinds()}]
    if draw(st.booleans()):
        steps[0]["times"] = draw(st.integers(1, 3))
    for i in range(1, draw(st.integers(0, 4)) + 1):
        if draw(st.integers(0, 2)) == 0:
            steps.append({"not_followed_by": f"s{i}", "on": kinds()})
        else:
            step: dict[str, Any] = {"followed_by": f"s{i}", "on": kinds()}
            roll = draw(st.integers(0, 3))
            if roll == 1:
                step["times"] = draw(st.integers(2, 3))
            elif roll == 2:
                step["optional"] = True
                step["times"] = draw(st.integers(1, 2))
            steps.append(step)
    if steps[-1].get("optional") or "not_followed_by" in steps[-1]:
        # the last positive step cannot be optional; an absence at the end needs within
        steps.append({"followed_by": "last", "on": kinds()})
    trailing = draw(st.booleans())
    if trailing:
        steps.append(
            {"not_followed_by": "tail", "on": kinds(), "within": f"{draw(st.integers(0, 20))}m"}
        )
    rule: dict[str, Any] = {"id": "p", "type": "pattern", "pattern": steps}
    if draw(st.booleans()):
        rule["within"] = f"{draw(st.integers(0, 30))}m"
    if not trailing:
        rule["skip"] = draw(st.sampled_from(["past_last_event", "no_skip"]))
    return rule


def compiled(rule: dict[str, Any]) -> tuple[PatternSpec, Automaton] | None:
    try:
        ruleset = parse_rules({"rules": [rule]})
    except RuleError:
        return None
    only = ruleset.rules[0]
    assert isinstance(only.spec, PatternSpec) and only.pattern is not None
    return only.spec, only.pattern


@st.composite
def streams(draw: Any) -> list[tuple[int, int, str]]:
    """(customer, minute, kind) in arrival order."""
    n = draw(st.integers(1, 80))
    customers = draw(st.integers(1, 6))
    return [
        (
            draw(st.integers(0, customers - 1)),
            draw(st.integers(0, 60)),
            draw(st.sampled_from(KINDS)),
        )
        for _ in range(n)
    ]


def vectorized(
    a: Automaton,
    spec: PatternSpec,
    events: list[tuple[int, int, str]],
    cuts: list[int],
    rounds: int = ROUNDS,
) -> list[tuple[int, int, bool]]:
    """Matches of ``a`` over ``events`` released in steps at the ``cuts`` (event times), with
    ``rounds`` vectorized rounds before the compiled loop (0: the compiled loop alone)."""
    customers = 1 + max(c for c, _, _ in events)
    state = [np.full(customers, NEVER, dtype=np.int64) for _ in a.register_names]
    arrival = np.arange(len(events))
    slot = np.array([c for c, _, _ in events])
    ts = np.array([m * MINUTE for _, m, _ in events], dtype=np.int64)
    bits_all = np.array(
        [[kind in step.on for _, _, kind in events] for step in spec.pattern], dtype=bool
    ).reshape(len(spec.pattern), len(events))
    out: list[tuple[int, int, bool]] = []
    bounds = [-1, *sorted(set(cuts)), END]
    for lo, hi in itertools.pairwise(bounds):
        hi_ms = END if hi == END else hi * MINUTE
        pick = np.flatnonzero((ts > lo * MINUTE) & (ts <= hi_ms))
        order = pick[np.lexsort((arrival[pick], ts[pick], slot[pick]))]
        relevant = order[bits_all[:, order].any(axis=0)]
        horizon = hi_ms  # every event up to it is in this step or before
        result = run_pattern(
            a,
            bits_all[:, relevant],
            slot[relevant],
            ts[relevant],
            state,
            horizon,
            customers,
            rounds,
        )
        for k in range(len(a.register_names)):
            state[k][result.write_slots] = result.write_values[k]
        out.extend(
            (int(s), int(t), bool(r < 0))
            for s, t, r in zip(result.slots, result.ts, result.rows, strict=True)
        )
    return out


def reference(spec: PatternSpec, events: list[tuple[int, int, str]]) -> list[tuple[int, int, bool]]:
    bits = [[kind in step.on for step in spec.pattern] for _, _, kind in events]
    return reference_matches(
        spec, [(c, m * MINUTE, b) for (c, m, _), b in zip(events, bits, strict=True)], END
    )


def check(rule: dict[str, Any], events: list[tuple[int, int, str]], cuts: list[int]) -> None:
    """The vectorized matches equal the reference's (a pattern that does not compile: skipped)."""
    built = compiled(rule)
    assume(built is not None)
    assert built is not None
    spec, a = built
    want = sorted(reference(spec, events))
    assert sorted(vectorized(a, spec, events, cuts)) == want  # the compiled loop
    assert sorted(vectorized(a, spec, events, cuts, rounds=1)) == want  # vector ops, then loop
    assert sorted(vectorized(a, spec, events, cuts, rounds=99)) == want  # vector ops alone


@settings(
    max_examples=300 if QUICK else 3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(rule=patterns(), events=streams(), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_vectorized_patterns_equal_the_per_event_reference(
    rule: dict[str, Any], events: list[tuple[int, int, str]], cuts: list[int]
) -> None:
    check(rule, events, cuts)


def shipped_patterns() -> list[dict[str, Any]]:
    """The pattern rules of deploy/config/rules.yaml, as the matcher sees them: their steps,
    within and skip (their ``when`` reads windows, checked on completion by the shard: the
    invariance tests hold it)."""
    document = load_yaml((ROOT / "deploy" / "config" / "rules.yaml").read_text())
    kept = ("id", "type", "pattern", "within", "skip")
    return [{k: v for k, v in r.items() if k in kept} for r in document["rules"]
            if r["type"] == "pattern"]  # fmt: skip


SHIPPED = shipped_patterns()


def test_the_shipped_rules_have_patterns_this_suite_checks() -> None:
    assert [r["id"] for r in SHIPPED] == ["cart_left_while_browsing"]
    assert all(compiled(r) is not None for r in SHIPPED)


@settings(max_examples=200 if QUICK else 1000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(rule=st.sampled_from(SHIPPED), events=streams(),
       cuts=st.lists(st.integers(0, 60), max_size=6))  # fmt: skip
def test_the_shipped_patterns_equal_the_per_event_reference(
    rule: dict[str, Any], events: list[tuple[int, int, str]], cuts: list[int]
) -> None:
    check(rule, events, cuts)
