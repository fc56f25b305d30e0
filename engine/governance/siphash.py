"""SipHash-2-4, vectorized with numpy over Arrow string arrays.

SipHash (Aumasson and Bernstein, 2012) is a keyed pseudorandom function built for short
inputs: without the 128-bit key, nobody can compute the hash of a guessed phone number.
Here it runs over every string of an Arrow array at once: strings are laid out as
little-endian 64-bit words, one row per string, and the rounds are numpy operations.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_C = (0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573)


def _rotl(x: np.ndarray, b: int) -> np.ndarray:
    return (x << np.uint64(b)) | (x >> np.uint64(64 - b))


def _round(
    v0: np.ndarray, v1: np.ndarray, v2: np.ndarray, v3: np.ndarray
) -> tuple[np.ndarray, ...]:
    v0 = v0 + v1
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = v2 + v3
    v3 = _rotl(v3, 16) ^ v2
    v0 = v0 + v3
    v3 = _rotl(v3, 21) ^ v0
    v2 = v2 + v1
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def _words(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(n x blocks) uint64 message words with SipHash padding, and each string's block count."""
    if pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    n = len(values)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[
        values.offset : values.offset + n + 1
    ]
    data_buf = values.buffers()[2]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    lengths = (offsets[1:] - offsets[:-1]).astype(np.int64)
    blocks = lengths // 8 + 1
    width = int(blocks.max()) * 8 if n else 8
    span = np.arange(width)
    inside = span[None, :] < lengths[:, None]
    index = np.where(inside, offsets[:-1, None].astype(np.int64) + span[None, :], 0)
    matrix = np.where(inside, data[index] if data.size else 0, 0).astype(np.uint8)
    matrix[np.arange(n), (blocks - 1) * 8 + 7] = (lengths & 0xFF).astype(np.uint8)
    return np.ascontiguousarray(matrix).view("<u8").reshape(n, width // 8), blocks


def siphash24(values: pa.Array, key: bytes) -> np.ndarray:
    """SipHash-2-4 of each UTF-8 string in ``values`` under a 16-byte ``key``, as uint64.

    Null strings hash as empty strings; callers reject them before.
    """
    if len(key) != 16:
        raise ValueError("SipHash needs a 16-byte key")
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    k0 = np.uint64(int.from_bytes(key[:8], "little"))
    k1 = np.uint64(int.from_bytes(key[8:], "little"))
    words, blocks = _words(values)
    v0 = np.full(n, k0 ^ np.uint64(_C[0]), dtype=np.uint64)
    v1 = np.full(n, k1 ^ np.uint64(_C[1]), dtype=np.uint64)
    v2 = np.full(n, k0 ^ np.uint64(_C[2]), dtype=np.uint64)
    v3 = np.full(n, k1 ^ np.uint64(_C[3]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            m = words[:, j]
            active = blocks > j
            a0, a1, a2, a3 = v0, v1, v2, v3 ^ m
            a0, a1, a2, a3 = _round(a0, a1, a2, a3)
            a0, a1, a2, a3 = _round(a0, a1, a2, a3)
            a0 = a0 ^ m
            if active.all():
                v0, v1, v2, v3 = a0, a1, a2, a3
            else:
                v0, v1 = np.where(active, a0, v0), np.where(active, a1, v1)
                v2, v3 = np.where(active, a2, v2), np.where(active, a3, v3)
        v2 = v2 ^ np.uint64(0xFF)
        for _ in range(4):
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return (v0 ^ v1 ^ v2 ^ v3) & _MASK
