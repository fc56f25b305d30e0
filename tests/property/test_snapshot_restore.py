"""Snapshot at any point, restore into fresh shards, continue: the same run as without the cut.

Triggers, decisions and every golden record (profile, aggregates, rule and contact state, the
recent-triggers and recent-decisions windows) equal the uninterrupted run's. Half the examples
go through files (``engine.checkpoint``), half pass the snapshot value straight across.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.checkpoint import read_snapshot, write_snapshot
from engine.config import EngineSettings
from engine.local import LocalEngine
from engine.shard import ShardLogic
from tests.property.test_rules_match_reference import (
    CATALOG,
    LATENESS_MS,
    RULES,
    decisions_of,
    feature_scorer,
    streams,
)
from tests.pure import examples


def _engine(shards: int) -> LocalEngine:
    config = EngineSettings(
        shards=shards, allowed_lateness_s=LATENESS_MS / 1000, dedupe_window_s=2 * LATENESS_MS / 1000
    )
    return LocalEngine(config, RULES, CATALOG, feature_scorer())


def _run(
    events: list[dict[str, Any]],
    shards: int,
    chunks: list[int],
    cut: int | None,
    folder: Path | None,
) -> LocalEngine:
    """Submit ``events`` in ``chunks``; after chunk ``cut`` replace every shard by a fresh one
    restored from its snapshot (through ``folder`` when given)."""
    engine = _engine(shards)
    start = 0
    for i, size in enumerate([*chunks, len(events)]):
        engine.submit_rows(events[start : start + size])
        start += size
        if i == cut:
            for k, shard in enumerate(engine.shards):
                snapshot = shard.snapshot()
                if folder is not None:
                    snapshot = read_snapshot(write_snapshot(snapshot, str(folder / f"shard-{k}")))
                fresh = ShardLogic(
                    k, shard.settings, RULES, shard.key_range, CATALOG, feature_scorer()
                )
                fresh.restore(snapshot)
                engine.shards[k] = fresh
        if start >= len(events):
            break
    engine.end_stream()
    return engine


def _nan_text(value: Any) -> Any:
    return repr(value) if isinstance(value, float) and np.isnan(value) else value


def _records(engine: LocalEngine, customers: set[str]) -> dict[str, Any]:
    out = {}
    for customer in sorted(customers):
        record = engine.customer(customer)
        if record is not None:  # NaN != NaN: compare their text
            record = {
                k: (repr(v) if isinstance(v, float) and np.isnan(v) else v)
                for k, v in record.items()
            }
        out[customer] = record
    return out


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=streams(),
    shards=st.sampled_from([1, 3]),
    chunks=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    data=st.data(),
    through_files=st.booleans(),
)
def test_restored_shards_continue_exactly_like_the_uninterrupted_run(
    events, shards, chunks, data, through_files, tmp_path_factory
) -> None:
    cut = data.draw(st.integers(0, len(chunks) - 1), label="cut after chunk")
    folder = tmp_path_factory.mktemp("snap") if through_files else None
    whole = _run(events, shards, chunks, None, None)
    resumed = _run(events, shards, chunks, cut, folder)
    assert resumed.trigger_table().equals(whole.trigger_table())
    assert decisions_of(resumed) == decisions_of(whole)
    customers = {e["customer_id"] for e in events}
    assert _records(resumed, customers) == _records(whole, customers)
    for a, b in zip(resumed.shards, whole.shards, strict=True):
        assert a.counters == b.counters
        assert a.watermark_ms == b.watermark_ms
