"""Helpers of the fault tests that drive a running service over HTTP."""

from __future__ import annotations

import time
from typing import Any

from tests.keys import http


def settle(url: str, timeout: float = 90.0) -> dict[str, Any]:
    """Wait until the engine has read the whole log, nothing is pending and the applied count
    stops moving; its stats."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = http.get(f"{url}/v1/stats", timeout=30)
        if r.status_code == 200:
            stats = r.json()
            done = stats["log"]["lag"] == 0 and stats["pending"] == 0
            if done and last.get("applied") == stats["applied"]:
                return dict(stats)
            last = stats
        time.sleep(0.5)
    raise AssertionError(f"the engine did not settle: {last}")
