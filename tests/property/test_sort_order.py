"""The shard's (customer, event time, arrival) order against numpy's lexsort, on every path."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.state.view import sort_order
from tests.pure import examples

#: small spans take the packed value sort, wide ones the stable argsort, the widest lexsort
SPANS = st.sampled_from([1, 1_000, 86_400_000, 2**40, 2**62])
SLOT_TOPS = st.sampled_from([1, 100, 200_000, 2**30])


@settings(max_examples=examples(300), deadline=None)
@given(
    st.integers(0, 400),
    SPANS,
    SLOT_TOPS,
    st.integers(-(2**40), 2**40),
    st.integers(0, 2**32 - 1),
)
def test_order_is_stable_by_slot_then_time(n, span, slot_top, base, seed) -> None:
    rng = np.random.default_rng(seed)
    slots = rng.integers(0, slot_top, n).astype(np.int64)
    ts = base + rng.integers(0, span, n, dtype=np.int64)
    if n > 2:  # ties in time within a customer must keep arrival order
        ts[rng.integers(0, n, n // 3)] = ts[0]
        slots[rng.integers(0, n, n // 3)] = slots[0]
    order = sort_order(slots, ts)
    assert order.dtype == np.int64
    np.testing.assert_array_equal(order, np.lexsort((np.arange(n), ts, slots)))
