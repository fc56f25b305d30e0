"""Durations in rule files: '24h', '30m', '90s', '7d', '250ms' or a number of seconds."""

from __future__ import annotations

import math
import re

from engine.limits import MAX_DURATION_MS
from engine.units import DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": SECOND_MS, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS, None: SECOND_MS}


def parse_duration_ms(value: str | float) -> int:
    """'24h', '30m', '90s', '7d', '250ms' or a number of seconds, as milliseconds; ValueError
    unless it is within [0, MAX_DURATION_MS] (ten years), so every duration fits the engine's
    int64 event-time arithmetic."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 24h, 30m or 90s")
    if isinstance(value, int | float):
        seconds = float(value) if abs(value) < 1e300 else math.inf
        ms = seconds * 1000
    else:
        text = str(value)
        match = _DURATION.match(text) if len(text) <= 64 else None
        if not match:
            raise ValueError(f"'{text[:64]}' is not a duration such as 24h, 30m, 90s or 7d")
        ms = float(match.group(1)) * _UNIT_MS[match.group(2)]
    if not (math.isfinite(ms) and 0 <= ms <= MAX_DURATION_MS):
        raise ValueError(
            f"duration {str(value)[:64]!r} is outside 0 .. 3650d (the limit max_duration_ms)"
        )
    return round(ms)
