"""The ranker's logic, without Serve: score ScoreRequests with the champion or the challenger.

``Ranker`` holds up to two loaded models. Each request row goes to the challenger when a
stable hash of its customer key falls below ``challenger_share``, else to the champion, so a
customer always meets the same model. Request columns are matched to the model's features by
name: one-hot columns the model does not know are dropped and ones the request lacks are
zero, which scores a new offer like an unknown one until the next retraining; the context
columns must match exactly, or the request is refused with an error naming the difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engine.decision.features import CONTEXT_FIELDS
from engine.decision.policy import stable_uniform
from engine.decision.scorer import ScoreRequest, ScoreResponse
from engine.errors import ConfigError
from models.registry import ModelArtifact, ModelRegistry
from models.uplift import Arms, calibrate

CHALLENGER_SALT = 0x6368616C


def column_map(model_names: tuple[str, ...], request_names: tuple[str, ...]) -> np.ndarray:
    """For each model feature, its column among ``request_names`` (-1: absent, use zero)."""
    if tuple(request_names[: len(CONTEXT_FIELDS)]) != CONTEXT_FIELDS:
        raise ConfigError(
            "score request context columns differ from the ranker's: "
            f"{list(request_names[: len(CONTEXT_FIELDS)])} != {list(CONTEXT_FIELDS)}"
        )
    index = {n: i for i, n in enumerate(request_names)}
    return np.array([index.get(n, -1) for n in model_names])


def align(x: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``x``'s columns in the model's order; no copy when they already are."""
    if columns.size == x.shape[1] and (columns == np.arange(columns.size)).all():
        return x
    return np.where(columns >= 0, x[:, np.maximum(columns, 0)], np.float32(0.0))


def predictor(
    artifact: ModelArtifact, names: tuple[str, ...]
) -> Callable[[np.ndarray], np.ndarray]:
    """A function scoring feature rows laid out as ``names`` with ``artifact``'s booster."""
    artifact.check_compatible()
    columns = column_map(artifact.feature_names, names)
    return lambda x: np.asarray(artifact.booster.inplace_predict(align(x, columns)))


def uplift_predictor(
    artifact: ModelArtifact, names: tuple[str, ...]
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(P(convert | offer), P(convert | no action), P(opt-out | contact)) of feature rows laid
    out as ``names``; NaN for the last two from a response model (``models.incremental``)."""
    artifact.check_compatible()
    columns = column_map(artifact.feature_names, names)
    arms = arms_of(artifact)

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        aligned = align(x, columns)
        p1, *rest = (np.asarray(p, dtype=np.float64) for p in arms(aligned))
        if not rest:
            return p1, np.full(p1.size, np.nan), np.full(p1.size, np.nan)
        p0, out = rest
        return calibrate(p1, p0, aligned, artifact.feature_names, artifact.lines), p0, out

    return predict


def arms_of(artifact: ModelArtifact) -> Arms:
    """The artifact's boosters, scored in one call where they can be (``Arms``)."""
    boosters = [artifact.booster, artifact.baseline, artifact.opt_out]
    return Arms([b for b in boosters if b is not None])


class RankerConfig(BaseModel):
    """The ranker's ``user_config``: where models live and which versions serve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    registry: str
    champion: str
    challenger: str | None = None
    challenger_share: float = Field(0.0, ge=0, le=1)
    seed: int = 0


@dataclass
class _Loaded:
    artifact: ModelArtifact
    columns: dict[tuple[str, ...], np.ndarray]
    arms: Arms


class Ranker:
    """Champion (and optional challenger) models answering ScoreRequests."""

    def __init__(self, config: RankerConfig) -> None:
        self.config = config
        registry = ModelRegistry(config.registry)
        self.models = [self._load(registry, config.champion)]
        if config.challenger:
            self.models.append(self._load(registry, config.challenger))

    @staticmethod
    def _load(registry: ModelRegistry, version: str) -> _Loaded:
        artifact = registry.load(version)
        artifact.check_compatible()
        return _Loaded(artifact, {}, arms_of(artifact))

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(m.artifact.version for m in self.models)

    def _columns(self, model: _Loaded, names: tuple[str, ...]) -> np.ndarray:
        """For each model feature, its column in the request (-1: absent, use zero)."""
        cached = model.columns.get(names)
        if cached is not None:
            return cached
        columns = column_map(model.artifact.feature_names, names)
        model.columns[names] = columns
        return columns

    def _predict(self, model: _Loaded, request: ScoreRequest, rows: np.ndarray) -> list[np.ndarray]:
        """The model's probabilities of ``rows``: [P(convert | offer)], and for an uplift
        model also P(convert | no action) and P(opt-out | contact)."""
        columns = self._columns(model, request.feature_names)
        x = request.features if rows.size == request.rows else request.features[rows]
        aligned = align(x, columns)
        artifact = model.artifact
        out = [np.asarray(p, dtype=np.float32) for p in model.arms(aligned)]
        if artifact.lines and len(out) == 3:
            names = artifact.feature_names
            out[0] = calibrate(out[0], out[1], aligned, names, artifact.lines).astype(np.float32)
        return out

    def score(self, request: ScoreRequest) -> ScoreResponse:
        """P(convert | offer) per row; with an uplift model among those serving, also
        P(convert | no action) and P(opt-out | contact) (NaN in the rows a response model
        answers, which the engine then scores on response)."""
        n = request.rows
        which = np.zeros(n, dtype=np.int8)
        if len(self.models) > 1 and self.config.challenger_share > 0:
            u = stable_uniform(request.customer_keys, CHALLENGER_SALT + self.config.seed)
            which[u < self.config.challenger_share] = 1
        uplift = any(m.artifact.kind == "uplift" for m in self.models)
        answers = [np.zeros(n, dtype=np.float32)]
        if uplift:
            answers += [np.full(n, np.nan, dtype=np.float32) for _ in range(2)]
        for i, model in enumerate(self.models):
            rows = np.flatnonzero(which == i)
            if rows.size:
                for column, p in zip(answers, self._predict(model, request, rows), strict=False):
                    column[rows] = p
        p1, *rest = (np.where(np.isnan(a), a, np.clip(a, 0.0, 1.0)) for a in answers)
        baseline, opt_out = rest if rest else (None, None)
        return ScoreResponse(p1, self.versions, which, baseline, opt_out)
