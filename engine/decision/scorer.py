"""The OfferScorer port: how a shard asks a model for propensities, without knowing the model.

A shard sends one request per decision step (a micro-batch, or a part of one of at most
``decision_step_max_events`` events): the feature matrix of every (decision, candidate offer)
pair, and the customer key of each row (the ranker splits champion and challenger by a stable
customer hash). The answer is a propensity (probability of acceptance) per row and
which model version scored it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from engine.errors import EngineError

#: the Serve application and deployment of the ranker: models deploys it, actors call it
RANKER_APP = "kairos-ranker"
RANKER_DEPLOYMENT = "ranker"


@dataclass(frozen=True)
class ScoreRequest:
    features: np.ndarray  # float32, rows x len(feature_names)
    feature_names: tuple[str, ...]
    customer_keys: np.ndarray  # uint64, one per row

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class ScoreResponse:
    propensity: np.ndarray  # float32, one per request row, in [0, 1]: P(convert | offer)
    versions: tuple[str, ...]  # the model versions that answered
    version_index: np.ndarray  # int8 per row: index into versions
    #: an uplift model's P(convert | no action) per row (None: a response model)
    baseline: np.ndarray | None = None
    #: P(opt-out | contact) per row (None: not modelled)
    opt_out: np.ndarray | None = None

    def version_of_rows(self) -> np.ndarray:
        return np.array(self.versions, dtype=object)[self.version_index]


class ScorerUnavailableError(EngineError):
    """The model could not answer (not deployed, timed out, failed). The decision falls back to
    NO_ACTION with reason ``model_unavailable``: the engine keeps applying events, and nothing
    is sent on a guess."""


class OfferScorer(Protocol):
    """Scores (decision, offer) feature rows. Implementations: ServeScorer, FixedScorer."""

    def score(self, request: ScoreRequest) -> ScoreResponse: ...


@runtime_checkable
class RemoteScorer(Protocol):
    """An OfferScorer behind a network hop (ServeScorer): ``connect`` finds the model and
    sends an empty request ahead of the first decision; ScorerUnavailableError if it cannot."""

    def score(self, request: ScoreRequest) -> ScoreResponse: ...

    def connect(self, timeout_s: float = 10.0) -> None: ...


def check_response(request: ScoreRequest, response: ScoreResponse) -> None:
    """A response must answer every row with a probability (and so must its baseline and
    opt-out probabilities, if it gives them, except that they are NaN in rows a response model
    answered: a champion and a challenger of different kinds); anything else is a scorer bug."""
    for name in ("propensity", "baseline", "opt_out"):
        p = getattr(response, name)
        if p is None and name != "propensity":
            continue
        if p.shape != (request.rows,):
            raise EngineError(f"scorer answered {p.shape} {name} values for {request.rows} rows")
        given = p if name == "propensity" else p[~np.isnan(p)]
        if given.size and (np.isnan(given).any() or given.min() < 0 or given.max() > 1):
            raise EngineError(f"scorer answered {name} values outside [0, 1]")
