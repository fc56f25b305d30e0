"""ServeScorer: the OfferScorer port answered by the ranker deployment on Ray Serve."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from ray import serve

from actors.metrics import metrics
from engine.decision.scorer import (
    RANKER_APP,
    RANKER_DEPLOYMENT,
    ScoreRequest,
    ScoreResponse,
    ScorerUnavailableError,
)


class ServeScorer:
    """Sends each micro-batch's feature matrix to the ranker as one Serve request.

    Holds only names, so it pickles into a shard actor; the handle is made there, by
    ``connect()`` or on first use. When the ranker fails or does not answer within
    ``timeout_s``, ``score`` raises ScorerUnavailableError (the shard decides NO_ACTION) and, for
    the next ``retry_after_s``, fails at once instead of stalling every micro-batch on a
    ranker that is down.
    """

    def __init__(
        self,
        deployment: str = RANKER_DEPLOYMENT,
        app_name: str = RANKER_APP,
        timeout_s: float = 10.0,
        retry_after_s: float = 5.0,
    ) -> None:
        self.deployment = deployment
        self.app_name = app_name
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._handle: Any = None
        self._down_until = 0.0
        self._down_reason = ""

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_down_until": 0.0}

    def _call(self, request: ScoreRequest, timeout_s: float) -> ScoreResponse:
        now = time.monotonic()
        if now < self._down_until:
            raise ScorerUnavailableError(
                f"{self._down_reason} (retrying in {self._down_until - now:.1f} s)"
            )
        try:
            if self._handle is None:
                self._handle = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
            response: ScoreResponse = self._handle.remote(request).result(timeout_s=timeout_s)
        except Exception as exc:  # any failure of the remote model: the shard must go on
            self._down_until = time.monotonic() + self.retry_after_s
            self._down_reason = (
                f"ranker {self.app_name}/{self.deployment} did not answer: "
                f"{type(exc).__name__}: {exc}"
            )
            raise ScorerUnavailableError(self._down_reason) from exc
        return response

    def connect(self, timeout_s: float = 10.0) -> None:
        """Make the handle and send one empty request, so that the first micro-batch with
        decisions does not pay for finding the replicas (~200 ms here)."""
        empty = ScoreRequest(np.zeros((0, 0), dtype=np.float32), (), np.zeros(0, dtype=np.uint64))
        self._call(empty, timeout_s)

    def score(self, request: ScoreRequest) -> ScoreResponse:
        started = time.perf_counter()
        response = self._call(request, self.timeout_s)
        metrics().ranker_ms.observe((time.perf_counter() - started) * 1000)
        return response
