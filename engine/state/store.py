"""The golden record store: one typed numpy column per attribute, one slot per customer.

Customers are found through an open-addressing hash index over their 64-bit keys
(``KeyIndex``), so looking up a whole batch is a few vector operations. Profile and
aggregate columns take their dtype and default from ``engine.fields``. Text attributes (time
zone, device model) are stored as small integer ids into a string pool. Per-rule state lives
in extra int64 columns keyed by rule. The store snapshots to one Arrow table and restores from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.errors import StateError
from engine.fields import BY_NAME, names
from engine.state.keyindex import KeyIndex

NEVER = np.iinfo(np.int64).min // 4  # "no time yet" for event-time columns (ms)


@dataclass(frozen=True)
class Column:
    dtype: np.dtype
    default: float | int
    doc: str


def _field_column(name: str) -> Column:
    """The golden-record column of a profile or aggregate field (``engine.fields``)."""
    f = BY_NAME[name]
    if f.store is None:
        raise StateError(f"field '{name}' has no golden-record column")
    return Column(f.store, f.default, f.doc)


COLUMNS: dict[str, Column] = {
    # profile (from profile_update events)
    **{name: _field_column(name) for name in names("profile")},
    # consent (marketing purpose), bitmasks over channels
    "consent_granted": Column(np.dtype(np.uint8), 0, "channels with consent granted"),
    "consent_withdrawn": Column(np.dtype(np.uint8), 0, "channels with consent withdrawn"),
    # aggregates
    "cycle_id": Column(
        np.dtype(np.int32), -1, "billing cycle (months since 1970) of cycle_usage_mb"
    ),
    **{name: _field_column(name) for name in names("aggregate")},
    "last_lat": Column(np.dtype(np.float64), np.nan, "last known latitude"),
    "last_lon": Column(np.dtype(np.float64), np.nan, "last known longitude"),
    "last_event_ms": Column(np.dtype(np.int64), NEVER, "event time of the newest applied event"),
    "event_count": Column(np.dtype(np.int32), 0, "events applied"),
}

PROFILE_COLUMNS = names("profile")
#: columns added after snapshots were first written: an older snapshot without one restores
#: with the column's default (any other missing column is an error)
ADDED_COLUMNS = frozenset({"customer_value"})
STRING_COLUMNS = ("tz", "device_model")
RULE_PREFIX = "rule:"
DECISION_PREFIX = "decision:"


class StringPool:
    """Interned strings <-> small ids; id 0 is 'UTC' and id 1 is '' so defaults mean something."""

    def __init__(self, values: list[str] | None = None) -> None:
        self.values: list[str] = list(values) if values else ["UTC", ""]
        self._ids = {v: i for i, v in enumerate(self.values)}

    def ids_of(self, strings: list[str | None]) -> np.ndarray:
        """Ids of ``strings`` (None counts as ''), interning new ones; one lookup per distinct."""
        distinct, inverse = np.unique(
            np.array(["" if s is None else s for s in strings], dtype=object), return_inverse=True
        )
        ids = np.empty(len(distinct), dtype=np.int16)
        for i, key in enumerate(distinct.tolist()):
            found = self._ids.get(key)
            if found is None:
                if len(self.values) >= np.iinfo(np.int16).max:
                    raise StateError("string pool is full (32767 distinct time zones / models)")
                found = len(self.values)
                self.values.append(key)
                self._ids[key] = found
            ids[i] = found
        return ids[inverse.reshape(-1)]

    def strings_of(self, ids: np.ndarray) -> np.ndarray:
        table = np.array(self.values, dtype=object)
        return table[ids]


class CustomerStore:
    """Golden records of one shard's customers, column by column."""

    def __init__(self, capacity: int = 1024) -> None:
        self.size = 0
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.cols: dict[str, np.ndarray] = {
            name: np.full(capacity, c.default, dtype=c.dtype) for name, c in COLUMNS.items()
        }
        self.rule_state: dict[str, np.ndarray] = {}
        #: decision state: last contact times ("contact:0" newest) and offer cooldowns ("offer:id")
        self.decision_state: dict[str, np.ndarray] = {}
        self.strings = StringPool()
        self.index = KeyIndex()

    @property
    def capacity(self) -> int:
        return len(self.keys)

    def _grow(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        new = max(needed, cap + cap // 2)  # 1.5x: amortized O(1), at most a third spare
        self.keys = np.resize(self.keys, new)
        for name, arr in self.cols.items():
            grown = np.full(new, COLUMNS[name].default, dtype=arr.dtype)
            grown[:cap] = arr[:cap]
            self.cols[name] = grown
        for state in (self.rule_state, self.decision_state):
            for key, arr in state.items():
                grown = np.full(new, NEVER, dtype=np.int64)
                grown[:cap] = arr[:cap]
                state[key] = grown

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, or -1 where the customer is unknown."""
        return self.index.lookup(keys)

    def slots_for(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, creating records for new customers."""
        slots = self.lookup(keys)
        missing = slots < 0
        if missing.any():
            new_keys, which = np.unique(keys[missing], return_inverse=True)
            start = self.size
            self._grow(start + new_keys.size)
            new_slots = np.arange(start, start + new_keys.size, dtype=np.int64)
            self.keys[start : start + new_keys.size] = new_keys
            self.size += new_keys.size
            self.index.insert(new_keys, new_slots)
            slots[missing] = new_slots[which]
        return slots

    def ensure_rules(self, state_keys: list[str]) -> None:
        """Keep state of rules still present, start new ones fresh, drop removed ones."""
        kept = {k: v for k, v in self.rule_state.items() if k in state_keys}
        for key in state_keys:
            if key not in kept:
                kept[key] = np.full(self.capacity, NEVER, dtype=np.int64)
        self.rule_state = kept

    def ensure_decision_state(self, keys: list[str]) -> None:
        """Like ``ensure_rules`` for the decision state (contact times, offer cooldowns)."""
        kept = {k: v for k, v in self.decision_state.items() if k in keys}
        for key in keys:
            if key not in kept:
                kept[key] = np.full(self.capacity, NEVER, dtype=np.int64)
        self.decision_state = kept

    def nbytes(self) -> int:
        """Bytes of customer state, index included (allocated capacity, not just used)."""
        total = self.keys.nbytes + self.index.nbytes
        total += sum(a.nbytes for a in self.cols.values())
        total += sum(a.nbytes for a in self.rule_state.values())
        total += sum(a.nbytes for a in self.decision_state.values())
        return total

    def live_nbytes_per_customer(self) -> float:
        """Bytes per customer of the columns and index, independent of spare capacity."""
        # the key index holds at least two buckets (key + slot) per customer
        per = self.keys.itemsize + 2 * (8 + 8)
        per += sum(a.itemsize for a in self.cols.values())
        per += sum(a.itemsize for a in self.rule_state.values())
        per += sum(a.itemsize for a in self.decision_state.values())
        return float(per)

    def to_arrow(self, copy: bool = False) -> pa.Table:
        """All records as one table: key, the columns, rule state; the string pool in metadata.

        The table shares the store's memory (numeric columns are wrapped, not copied), so it
        changes with the next step; ``copy`` makes it independent (an asynchronous checkpoint
        writes it while steps go on)."""
        n = self.size

        def column(arr: np.ndarray) -> pa.Array:
            return pa.array(arr[:n].copy() if copy else arr[:n])

        arrays = {"customer_key": column(self.keys)}
        for name, arr in self.cols.items():
            arrays[name] = column(arr)
        for key, arr in self.rule_state.items():
            arrays[RULE_PREFIX + key] = column(arr)
        for key, arr in self.decision_state.items():
            arrays[DECISION_PREFIX + key] = column(arr)
        table = pa.table(arrays)
        meta = {b"kairos.strings": "\x1f".join(self.strings.values).encode()}
        return table.replace_schema_metadata(meta)

    @classmethod
    def from_arrow(cls, table: pa.Table) -> CustomerStore:
        """Rebuild a store from ``to_arrow``'s table."""
        store = cls(capacity=max(1024, table.num_rows))
        meta = table.schema.metadata or {}
        if b"kairos.strings" in meta:
            store.strings = StringPool(meta[b"kairos.strings"].decode().split("\x1f"))
        if "customer_key" not in table.column_names:
            raise StateError("snapshot table has no customer_key column")
        keys = table.column("customer_key").to_numpy()
        n = keys.size
        store.keys[:n] = keys
        store.size = n
        for name in COLUMNS:
            if name in table.column_names:
                store.cols[name][:n] = table.column(name).to_numpy()
            elif name not in ADDED_COLUMNS:
                raise StateError(f"snapshot table has no column '{name}'")
            # else: a column added since the snapshot was written starts at its default
        for name in table.column_names:
            for prefix, state in (
                (RULE_PREFIX, store.rule_state),
                (DECISION_PREFIX, store.decision_state),
            ):
                if name.startswith(prefix):
                    arr = np.full(store.capacity, NEVER, dtype=np.int64)
                    arr[:n] = table.column(name).to_numpy()
                    state[name[len(prefix) :]] = arr
        if np.unique(keys).size != n:
            raise StateError("snapshot table holds a customer_key more than once")
        store.index.insert(keys, np.arange(n, dtype=np.int64))
        return store
