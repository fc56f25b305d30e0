"""The batches of the kill test (``test_serve_killed.py``), made from their number alone, so
the test makes again what Locust sent (``retrying_locustfile.py``)."""

from __future__ import annotations

import os
import random
import time
from typing import Any

BATCH = int(os.environ.get("KAIROS_KT_BATCH", "200"))
CUSTOMERS = int(os.environ.get("KAIROS_KT_CUSTOMERS", "2000"))
BASE_MS = int(os.environ.get("KAIROS_KT_BASE_MS", "0")) or int(time.time() * 1000)


def batch(number: int, base_ms: int = BASE_MS) -> list[dict[str, Any]]:
    """The events of the test's batch ``number``: at ``base_ms + number``, one per customer
    (so no customer has two events at one time: its order is its time order, whatever the
    arrival), ``BATCH`` customers in a row."""
    rng = random.Random(number)
    return [
        {
            "event_id": number * 1_000 + i,
            "customer_id": f"kt-{(number * BATCH + i) % CUSTOMERS}",
            "kind": "usage",
            "ts": base_ms + number,
            "mb": round(rng.uniform(0.1, 50.0), 3),
        }
        for i in range(BATCH)
    ]
