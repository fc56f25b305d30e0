"""Per-key rate limits that hold across API replicas: one central token bucket per key, and
small leases of its tokens held by each replica.

A limit kept by each replica alone (what a Serve middleware gives) lets a key through N times
over with N replicas. Asking a central actor on every request would cost a round trip (about a
millisecond) each. So a replica takes tokens in leases of about 20 ms of the key's rate and
spends them locally: the central bucket stays exact, and the error is at most the unspent leases
(``lease_size - 1`` per replica), a fraction of a second's worth.

``TokenBuckets`` is the central ledger (in ``actors.ratelimit.RateLimiterActor``);
``Allowances`` is a replica's purse. Both take the time as an argument: pure and testable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: a lease covers this much of a key's rate
LEASE_S = 0.02
#: a replica that was refused asks again no sooner than this (the refusal is cached)
REFUSAL_CACHE_S = 0.05


def lease_size(rate_per_s: float) -> int:
    return max(1, int(rate_per_s * LEASE_S))


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """Token buckets by key: ``rate_per_s`` refill, a burst of one second's worth."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, rate_per_s: float, want: int, now: float) -> tuple[int, float]:
        """Grant up to ``want`` tokens; (granted, seconds until one more is there)."""
        burst = max(rate_per_s, 1.0)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate_per_s)
        bucket.at = now
        granted = min(want, int(bucket.tokens))
        bucket.tokens -= granted
        wait = 0.0 if bucket.tokens >= 1 else (1.0 - bucket.tokens) / max(rate_per_s, 1e-9)
        return granted, wait


class Allowances:
    """A replica's leased tokens by key, and refusals it remembers for a moment."""

    def __init__(self) -> None:
        self._tokens: dict[str, int] = {}
        self._refused_until: dict[str, float] = {}

    def spend(self, key: str, now: float) -> tuple[bool, float | None]:
        """(spent one leased token, or None / seconds to wait if refused a moment ago)."""
        if self._tokens.get(key, 0) > 0:
            self._tokens[key] -= 1
            return True, None
        until = self._refused_until.get(key, 0.0)
        return False, (until - now if until > now else None)

    def left(self, key: str) -> int:
        return self._tokens.get(key, 0)

    def add(self, key: str, granted: int, wait: float, now: float) -> None:
        """Book a lease fetched ahead of need: its tokens, or the refusal for a moment."""
        if granted > 0:
            self._tokens[key] = self._tokens.get(key, 0) + granted
        else:
            self._refused_until[key] = now + min(wait, REFUSAL_CACHE_S)


def retry_after(wait_s: float) -> int:
    """Whole seconds for a ``Retry-After`` header (at least 1)."""
    return max(1, math.ceil(wait_s))
