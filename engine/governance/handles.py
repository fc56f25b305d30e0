"""Audit handles: the random name a customer has in the audit trail, kept apart from it.

The audit trail is hash-chained, so a record cannot change after it is written. If it named a
customer by the customer key (a keyed hash of the identifier), anyone holding the pseudonym
secret could find every record of a given identifier for as long as the trail exists, erasure
or not. So records name a customer by a random handle (``h:`` and 24 hex digits), and this
vault is the only link from customer key to handle. Forgetting a customer deletes the link:
the records stay, the chain still verifies, and nothing can tie them to the person again.

The vault is a SQLite file beside the audit trail (WAL; ``synchronous=NORMAL``: a commit is in
the log file before it returns, and it is on disk at the next checkpoint, the same promise as
the trail's fsync at most a second later). Several processes share it (API replicas, the CLI);
a handle is created once: ``INSERT OR IGNORE`` then read back, so two replicas that meet the
same new customer at once agree on one handle.

It grows by one row (about 50 bytes) per customer named in the trail: no more than the trail
itself grows for the record that names them.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "h:"
#: how long opening a vault keeps asking for WAL while SQLite answers "locked" (``_wal``)
WAL_WAIT_S = 10.0


def handles_path(audit_file: str | os.PathLike[str]) -> Path:
    """The vault of the audit trail ``audit_file``: beside it."""
    return Path(audit_file).with_name("handles.sqlite")


class HandleVault:
    """Customer key -> random audit handle, created on first use; ``forget`` unlinks."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # made 0600 before SQLite opens it: its -wal and -shm files take the same mode
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False,
                                   isolation_level=None)  # fmt: skip
        self._lock = threading.Lock()
        self._wal()
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA secure_delete=ON")  # a deleted row's bytes are overwritten
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS handles (customer TEXT PRIMARY KEY, handle TEXT NOT NULL"
            " UNIQUE) WITHOUT ROWID"
        )

    def _wal(self) -> None:
        """Switch the file to WAL. SQLite can refuse the switch with "database is locked"
        without waiting (its busy timeout does not cover it) while another process switches
        the same new file: eight processes opening one vault at once failed so, 1 time in 40
        (API replicas start together). Tried again for ``WAL_WAIT_S``."""
        deadline = time.monotonic() + WAL_WAIT_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01 + secrets.randbelow(40) / 1000)  # 10-50 ms, not in step

    @staticmethod
    def _customer(customer_key: int) -> str:
        return f"{int(customer_key):016x}"

    def _select(self, customer: str) -> str | None:
        row = self._db.execute(
            "SELECT handle FROM handles WHERE customer = ?", (customer,)
        ).fetchone()
        return None if row is None else str(row[0])

    def handle(self, customer_key: int) -> str:
        """The customer's handle, made (random) the first time it is asked for."""
        customer = self._customer(customer_key)
        with self._lock:
            found = self._select(customer)
            if found is None:
                self._db.execute(
                    "INSERT OR IGNORE INTO handles VALUES (?, ?)",
                    (customer, PREFIX + secrets.token_hex(12)),
                )
                found = self._select(customer)
        assert found is not None
        return found

    def known(self, customer_key: int) -> str | None:
        """The customer's handle if one was made, else None (nothing is made)."""
        with self._lock:
            return self._select(self._customer(customer_key))

    def forget(self, customer_key: int) -> bool:
        """Unlink the customer from their handle (erasure); True if there was one.

        The row is overwritten in the database file (``secure_delete``) and the write-ahead
        log, which still holds the page as it was, is copied back and truncated (while another
        process reads, a few tries; then it waits for the next ``forget``, logged)."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM handles WHERE customer = ?", (self._customer(customer_key),)
            )
            for _ in range(20):
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy:
                    break
                time.sleep(0.01)
            else:
                log.warning("a forgotten handle's old page stays in %s-wal for now", self.path)
        return cursor.rowcount > 0

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM handles").fetchone()[0])

    def close(self) -> None:
        self._db.close()
