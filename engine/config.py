"""The one settings object, loaded at the composition root (env prefix KAIROS_) and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PSEUDONYM_KEY = "kairos-development-key-change-me"


class EngineSettings(BaseSettings):
    """Settings of the engine core. Every field can be set as KAIROS_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="KAIROS_", frozen=True, extra="forbid")

    key_groups: int = Field(4096, ge=1, le=65536, description="Fixed number of key groups.")
    shards: int = Field(2, ge=1, le=4096, description="Number of shard actors.")
    allowed_lateness_s: float = Field(
        60.0, ge=0, description="Event-time lateness tolerated; older events are dead-lettered."
    )
    dedupe_window_s: float = Field(
        3600.0, ge=0, description="Event-time span over which duplicate event ids are detected."
    )
    micro_batch_max_events: int = Field(
        65536, ge=1, description="A micro-batch closes at this size."
    )
    micro_batch_deadline_ms: float = Field(
        5.0, gt=0, description="... or this long after it opened."
    )
    decision_step_max_events: int = Field(
        16384,
        ge=1,
        description="With decisions on, a shard applies what it releases in steps of at most "
        "this many events (rules, decisions, write-back): one scoring request per step, and the "
        "time from a trigger to its decision bounded whatever the micro-batch size.",
    )
    max_in_flight_per_shard: int = Field(
        2, ge=1, description="Backpressure: calls in flight per shard."
    )
    pseudonym_key: str = Field(
        DEFAULT_PSEUDONYM_KEY, min_length=8, description="Secret key for identifier pseudonyms."
    )
    data_dir: Path = Field(
        Path("kairos-data"), description="Local root for data, triggers, snapshots."
    )

    @model_validator(mode="after")
    def _dedupe_covers_lateness(self) -> EngineSettings:
        if self.dedupe_window_s < self.allowed_lateness_s:
            raise ValueError(
                f"dedupe_window_s ({self.dedupe_window_s}) must be at least allowed_lateness_s "
                f"({self.allowed_lateness_s}): a duplicate that is not late must be recognised"
            )
        return self

    @property
    def allowed_lateness_ms(self) -> int:
        return round(self.allowed_lateness_s * 1000)

    @property
    def dedupe_window_ms(self) -> int:
        return round(self.dedupe_window_s * 1000)
