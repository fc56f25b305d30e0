"""The slow suite's share of pattern parity: 10,000 generated streams (and patterns), and 10,000
of the shipped rules' patterns, where the vectorized state machine must give exactly the
per-event reference's matches
(``tests/property/test_patterns_match_reference.py`` runs 3,000 in ``make test``)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.property.test_patterns_match_reference import SHIPPED, check, patterns, streams

pytestmark = pytest.mark.faults


@settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(rule=patterns(), events=streams(), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_ten_thousand_streams_match_the_per_event_reference(
    rule: dict[str, Any], events: list[tuple[int, int, str]], cuts: list[int]
) -> None:
    check(rule, events, cuts)


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule=st.sampled_from(SHIPPED), events=streams(),
       cuts=st.lists(st.integers(0, 60), max_size=6))  # fmt: skip
def test_ten_thousand_streams_of_the_shipped_patterns_match_the_per_event_reference(
    rule: dict[str, Any], events: list[tuple[int, int, str]], cuts: list[int]
) -> None:
    check(rule, events, cuts)
