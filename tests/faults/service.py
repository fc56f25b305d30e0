"""Helpers of the fault tests that drive a running service over HTTP."""

from __future__ import annotations

import time
from typing import Any

from tests.keys import http


def settle(url: str, timeout: float = 90.0) -> dict[str, Any]:
    """Wait until the engine has read the whole log, every event it ingested has come out of
    the shards (applied, a duplicate, or failed: none still in an open micro-batch or a call,
    none pending for the watermark) and the applied count stops moving; its stats."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = http.get(f"{url}/v1/stats", timeout=30)
        if r.status_code == 200:
            stats = r.json()
            out = stats["applied"] + stats["duplicates"] + stats["failed"]
            done = stats["log"]["lag"] == 0 and stats["pending"] == 0
            done = done and stats["ingested"] == out
            if done and last.get("applied") == stats["applied"]:
                return dict(stats)
            last = stats
        time.sleep(0.5)
    raise AssertionError(f"the engine did not settle: {last}")
