"""Keyed pseudonyms for external identifiers (phone numbers, emails, device ids, cookies).

A pseudonym is the first 8 bytes of keyed BLAKE2b over the identifier: without the key it
cannot be recomputed from a guessed phone number, and every process holding the key agrees.
Batches hash each distinct identifier once (Parquet and Arrow dictionaries give the distinct
values for free) and remember recent ones in a bounded cache.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class Pseudonymizer:
    """Turns external identifiers into stable 64-bit customer keys."""

    def __init__(self, key: str, cache_size: int = 1_000_000) -> None:
        self._key = hashlib.blake2b(key.encode(), digest_size=32).digest()
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size
        #: key tables of recent Arrow dictionaries; slices of one column share its dictionary
        self._tables: dict[tuple[int, ...], np.ndarray] = {}

    def key_of(self, identifier: str) -> int:
        """The pseudonym of one identifier."""
        cached = self._cache.get(identifier)
        if cached is not None:
            return cached
        digest = hashlib.blake2b(identifier.encode(), digest_size=8, key=self._key).digest()
        value = int.from_bytes(digest, "little")
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # cheap bound: a full cache is rebuilt from the live traffic
        self._cache[identifier] = value
        return value

    def keys_of(self, identifiers: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Pseudonyms of a column of identifiers (plain or dictionary-encoded), as uint64."""
        if isinstance(identifiers, pa.ChunkedArray):
            parts = [self.keys_of(chunk) for chunk in identifiers.chunks]
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        if not pa.types.is_dictionary(identifiers.type):
            identifiers = pc.dictionary_encode(identifiers)
        table = self._dictionary_keys(identifiers.dictionary)
        indices = identifiers.indices.to_numpy(zero_copy_only=False)
        return table[indices]

    def _dictionary_keys(self, dictionary: pa.Array) -> np.ndarray:
        buffers = dictionary.buffers()
        ident = (
            len(dictionary),
            dictionary.offset,
            *(b.address if b is not None else 0 for b in buffers),
        )
        table = self._tables.get(ident)
        if table is None:
            key_of = self.key_of
            distinct = dictionary.to_pylist()
            table = np.fromiter((key_of(v) for v in distinct), dtype=np.uint64, count=len(distinct))
            if len(self._tables) >= 8:
                self._tables.pop(next(iter(self._tables)))
            self._tables[ident] = table
        return table
