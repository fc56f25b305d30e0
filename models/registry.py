"""The model registry: versioned XGBoost artifacts with their metrics, on a pyarrow filesystem.

Layout under the registry root (a local folder or an object-store URI)::

    <root>/v0001/model.json   the Booster (XGBoost's JSON format): P(convert | offer)
    <root>/v0001/baseline.json, opt_out.json   an uplift model's P(convert | no action) and
                              P(opt-out | contact) boosters (absent for a response model)
    <root>/v0001/meta.json    feature names, feature-set version, metrics, status, lineage
    <root>/CHAMPION           the version serving by default

A version is written once and never changed, except its ``status`` (candidate, champion,
retired, refused) and the promotion decision recorded in its metadata.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs
import xgboost as xgb

from engine.decision.features import FEATURE_SET_VERSION, FeatureSpec
from engine.errors import ConfigError
from engine.sink import resolve

_VERSION = re.compile(r"^v(\d{4,})$")
#: an uplift model's boosters besides ``model.json``, by file stem
UPLIFT_PARTS = ("baseline", "opt_out")


@dataclass
class ModelArtifact:
    """A trained ranker: the booster, the feature names it was trained on and its metrics.

    An uplift model (``models.uplift.TLearner``) has two more boosters on the same features:
    ``baseline`` (P(convert | no action)) and ``opt_out`` (P(opt-out | contact))."""

    version: str
    booster: xgb.Booster
    feature_names: tuple[str, ...]
    feature_set_version: int = FEATURE_SET_VERSION
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = "candidate"
    created_at: str = ""
    parent: str | None = None
    baseline: xgb.Booster | None = None
    opt_out: xgb.Booster | None = None
    #: an uplift model's calibration lines per offer (``models.uplift.calibrate``)
    lines: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``uplift`` (three boosters) or ``response`` (one)."""
        return "uplift" if self.baseline is not None else "response"

    def check_compatible(self) -> FeatureSpec:
        """The feature spec to serve with; ConfigError if this engine cannot build the features."""
        if self.feature_set_version != FEATURE_SET_VERSION:
            raise ConfigError(
                f"model {self.version} was trained on feature set {self.feature_set_version}; "
                f"this engine builds feature set {FEATURE_SET_VERSION}: retrain it"
            )
        if (self.baseline is None) != (self.opt_out is None):
            raise ConfigError(f"model {self.version}: an uplift model needs both of its boosters")
        for booster in (self.booster, self.baseline, self.opt_out):
            names = tuple(booster.feature_names or ()) if booster is not None else ()
            if names and names != self.feature_names:
                raise ConfigError(
                    f"model {self.version}: the booster's feature names differ from its metadata"
                )
        try:
            return FeatureSpec.from_names(self.feature_names)
        except ConfigError as exc:
            raise ConfigError(f"model {self.version}: {exc}") from exc

    def meta(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "feature_names": list(self.feature_names),
            "feature_set_version": self.feature_set_version,
            "metrics": self.metrics,
            "status": self.status,
            "created_at": self.created_at,
            "parent": self.parent,
            "kind": self.kind,
            "uplift_lines": {k: list(v) for k, v in self.lines.items()},
        }


