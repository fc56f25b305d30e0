"""Stable partitioning: customer key -> key group -> shard, the same in every process.

Customer keys are 64-bit pseudonyms. A fixed integer mix (the splitmix64 finalizer) spreads
them over a fixed number of key groups; shards own contiguous ranges of key groups, so
rescaling moves whole key groups. Python's ``hash()`` is never used: it differs per process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.errors import ConfigError

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def rule_salt(rule_id: str) -> int:
    """A rule's 64-bit salt for ids derived from (event, rule): decision ids, deadline ids."""
    return int.from_bytes(hashlib.blake2b(rule_id.encode(), digest_size=8).digest(), "little")


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over uint64 keys: a bijection with good avalanche."""
    z = np.asarray(keys, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


def key_groups_of(keys: np.ndarray, key_groups: int) -> np.ndarray:
    """The key group (0 .. key_groups-1) of each customer key, as uint16."""
    return (mix64(keys) % np.uint64(key_groups)).astype(np.uint16)


@dataclass(frozen=True)
class ShardMap:
    """Which shard owns which key groups: shard i owns one contiguous range."""

    key_groups: int
    shards: int

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= self.key_groups:
            raise ConfigError(
                f"shards must be between 1 and key_groups ({self.key_groups}), got {self.shards}"
            )

    def range_of(self, shard: int) -> tuple[int, int]:
        """The key groups [start, stop) that ``shard`` owns."""
        return (
            shard * self.key_groups // self.shards,
            (shard + 1) * self.key_groups // self.shards,
        )

    def owner_table(self) -> np.ndarray:
        """owner[key_group] = shard, for vectorized lookup."""
        owner = np.empty(self.key_groups, dtype=np.int32)
        for s in range(self.shards):
            start, stop = self.range_of(s)
            owner[start:stop] = s
        return owner

    def shard_of_keys(self, keys: np.ndarray) -> np.ndarray:
        return self.owner_table()[key_groups_of(keys, self.key_groups)]

    def split(self, table: pa.Table) -> dict[int, pa.Table]:
        """The rows of ``table`` (a ``customer_key`` column) by owning shard, in their order."""
        keys = np.asarray(table.column("customer_key").to_numpy(), dtype=np.uint64)
        owners = self.shard_of_keys(keys)
        return {int(s): table.filter(pa.array(owners == s)) for s in np.unique(owners)}
