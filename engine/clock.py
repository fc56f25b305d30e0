"""Wall-clock time behind a protocol, so nothing in the engine calls time.time() directly."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Source of wall-clock time (event time comes from the events themselves)."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch, UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a monotonic clock, for deadlines and latencies."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.perf_counter()


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, start_ms: int = 0) -> None:
        self._ms = start_ms
        self._mono = 0.0

    def now_ms(self) -> int:
        return self._ms

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._ms += round(seconds * 1000)
        self._mono += seconds


def utc_ms(value: datetime) -> int:
    """A timezone-aware datetime as epoch milliseconds."""
    if value.tzinfo is None:
        raise ValueError(f"datetime {value.isoformat()} has no time zone")
    return round(value.timestamp() * 1000)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
