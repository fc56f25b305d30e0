"""Calendar math on arrays of event times: local time per time zone and billing cycles.

A billing cycle starts at local midnight on the customer's cycle day; in months shorter than
the cycle day it starts on the month's last day (cycle day 31 starts on 30 April, 28 or 29
February). A cycle is identified by the month it starts in (months since January 1970).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.units import DAY_MS, HOUR_MS


def local_ms(ts_ms: np.ndarray, tz_ids: np.ndarray, zone_names: list[str]) -> np.ndarray:
    """Wall-clock time (as epoch ms of the local date-time) of each UTC event time.

    Uses the tz database through Arrow. Per distinct zone in the batch: when the zone's UTC
    offset is the same at its earliest and latest event and at the hourly points between (no
    daylight-saving change inside the batch, the usual case for a micro-batch), every event
    gets that one offset; otherwise each event is converted on its own.
    """
    out = np.asarray(ts_ms, dtype=np.int64).copy()
    if out.size == 0:
        return out
    zones = np.unique(tz_ids)
    for zone in zones:
        name = zone_names[int(zone)]
        if name in ("UTC", ""):
            continue
        mask = tz_ids == zone if zones.size > 1 else slice(None)
        times = out[mask]
        offset = _fixed_offset(int(times.min()), int(times.max()), name)
        if offset is not None:
            out[mask] = times + offset
            continue
        stamps = pa.array(times, type=pa.timestamp("ms", tz=name))
        out[mask] = pc.local_timestamp(stamps).cast(pa.int64()).to_numpy()
    return out


def _fixed_offset(first_ms: int, last_ms: int, zone: str) -> int | None:
    """The zone's UTC offset (ms) if it is the same over [first_ms, last_ms], else None.

    Offsets change at most a few times a year and never twice within hours, so sampling the
    span hourly (a handful of points for a micro-batch) finds any change inside it.
    """
    if last_ms - first_ms > 7 * DAY_MS:
        return None
    points = np.append(np.arange(first_ms, last_ms, HOUR_MS, dtype=np.int64), last_ms)
    local = pc.local_timestamp(pa.array(points, type=pa.timestamp("ms", tz=zone)))
    offsets = local.cast(pa.int64()).to_numpy() - points
    return int(offsets[0]) if (offsets == offsets[0]).all() else None


#: day number (since 1970-01-01) of the first of each month, for months 1970-01 .. 2200-12:
#: a table lookup instead of datetime64 conversions (event times are validated to that range)
_FIRST_OF_MONTH = np.arange(0, 231 * 12 + 1).astype("datetime64[M]").astype("datetime64[D]")
_FIRST_DAY = _FIRST_OF_MONTH.astype(np.int64)


def _month_start_day(months: np.ndarray) -> np.ndarray:
    months = np.asarray(months, dtype=np.int64)
    if months.size and months.min() >= 0 and months.max() < _FIRST_DAY.size:
        return _FIRST_DAY[months]
    return months.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)


def cycle_start_day(months: np.ndarray, cycle_day: np.ndarray) -> np.ndarray:
    """Local day number (days since 1970-01-01) on which the cycle starting in ``months`` starts."""
    first = _month_start_day(months)
    length = _month_start_day(months + 1) - first
    return first + np.minimum(np.clip(cycle_day, 1, 31), length) - 1


def billing_cycle(local: np.ndarray, cycle_day: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cycle id, local ms at which the next cycle starts) for each local time."""
    day = local // DAY_MS
    month = day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
    cd = cycle_day.astype(np.int64)
    cycle = np.where(day >= cycle_start_day(month, cd), month, month - 1)
    next_start = cycle_start_day(cycle + 1, cd) * DAY_MS
    return cycle.astype(np.int32), next_start


def days_left(local: np.ndarray, next_start_ms: np.ndarray) -> np.ndarray:
    """Days (fractional) from each local time to the start of the next billing cycle."""
    return (next_start_ms - local) / DAY_MS


def local_day(local: np.ndarray) -> np.ndarray:
    return local // DAY_MS


def local_hour(local: np.ndarray) -> np.ndarray:
    return ((local % DAY_MS) // HOUR_MS).astype(np.float64)
