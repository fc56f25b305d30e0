"""The central ledger of per-key rate limits (``engine.governance.ratelimit``) as a tiny actor.

The gateway owns it (it dies and comes back with the gateway; its buckets then start full) and
hands it to API replicas with the rest of the routing. A replica leases tokens from it, about
20 ms of a key's rate at a time, so the actor sees a call per lease, not per request.
"""

from __future__ import annotations

import time

import ray

from engine.governance.ratelimit import TokenBuckets


@ray.remote(num_cpus=0, max_restarts=-1)
class RateLimiterActor:
    def __init__(self) -> None:
        self.buckets = TokenBuckets()

    def take(self, key: str, rate_per_s: float, want: int) -> tuple[int, float]:
        """Up to ``want`` tokens of ``key``'s bucket; (granted, seconds until one more)."""
        return self.buckets.take(key, rate_per_s, want, time.monotonic())
