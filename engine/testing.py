"""Helpers for testing rules, catalogs and decisions without a model or Ray (shipped on purpose).

``FixedScorer`` answers a ScoreRequest with propensities from a plain function of the feature
rows, so tests know exactly what the ranker "thinks"; it also records every request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.decision.scorer import ScoreRequest, ScoreResponse


@dataclass
class FixedScorer:
    """An OfferScorer whose propensity is ``fn(features, feature_names)`` (default 0.5)."""

    fn: Callable[[np.ndarray, tuple[str, ...]], np.ndarray] | None = None
    version: str = "fixed"
    requests: list[ScoreRequest] = field(default_factory=list)

    def score(self, request: ScoreRequest) -> ScoreResponse:
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
