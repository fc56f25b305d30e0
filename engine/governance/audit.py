"""The audit trail: an append-only, hash-chained record of who read or changed what.

Every record is one JSON line holding its sequence number, the previous record's MAC and its
own: ``mac = HMAC-SHA256(audit key, the record without its mac)``. ``verify`` recomputes the
chain; a record changed, removed, inserted or swapped breaks it at that line. The MAC is keyed
(the key derives from ``KAIROS_PSEUDONYM_KEY``, a secret the service already holds), so whoever
can write the file but lacks the key cannot rewrite the chain after an edit either.

Customers appear only by a random handle (``engine.governance.handles``), never by identifier
or customer key: forgetting the handle makes a customer's records unlinkable, chain intact.

Several writers (the API replicas of one node, ``kairos keys``) share one file: each append
takes an exclusive ``flock``, reads the chain's head if another writer moved it, and writes its
records in one ``write``. Records are handed to the OS before the request is answered (a crash
of the process loses none) and fsynced at most ``fsync_every_s`` later (a crash of the machine
may lose that last stretch).

Left to operators: truncation of the newest records is only visible against a head kept
elsewhere; ``kairos audit verify`` prints the head (sequence number and MAC) to keep.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def audit_key(secret: str) -> bytes:
    """The audit trail's MAC key, derived from the service's pseudonym secret."""
    return hashlib.blake2b(secret.encode(), digest_size=32, person=b"kairos-audit").digest()


def _mac(key: bytes, record: Mapping[str, Any]) -> str:
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


class AuditTrail:
    """Appends records to one chained file. One per process; safe across processes."""

    def __init__(self, path: str | os.PathLike[str], key: bytes, fsync_every_s: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = key
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = -1  # the file's size after our last write (-1: read the head first)
        self._seq, self._prev = 0, GENESIS
        self._fsync_every = fsync_every_s
        self._synced = time.monotonic()

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Chain and write ``records`` (each: action, actor, and what else it says); returns the
        sequence number of the last one."""
        records = list(records)
        if not records:
            return self._seq
        now = int(time.time() * 1000)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(self._fd).st_size
            if size != self._size:  # another writer appended since (or first use)
                self._seq, self._prev = self._head(size)
            lines = []
            for r in records:
                self._seq += 1
                chained = {"ts_ms": now, **r, "seq": self._seq, "prev": self._prev}
                self._prev = chained["mac"] = _mac(self._key, chained)
                lines.append(json.dumps(chained, sort_keys=True, separators=(",", ":")))
            data = ("\n".join(lines) + "\n").encode()
            os.write(self._fd, data)
            self._size = size + len(data)
            if time.monotonic() - self._synced >= self._fsync_every:
                os.fsync(self._fd)
                self._synced = time.monotonic()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return self._seq

    def _head(self, size: int) -> tuple[int, str]:
        """(seq, mac) of the file's last record."""
        if size == 0:
            return 0, GENESIS
        chunk = 4096
        while True:
            start = max(0, size - chunk)
            tail = os.pread(self._fd, size - start, start)
            lines = tail.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                last = json.loads(lines[-1])
                return int(last["seq"]), str(last["mac"])
            chunk *= 4

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


@dataclass
class Verification:
    """What ``verify`` found: the number of records, the head, and every break in the chain."""

    records: int = 0
    head_seq: int = 0
    head_mac: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | os.PathLike[str], key: bytes, max_problems: int = 20) -> Verification:
    """Recompute the chain of ``path``: every record's MAC, its link to the one before and its
    sequence number. Each problem names the line."""
    out = Verification()
    prev, seq = GENESIS, 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(out.problems) >= max_problems:
                out.problems.append("... (stopped: too many problems)")
                break
            try:
                record = json.loads(raw)
                mac = record.pop("mac")
            except (ValueError, KeyError, AttributeError):
                out.problems.append(f"line {number}: not an audit record")
                continue
            if not hmac.compare_digest(_mac(key, record), str(mac)):
                out.problems.append(f"line {number}: changed (its MAC does not match)")
            elif record.get("prev") != prev:
                out.problems.append(
                    f"line {number}: not chained to line {number - 1} (a record before it was "
                    "removed, inserted or moved)"
                )
            elif record.get("seq") != seq + 1:
                out.problems.append(f"line {number}: sequence {record.get('seq')}, not {seq + 1}")
            prev, seq = str(mac), int(record.get("seq", seq + 1))
            out.records += 1
    out.head_seq, out.head_mac = seq, prev
    return out
