"""Who may call the API, and the record of what they did.

``AuthMiddleware`` runs before anything else of a request (before its body is read): health
checks pass; every other path needs ``Authorization: Bearer <key>`` of an active key (else 401)
with the scope its route needs (``ROUTE_SCOPES``; else 403). An unknown path is 401 too for a
caller without a key: nothing answers an outsider but the health checks. The principal is put in
``request.state.principal`` for the route (restricted kinds, audit records).

One ``Guard`` per API replica holds the key store (``engine.governance.keys``, read again when
its file changes), the audit trail (``engine.governance.audit``) and the per-key rate limits
(``KeyRateLimits``: leases from the gateway's ``RateLimiterActor``; over the limit, 429 with
``Retry-After``).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from engine.governance.audit import AuditTrail, audit_key
from engine.governance.handles import HandleVault, handles_path
from engine.governance.keys import ApiKey, AuthError, KeyStore, Principal
from engine.governance.ratelimit import Allowances, lease_size, retry_after
from engine.reference import TABLE_NAMES

log = logging.getLogger("ray.serve")

#: the scope each route needs (method, path); any other path needs a valid key of any scope
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("POST", "/v1/events"): "ingest",
    ("POST", "/v1/decide"): "decide",
    ("POST", "/v1/customers/lookup"): "read_profile",
    ("GET", "/v1/rules"): "admin",
    ("PUT", "/v1/rules"): "admin",
    ("GET", "/v1/offers"): "admin",
    ("PUT", "/v1/offers"): "admin",
    ("GET", "/v1/stats"): "admin",
    ("GET", "/v1/reference"): "admin",
    **{
        (method, f"/v1/reference/{name}"): "admin"
        for method in ("GET", "PUT")
        for name in TABLE_NAMES
    },
}
#: answered without a key: liveness and readiness say nothing about customers or configuration
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class LimiterUnavailable(Exception):
    """The rate-limit ledger did not answer within ``KeyRateLimits.LEASE_WAIT_S``."""


class KeyRateLimits:
    """A replica's side of the per-key limits: it spends tokens leased from the central
    bucket (the gateway's ``RateLimiterActor``). A new lease is fetched in the background when
    half of one is left, so a request waits for the ledger only when the tokens ran out; and it
    waits at most ``LEASE_WAIT_S``: a ledger that does not answer (the gateway restarting, a
    CPU starved under overload) must not hold requests, nor let them through unlimited, so they
    get ``LimiterUnavailable`` (the API answers 503 with ``Retry-After``)."""

    LEASE_WAIT_S = 0.5

    def __init__(self, gateway: Any, default_rate_per_s: float, limiter: Any = None) -> None:
        self.gateway, self.default_rate = gateway, default_rate_per_s
        self.allowances = Allowances()
        self._limiter: Any = limiter
        self._leasing: dict[str, asyncio.Task[None]] = {}
        #: requests of a key waiting for a lease: the next lease asks for at least as many
        self._waiting: dict[str, int] = {}
        self._warned = 0.0

    async def admit(self, principal: Principal) -> float | None:
        """None if the request may go on, else the seconds the client should wait.

        A request is refused only when the ledger refused this key a moment ago (the key is
        over its limit). Losing a lease's tokens to the key's other requests is not that: it
        waits for the next lease, up to ``LEASE_WAIT_S`` in all; then, as when the ledger does
        not answer, ``LimiterUnavailable``."""
        rate = principal.rate_per_s if principal.rate_per_s is not None else self.default_rate
        if not rate:
            return None  # 0: no limit
        key = principal.key_id
        deadline = time.monotonic() + self.LEASE_WAIT_S
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            while True:
                spent, wait = self.allowances.spend(key, time.monotonic())
                if spent:
                    if self.allowances.left(key) < max(1, lease_size(rate) // 2):
                        self._lease(key, rate)  # in the background: the next need not wait
                    return None
                if wait is not None:
                    return wait
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError("no lease of this key's tokens in time")
                    await asyncio.wait_for(asyncio.shield(self._lease(key, rate)), left)
                except (ray.exceptions.RayError, TimeoutError) as e:
                    if time.monotonic() - self._warned > 30:
                        self._warned = time.monotonic()
                        log.warning("the rate limiter does not answer: 503 meanwhile (%r)", e)
                    raise LimiterUnavailable(str(e) or type(e).__name__) from e
        finally:
            self._waiting[key] -= 1

    def _lease(self, key: str, rate: float) -> asyncio.Task[None]:
        """The lease in flight for ``key``, or a new one."""
        task = self._leasing.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._take(key, rate))
            self._leasing[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return task

    def _done(self, key: str, task: asyncio.Task[None]) -> None:
        self._leasing.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: a failed lease is logged by admit, not by asyncio

    async def _take(self, key: str, rate: float) -> None:
        for attempt in range(2):
            if self._limiter is None or attempt:
                self._limiter = (await self.gateway.routing.remote())["limiter"]
            try:
                want = max(lease_size(rate), self._waiting.get(key, 0))
                granted, wait = await self._limiter.take.remote(key, rate, want)
            except ray.exceptions.RayActorError:
                if attempt:
                    raise
                continue
            self.allowances.add(key, int(granted), float(wait), time.monotonic())
            return


@dataclass
class Guard:
    """An API replica's keys, audit trail and rate limits (None: no limits)."""

    keys: KeyStore
    audit: AuditTrail
    handles: HandleVault
    limits: KeyRateLimits | None = None

    @classmethod
    def open(
        cls, keys_file: str, audit_file: str, pseudonym_key: str, limits: KeyRateLimits | None
    ) -> Guard:
        trail = AuditTrail(audit_file, audit_key(pseudonym_key))
        return cls(KeyStore(keys_file), trail, HandleVault(handles_path(audit_file)), limits)

    def subject(self, customer_key: int, exists: bool = True) -> str | None:
        """How an audit record names a customer: their random handle (made now if need be);
        for a customer with no record (``exists=False``) only a handle made before, else
        None (a lookup of an unknown identifier makes nothing)."""
        if exists:
            return self.handles.handle(customer_key)
        return self.handles.known(customer_key)

    def record(self, principal: Principal | None, action: str, **fields: Any) -> None:
        self.audit.append([{"action": action, "actor": _actor(principal), **fields}])


def _actor(principal: Principal | None) -> str:
    return f"key:{principal.key_id}" if principal else "anonymous"


def cli_actor() -> str:
    """Who ran a ``kairos`` command, for audit records of key changes."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid-{os.getuid()}"


#: the replica's guard, used by the middleware (one API replica per process)
_installed: dict[str, Guard] = {}


def install(guard: Guard) -> None:
    _installed["guard"] = guard


def required_scope(method: str, path: str) -> str | None:
    return ROUTE_SCOPES.get((method, path))


class AuthMiddleware:
    """Pure ASGI middleware (no per-request task, unlike ``@app.middleware``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        guard = _installed.get("guard")
        if guard is None:
            await _answer(send, 503, "the API is starting; try again shortly", retry=2)
            return
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            principal = guard.keys.authenticate(header)
        except AuthError as exc:
            await _answer(send, exc.status, exc.detail, bearer=True)
            return
        except (OSError, ValueError):  # the key file cannot be read: refuse, say why in the log
            await _answer(send, 503, "the key store cannot be read", retry=2)
            return
        need = required_scope(scope["method"], scope["path"])
        if need is not None and not principal.may(need):
            guard.record(principal, "denied", route=f"{scope['method']} {scope['path']}",
                          missing=need)  # fmt: skip
            await _answer(send, 403, f"this key lacks the scope {need!r} this call needs")
            return
        if guard.limits is not None:
            try:
                wait = await guard.limits.admit(principal)
            except LimiterUnavailable:
                await _answer(send, 503, "the service is busy (rate limits could not be "
                              "checked): try again", retry=1)  # fmt: skip
                return
            if wait is not None:
                await _answer(send, 429, "this key is over its rate limit: slow down",
                              retry=retry_after(wait))  # fmt: skip
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _answer(
    send: Any, status: int, detail: str, bearer: bool = False, retry: int | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if bearer:
        headers.append((b"www-authenticate", b'Bearer realm="kairos"'))
    if retry is not None:
        headers.append((b"retry-after", b"%d" % retry))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def record_key_change(audit_file: str | os.PathLike[str], action: str, key: ApiKey) -> None:
    """A key created or revoked (by a command, not a request): into the audit trail."""
    from engine.config import EngineSettings

    trail = AuditTrail(audit_file, audit_key(EngineSettings().pseudonym_key))
    try:
        trail.append([{"action": action, "actor": cli_actor(), "key": key.id, "name": key.name,
                       "scopes": list(key.scopes)}])  # fmt: skip
    finally:
        trail.close()


def bootstrap_key(keys_file: str, audit_file: str, data_dir: str) -> Path | None:
    """A first key with every scope when the store has none (a fresh ``kairos serve``): its
    token goes to ``DATA_DIR/bootstrap.key`` (mode 0600), never to the console or a log.
    Returns that path, or None when keys exist."""
    from engine.governance.keys import SCOPES

    store = KeyStore(keys_file)
    if len(store):
        return None
    key, token = store.create("bootstrap", list(SCOPES))
    record_key_change(audit_file, "key.create", key)
    out = Path(data_dir) / "bootstrap.key"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return out
