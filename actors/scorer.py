"""ServeScorer: the OfferScorer port answered by the ranker deployment on Ray Serve."""

from __future__ import annotations

import time
from typing import Any

from ray import serve

from actors.metrics import metrics
from engine.decision.scorer import ScoreRequest, ScoreResponse


class ServeScorer:
    """Sends each micro-batch's feature matrix to the ranker as one Serve request.

    Holds only names, so it pickles into a shard actor; the handle is made there, on first use.
    """

    def __init__(
        self, deployment: str = "ranker", app_name: str = "kairos-ranker", timeout_s: float = 30.0
    ) -> None:
        self.deployment = deployment
        self.app_name = app_name
        self.timeout_s = timeout_s
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    def score(self, request: ScoreRequest) -> ScoreResponse:
        if self._handle is None:
            self._handle = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
        started = time.perf_counter()
        response: ScoreResponse = self._handle.remote(request).result(timeout_s=self.timeout_s)
        metrics().ranker_ms.observe((time.perf_counter() - started) * 1000)
        return response
