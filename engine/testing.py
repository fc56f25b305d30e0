"""Helpers for testing rules, catalogs and decisions without a model or Ray (shipped on purpose).

``EventFactory`` makes wire events with fresh ids and ``utc_ms`` their times, so a user tests
a rule file against ``LocalEngine`` in a few lines::

    event = EventFactory()
    engine = LocalEngine(EngineSettings(shards=1), load_rules("rules.yaml"))
    engine.submit_rows([event("usage", "c1", utc_ms(2026, 3, 2, 10), mb=850.0)])

``FixedScorer`` answers a ScoreRequest with propensities from a plain function of the feature
rows, so tests know exactly what the ranker "thinks"; it also records every request.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from engine.decision.scorer import ScoreRequest, ScoreResponse


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Epoch ms of a UTC date-time: utc_ms(2026, 3, 1, 12) is noon on 1 March 2026."""
    moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    return int(moment.timestamp() * 1000)


class EventFactory:
    """Wire events (as ``POST /v1/events`` takes them) with fresh ids from ``first_id`` up."""

    def __init__(self, first_id: int = 1) -> None:
        self._ids = itertools.count(first_id)

    def __call__(self, kind: str, customer: str, ts: int, **fields: Any) -> dict[str, Any]:
        """One event: ``event("usage", "c1", ts, mb=100.0)``."""
        return {"event_id": next(self._ids), "customer_id": customer, "kind": kind, "ts": ts,
                **fields}  # fmt: skip


@dataclass
class FixedScorer:
    """An OfferScorer whose propensity is ``fn(features, feature_names)`` (default 0.5)."""

    fn: Callable[[np.ndarray, tuple[str, ...]], np.ndarray] | None = None
    version: str = "fixed"
    requests: list[ScoreRequest] = field(default_factory=list)
    #: keep every request in ``requests`` (off for long runs: they hold the features)
    keep: bool = True

    def score(self, request: ScoreRequest) -> ScoreResponse:
        if self.keep:
            self.requests.append(request)
        if self.fn is None:
            p = np.full(request.rows, 0.5, dtype=np.float32)
        else:
            p = np.asarray(self.fn(request.features, request.feature_names), dtype=np.float32)
        return ScoreResponse(p, (self.version,), np.zeros(request.rows, dtype=np.int8))


def by_offer(propensity: dict[str, float], default: float = 0.0) -> FixedScorer:
    """A FixedScorer giving each offer a fixed propensity, read from the offer one-hot."""

    def fn(features: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
        out = np.full(features.shape[0], default, dtype=np.float32)
        for j, name in enumerate(names):
            if name.startswith("offer=") and name[6:] in propensity:
                out[features[:, j] == 1.0] = propensity[name[6:]]
        return out

    return FixedScorer(fn)
