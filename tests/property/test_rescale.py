"""A checkpoint taken on N shards restores onto M: cut a random stream at a random point,
checkpoint through files, rescale, continue; the triggers, decisions and golden records equal a
run that had M shards all along."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.checkpoint import read_checkpoint, rescale, write_checkpoint
from engine.local import LocalEngine
from engine.shard import ShardLogic
from tests.property.test_rules_match_reference import (
    CATALOG,
    RULES,
    decisions_of,
    feature_scorer,
    streams,
)
from tests.property.test_snapshot_restore import _engine, _records
from tests.pure import examples


def _feed(engine: LocalEngine, events: list[dict[str, Any]]) -> None:
    if events:
        engine.submit_rows(events)


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=streams(),
    before=st.sampled_from([1, 2, 4]),
    after=st.sampled_from([1, 3]),
    data=st.data(),
)
def test_a_checkpoint_on_n_shards_continues_on_m(events, before, after, data, tmp_path_factory):
    cut = data.draw(st.integers(0, len(events)), label="cut")
    whole = _engine(after)
    _feed(whole, events[:cut])
    _feed(whole, events[cut:])
    whole.end_stream()

    first = _engine(before)
    _feed(first, events[:cut])
    root = str(tmp_path_factory.mktemp("chk"))
    write_checkpoint(
        root, 1, [s.snapshot() for s in first.shards], {"position": first.ingestor.position()}
    )
    document, snapshots = read_checkpoint(root)
    second = _engine(after)
    second.ingestor.resume(document["position"])
    ranges = [second.ingestor.shard_map.range_of(i) for i in range(after)]
    for k, snapshot in enumerate(rescale(snapshots, ranges, second.settings.key_groups)):
        shard = ShardLogic(k, second.settings, RULES, ranges[k], CATALOG, feature_scorer())
        shard.restore(snapshot)
        second.shards[k] = shard
    # what the first engine produced before the cut counts as produced
    second.triggers, second.decisions = list(first.triggers), list(first.decisions)
    _feed(second, events[cut:])
    second.end_stream()

    assert second.trigger_table().equals(whole.trigger_table())
    assert decisions_of(second) == decisions_of(whole)
    customers = {e["customer_id"] for e in events}
    assert _records(second, customers) == _records(whole, customers)
