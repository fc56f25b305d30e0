"""Shared fixtures: settings, rules and an event factory for the pure core."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineSettings
from engine.rules.spec import RuleSet, load_rules

ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = ROOT / "deploy" / "config" / "rules.yaml"


@pytest.fixture
def settings() -> EngineSettings:
    return EngineSettings(shards=2, allowed_lateness_s=60, dedupe_window_s=3600)


@pytest.fixture
def rules() -> RuleSet:
    return load_rules(RULES_FILE)


def ms(*args: int) -> int:
    """Epoch ms of a UTC date-time: ms(2026, 3, 1, 12) is noon on 1 March 2026."""
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


@pytest.fixture
def event() -> Callable[..., dict[str, Any]]:
    """Factory of wire events with fresh ids: event("usage", "c1", ts, mb=100)."""
    counter = iter(range(1, 10**9))

    def make(kind: str, customer: str, ts: int, **fields: Any) -> dict[str, Any]:
        return {
            "event_id": next(counter),
            "customer_id": customer,
            "kind": kind,
            "ts": ts,
            **fields,
        }

    return make
