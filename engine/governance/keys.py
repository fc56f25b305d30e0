"""API keys with scopes: issued once, stored hashed, checked on every request.

A key is ``kairos_<id>_<secret>``: the 12-hex id finds the entry, the secret (32 random bytes,
URL-safe) proves it. Only SHA-256 of the secret is stored: a secret of 256 random bits cannot be
guessed from its hash, so a slow password hash would add latency and nothing else. Compared in
constant time.

The store is one JSON file written whole (temp file, fsync, rename): readers see the old or the
new file, never half of one. API replicas read it again when it changes (``KeyStore.refresh``),
so a revoked key stops working within a second, on every replica, without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from engine.errors import EngineError

#: what a key may do
SCOPES: dict[str, str] = {
    "ingest": "POST /v1/events with behavioural kinds (usage, location, purchases, clicks...)",
    "ingest_restricted": "POST /v1/events with consent and profile_update events too",
    "decide": "POST /v1/decide",
    "read_profile": "POST /v1/customers/lookup (a golden record)",
    "privacy": "erasure and export (reserved for the privacy endpoints)",
    "admin": "rules, offers, stats: read and replace the running configuration",
}
#: event kinds only a key with ``ingest_restricted`` may send: they change who a customer is
#: (home, channels, plan) or what they agreed to
RESTRICTED_KINDS = frozenset({"consent", "profile_update"})

_TOKEN = re.compile(r"^kairos_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class KeyStoreError(EngineError):
    """A key file or a key request that cannot be honoured (unknown scope, unknown id)."""


@dataclass(frozen=True)
class ApiKey:
    """One key as stored: never the secret, only its hash."""

    id: str
    name: str
    scopes: tuple[str, ...]
    secret_sha256: str
    created_ms: int
    expires_ms: int | None = None
    revoked_ms: int | None = None
    #: requests per second this key may make across all replicas (None: the service default)
    rate_per_s: float | None = None

    def state(self, now_ms: int) -> str:
        if self.revoked_ms is not None:
            return "revoked"
        if self.expires_ms is not None and now_ms >= self.expires_ms:
            return "expired"
        return "active"

    def public(self, now_ms: int) -> dict[str, Any]:
        """What ``kairos keys list`` shows (no hash)."""
        out = {k: v for k, v in asdict(self).items() if k != "secret_sha256"}
        out["scopes"] = list(self.scopes)
        out["state"] = self.state(now_ms)
        return out


@dataclass(frozen=True)
class Principal:
    """Who made a request: the key's id and name, and what it may do."""

    key_id: str
    name: str
    scopes: frozenset[str]
    rate_per_s: float | None = None

    def may(self, scope: str) -> bool:
        return scope in self.scopes


class AuthError(Exception):
    """Why a request is refused: ``status`` 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(scopes))
    unknown = [s for s in out if s not in SCOPES]
    if unknown or not out:
        raise KeyStoreError(
            f"unknown scope(s) {', '.join(unknown) or '(none given)'}: choose from "
            + ", ".join(SCOPES)
        )
    return out


class KeyStore:
    """The keys of one service, in ``path`` (JSON). Thread-unsafe; one per process."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._keys: dict[str, ApiKey] = {}
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._checked = 0.0
        self.refresh(force=True)

    # -- reading -------------------------------------------------------------------------------
    def refresh(self, force: bool = False, every_s: float = 1.0) -> None:
        """Read the file again if it changed (looked at no more often than ``every_s``)."""
        now = time.monotonic()
        if not force and now - self._checked < every_s:
            return
        self._checked = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._keys, self._seen = {}, None
            return
        if not force and self._seen == (st.st_mtime_ns, st.st_size):
            return
        document = json.loads(self.path.read_text())
        keys = {}
        for entry in document.get("keys", []):
            entry["scopes"] = tuple(entry["scopes"])
            key = ApiKey(**entry)
            keys[key.id] = key
        self._keys, self._seen = keys, (st.st_mtime_ns, st.st_size)

    def entries(self) -> list[ApiKey]:
        return sorted(self._keys.values(), key=lambda k: k.created_ms)

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, header: str | None, now_ms: int | None = None) -> Principal:
        """The principal behind an ``Authorization: Bearer <key>`` header, or AuthError(401).
        The error never says whether an id exists: bad, unknown, revoked and expired keys read
        the same to the caller (the server's audit record says which)."""
        self.refresh()
        if not header:
            raise AuthError(401, "an API key is required: Authorization: Bearer <key>")
        scheme, _, token = header.partition(" ")
        match = _TOKEN.match(token.strip()) if scheme.lower() == "bearer" else None
        key = self._keys.get(match.group(1)) if match else None
        # compare even when the id is unknown: the time taken says nothing about ids
        expected = key.secret_sha256 if key else "0" * 64
        secret_ok = hmac.compare_digest(expected, _digest(match.group(2) if match else ""))
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if key is None or not secret_ok or key.state(now) != "active":
            raise AuthError(401, "the API key is not valid (unknown, revoked or expired)")
        return Principal(key.id, key.name, frozenset(key.scopes), key.rate_per_s)

    # -- writing (kairos keys ...) -----------------------------------------------------------------
    def create(
        self,
        name: str,
        scopes: Iterable[str],
        expires_in_s: float | None = None,
        rate_per_s: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key; returns it and its token (shown once: only its hash is kept)."""
        with self._locked():
            return self._create(name, scopes, expires_in_s, rate_per_s)

    def _create(
        self, name: str, scopes: Iterable[str], expires_in_s: float | None, rate: float | None
    ) -> tuple[ApiKey, str]:
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = int(time.time() * 1000)
        key = ApiKey(
            id=key_id,
            name=name,
            scopes=check_scopes(scopes),
            secret_sha256=_digest(secret),
            created_ms=now,
            expires_ms=None if expires_in_s is None else now + int(expires_in_s * 1000),
            rate_per_s=rate,
        )
        self._write({**self._keys, key_id: key})
        return key, f"kairos_{key_id}_{secret}"

    def revoke(self, key_id: str) -> ApiKey:
        with self._locked():
            key = self._keys.get(key_id)
            if key is None:
                raise KeyStoreError(f"no key with id {key_id!r}")
            if key.revoked_ms is None:
                key = replace(key, revoked_ms=int(time.time() * 1000))
                self._write({**self._keys, key_id: key})
            return key

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Two ``kairos keys`` at once: one read-modify-write after the other, none lost."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.refresh(force=True)
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, keys: Mapping[str, ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"version": 1, "keys": [asdict(k) for k in keys.values()]}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.refresh(force=True)
