"""The shipped rules, offers and reference tables over a synthetic telco stream: every moment
fires, and the triggers and decisions do not depend on how the stream is cut (micro-batches of
1, 7, 1,024 and 65,536 events), on the number of shards (1, 2 and 8) or on a snapshot and
restore in the middle: deadlines, windows (a six-cycle sliding count among them) and the
nearest store with stock included."""

from __future__ import annotations

from functools import cache
from typing import Any

import pyarrow as pa
import pytest

from engine.config import EngineSettings
from engine.decision.catalog import load_catalog
from engine.local import LocalEngine
from engine.reference import load_reference
from engine.rules.spec import load_rules
from engine.shard import ShardLogic
from engine.synthetic.telco import events, population
from tests.conftest import ROOT
from tests.property.test_pattern_invariance import triggers_of
from tests.property.test_rules_match_reference import decisions_of, feature_scorer
from tests.pure import QUICK

CONFIG = ROOT / "deploy" / "config"
RULES = load_rules(CONFIG / "rules.yaml")
CATALOG = load_catalog(CONFIG / "offers.yaml")
REFERENCE = load_reference(CONFIG / "reference.yaml")
#: the prefix the 1- and 7-event cuts replay (one call per micro-batch: slow)
SHORT = 1_500


@cache
def stream() -> pa.Table:
    """Four months of 300 customers: enough billing cycles for a third time over the cap."""
    return events(population(300, seed=9), 36_000, days=120, seed=9, lateness_ms=60_000)


def _run(table: pa.Table, shards: int, size: int, cut: int | None = None) -> LocalEngine:
    settings = EngineSettings(shards=shards, allowed_lateness_s=120, micro_batch_max_events=size)
    engine = LocalEngine(settings, RULES, CATALOG, feature_scorer(), reference=REFERENCE)
    for start in range(0, table.num_rows, size):
        engine.submit(table.slice(start, size))
        if cut is not None and start < cut <= start + size:
            for k, shard in enumerate(engine.shards):
                fresh = ShardLogic(
                    k, shard.settings, RULES, shard.key_range, CATALOG, feature_scorer()
                )
                fresh.set_reference(REFERENCE)
                fresh.restore(shard.snapshot())
                engine.shards[k] = fresh
    engine.end_stream()
    assert not engine.failed, engine.failed[0].column("reason")[0]
    return engine


def outputs(engine: LocalEngine) -> tuple[list[Any], list[Any]]:
    return triggers_of(engine), decisions_of(engine)


def test_every_shipped_moment_fires_on_the_synthetic_stream() -> None:
    fired = {t[0] for t in triggers_of(_run(stream(), 2, 65_536))}
    assert fired == {
        "data_cap_nearing",
        "over_cap_third_time",
        "away_from_home",
        "recalled_device_in_use",
        "cart_left_while_browsing",
    }


@pytest.mark.parametrize("shards", [1, 8] if QUICK else [1, 2, 8])
def test_the_shipped_rules_give_the_same_outputs_however_the_stream_is_cut(shards: int) -> None:
    table = stream()
    want = outputs(_run(table, 2, 65_536))
    assert outputs(_run(table, shards, 1_024, cut=table.num_rows // 3)) == want
    if not QUICK:
        short = table.slice(0, SHORT)
        want_short = outputs(_run(short, 2, 65_536))
        for size in (1, 7):
            assert outputs(_run(short, shards, size, cut=SHORT // 2)) == want_short, size