class ModelRegistry:
    """Versions of the ranker model under one root."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = resolve(uri)
        self.fs.create_dir(self.root, recursive=True)

    def path_of(self, *parts: str) -> str:
        """Path of a file in the registry, e.g. ``path_of(version, "meta.json")``."""
        return "/".join([self.root.rstrip("/"), *parts])

    def versions(self) -> list[str]:
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        names = [info.base_name for info in self.fs.get_file_info(selector)]
        found = [n for n in names if _VERSION.match(n)]
        return sorted(found, key=lambda n: int(n[1:]))

    def clear(self) -> None:
        """Remove every version and the champion pointer: a registry that starts from nothing
        (each simulated Kairos run learns from its own log only)."""
        self.fs.delete_dir_contents(self.root, missing_dir_ok=True)

    def _next_version(self) -> str:
        existing = self.versions()
        number = int(existing[-1][1:]) + 1 if existing else 1
        return f"v{number:04d}"

    def register(
        self,
        booster: xgb.Booster,
        feature_names: tuple[str, ...],
        metrics: dict[str, Any],
        parent: str | None = None,
        uplift: tuple[xgb.Booster, xgb.Booster] | None = None,
        lines: dict[str, tuple[float, float]] | None = None,
    ) -> ModelArtifact:
        """Store a new version (status candidate) and return it. ``uplift``: the (baseline,
        opt-out) boosters of an uplift model, whose ``booster`` is P(convert | offer), and
        ``lines`` its calibration (``models.uplift.calibrate``)."""
        artifact = ModelArtifact(
            version=self._next_version(),
            booster=booster,
            feature_names=tuple(feature_names),
            metrics=metrics,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            parent=parent,
            baseline=uplift[0] if uplift else None,
            opt_out=uplift[1] if uplift else None,
            lines=dict(lines or {}),
        )
        artifact.check_compatible()
        self.fs.create_dir(self.path_of(artifact.version), recursive=True)
        parts = {"model": booster, **dict(zip(UPLIFT_PARTS, uplift or (), strict=False))}
        for stem, part in parts.items():
            with self.fs.open_output_stream(self.path_of(artifact.version, f"{stem}.json")) as out:
                out.write(bytes(part.save_raw(raw_format="json")))
        self._write_meta(artifact)  # last: a version without its meta is not loaded
        return artifact

    def _write_meta(self, artifact: ModelArtifact) -> None:
        with self.fs.open_output_stream(self.path_of(artifact.version, "meta.json")) as out:
            out.write(json.dumps(artifact.meta(), indent=2, default=float).encode())

    def load(self, version: str) -> ModelArtifact:
        """A stored version; ConfigError naming the version if it is missing or unreadable."""
        if not _VERSION.match(version):
            raise ConfigError(f"'{version}' is not a model version such as v0001")
        try:
            with self.fs.open_input_stream(self.path_of(version, "meta.json")) as f:
                meta = json.loads(f.read())
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(f"model {version} is not in the registry at {self.uri}") from exc
        stems = ("model", *(UPLIFT_PARTS if meta.get("kind") == "uplift" else ()))
        boosters = [self._booster(version, stem) for stem in stems]
        return ModelArtifact(
            version=meta["version"],
            booster=boosters[0],
            baseline=boosters[1] if len(boosters) > 1 else None,
            opt_out=boosters[2] if len(boosters) > 1 else None,
            lines={k: (float(a), float(b)) for k, (a, b) in meta.get("uplift_lines", {}).items()},
            feature_names=tuple(meta["feature_names"]),
            feature_set_version=int(meta["feature_set_version"]),
            metrics=meta.get("metrics", {}),
            status=meta.get("status", "candidate"),
            created_at=meta.get("created_at", ""),
            parent=meta.get("parent"),
        )

    def _booster(self, version: str, stem: str) -> xgb.Booster:
        try:
            with self.fs.open_input_stream(self.path_of(version, f"{stem}.json")) as f:
                raw = f.read()
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(f"model {version}: {stem}.json is missing at {self.uri}") from exc
        booster = xgb.Booster()
        try:
            booster.load_model(bytearray(raw))
        except xgb.core.XGBoostError as exc:
            raise ConfigError(f"model {version}: {stem}.json cannot be loaded: {exc}") from exc
        return booster

    def update(self, artifact: ModelArtifact) -> None:
        """Rewrite a version's metadata (status, promotion decision)."""
        self._write_meta(artifact)

    def champion(self) -> str | None:
        try:
            with self.fs.open_input_stream(self.path_of("CHAMPION")) as f:
                text = f.read().decode().strip()
        except (FileNotFoundError, OSError):
            return None
        return text or None

    def set_champion(self, version: str) -> None:
        new = self.load(version)
        old = self.champion()
        if old and old != version:
            previous = self.load(old)
            previous.status = "retired"
            self.update(previous)
        new.status = "champion"
        self.update(new)
        with self.fs.open_output_stream(self.path_of("CHAMPION")) as out:
            out.write(version.encode())
