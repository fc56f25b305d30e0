"""Billing cycles start on the cycle day at local midnight, month-length aware."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from engine.calendar import billing_cycle, days_left, local_ms
from engine.units import DAY_MS
from tests.conftest import ms


def cycle(local_ms_: int, day: int) -> tuple[int, float]:
    c, nxt = billing_cycle(np.array([local_ms_]), np.array([day]))
    return int(c[0]), float(days_left(np.array([local_ms_]), nxt)[0])


def test_cycle_day_31_starts_on_the_last_day_of_short_months() -> None:
    feb = (2026 - 1970) * 12 + 1
    assert cycle(ms(2026, 2, 27, 12), 31)[0] == feb - 1  # still January's cycle
    assert cycle(ms(2026, 2, 28, 0), 31)[0] == feb  # 28 Feb 2026 starts February's
    assert cycle(ms(2026, 4, 30, 0), 31)[0] == feb + 2


def test_days_left_counts_to_next_cycle_start() -> None:
    c, left = cycle(ms(2026, 3, 4, 12), 5)
    assert left == pytest.approx(0.5)
    c2, left2 = cycle(ms(2026, 3, 5, 0), 5)
    assert c2 == c + 1 and left2 == pytest.approx(31.0)


def test_local_time_follows_daylight_saving() -> None:
    ts = np.array([ms(2026, 1, 15, 12), ms(2026, 7, 15, 12)])
    local = local_ms(ts, np.array([2, 2], dtype=np.int16), ["UTC", "", "Europe/Berlin"])
    assert list((local - ts) // 3_600_000) == [1, 2]
    assert (local_ms(ts, np.array([0, 0]), ["UTC"]) == ts).all()
    assert DAY_MS == 86_400_000


@pytest.mark.parametrize(
    "start",
    [
        "2026-03-29T00:30:00+00:00",  # Berlin and London spring forward inside the span
        "2026-10-25T00:30:00+00:00",  # and fall back
        "2026-07-01T00:00:00+00:00",  # no change: one offset per zone
        "2026-06-01T00:00:00+00:00",  # a span of 10 days: converted event by event
    ],
)
def test_local_time_matches_the_tz_database_event_by_event(start) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    zones = ["UTC", "", "Europe/Berlin", "Europe/London", "Asia/Kolkata", "America/St_Johns"]
    rng = np.random.default_rng(1)
    t0 = int(datetime.fromisoformat(start).timestamp() * 1000)
    span = 10 * DAY_MS if start.startswith("2026-06") else 3 * 3_600_000
    ts = np.sort(t0 + rng.integers(0, span, 5_000))
    tz = rng.integers(0, len(zones), ts.size).astype(np.int16)
    expected = ts.copy()
    for i, (t, z) in enumerate(zip(ts.tolist(), tz.tolist(), strict=True)):
        if zones[z] not in ("UTC", ""):
            stamp = pa.array([t], type=pa.timestamp("ms", tz=zones[z]))
            expected[i] = pc.local_timestamp(stamp).cast(pa.int64()).to_numpy()[0]
    np.testing.assert_array_equal(local_ms(ts, tz, zones), expected)
