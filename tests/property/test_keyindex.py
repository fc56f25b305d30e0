"""KeyIndex against a dict: every key inserted is found with its slot, no other key is."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.state.keyindex import KeyIndex
from tests.pure import examples

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


@settings(max_examples=examples(200), deadline=None)
@given(
    batches=st.lists(st.lists(U64, max_size=300), max_size=8),
    probes=st.lists(U64, max_size=200),
)
def test_lookups_match_a_dict_through_inserts_and_rebuilds(batches, probes) -> None:
    index, truth = KeyIndex(bits=2), {}
    for batch in batches:
        fresh = np.array(sorted({k for k in batch if k not in truth}), dtype=np.uint64)
        slots = np.arange(len(truth), len(truth) + fresh.size, dtype=np.int64)
        index.insert(fresh, slots)
        truth.update(zip(fresh.tolist(), slots.tolist(), strict=True))
        asked = np.array([*truth, *probes, *batch], dtype=np.uint64)
        expected = np.array([truth.get(k, -1) for k in asked.tolist()], dtype=np.int64)
        np.testing.assert_array_equal(index.lookup(asked), expected)
    assert index.count == len(truth) and index.count * 2 <= index.table_slots.size


def test_sequential_keys_spread_over_the_table() -> None:
    index = KeyIndex()
    keys = np.arange(100_000, dtype=np.uint64)  # no entropy in the top bits at all
    index.insert(keys, keys.astype(np.int64))
    np.testing.assert_array_equal(index.lookup(keys[::-1]), keys[::-1].astype(np.int64))
    home = index.home_bucket(keys)
    assert np.bincount(home, minlength=1 << index.bits).max() <= 4  # no pile-up
