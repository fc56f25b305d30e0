"""Keyed pseudonyms for external identifiers (phone numbers, emails, device ids, cookies).

A pseudonym is SipHash-2-4 of the identifier under a 128-bit key derived from the configured
secret: without the secret it cannot be recomputed from a guessed phone number, and every
process holding it agrees. Batches are hashed vectorized; a dictionary-encoded column (as
Parquet gives it) hashes each distinct identifier once.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from engine.governance.siphash import siphash24


class Pseudonymizer:
    """Turns external identifiers into stable 64-bit customer keys."""

    def __init__(self, key: str) -> None:
        self._key = hashlib.blake2b(
            key.encode(), digest_size=16, person=b"kairos-pseudonym"
        ).digest()
        #: key tables of recent Arrow dictionaries; slices of one column share its dictionary
        self._tables: dict[tuple[int, ...], np.ndarray] = {}

    def key_of(self, identifier: str) -> int:
        """The pseudonym of one identifier."""
        return int(siphash24(pa.array([identifier], type=pa.string()), self._key)[0])

    def keys_of(self, identifiers: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Pseudonyms of a column of identifiers (plain or dictionary-encoded), as uint64."""
        if isinstance(identifiers, pa.ChunkedArray):
            parts = [self.keys_of(chunk) for chunk in identifiers.chunks]
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        if not pa.types.is_dictionary(identifiers.type):
            return siphash24(identifiers, self._key)
        table = self._dictionary_keys(identifiers.dictionary)
        return table[identifiers.indices.to_numpy(zero_copy_only=False)]

    def _dictionary_keys(self, dictionary: pa.Array) -> np.ndarray:
        ident = (
            len(dictionary),
            dictionary.offset,
            *(b.address if b is not None else 0 for b in dictionary.buffers()),
        )
        table = self._tables.get(ident)
        if table is None:
            table = siphash24(dictionary, self._key)
            if len(self._tables) >= 8:
                self._tables.pop(next(iter(self._tables)))
            self._tables[ident] = table
        return table
