"""The API key the suites call the service with.

``http`` is a ``requests`` session that carries ``Authorization: Bearer <key>`` once the session's
cluster fixture created the key (``tests.conftest.ray_cluster``); tests that check what happens
without a key, or with a narrower one, use plain ``requests`` with their own headers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import requests

from engine.governance.keys import SCOPES, KeyStore

http = requests.Session()


def make_key(keys_file: str | Path, scopes: list[str] | None = None, name: str = "tests") -> str:
    """A new key in ``keys_file`` (every scope unless told); returns its token."""
    _, token = KeyStore(keys_file).create(name, scopes or list(SCOPES))
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def use_key(token: str) -> None:
    """``http`` calls with this key from now on (the session's cluster fixture)."""
    http.headers.update(bearer(token))


@contextlib.contextmanager
def keyed(token: str) -> Iterator[None]:
    """``http`` calls with this key inside the block, and with the one before after it (a test
    with a service of its own must not leave its key to the tests after it)."""
    before = http.headers.get("Authorization")
    use_key(token)
    try:
        yield
    finally:
        if before is None:
            http.headers.pop("Authorization", None)
        else:
            http.headers["Authorization"] = before


def lookup(url: str, customer_id: str, **kwargs: object) -> requests.Response:
    """``POST /v1/customers/lookup`` with the session's key."""
    return http.post(f"{url}/v1/customers/lookup", json={"customer_id": customer_id}, **kwargs)  # type: ignore[arg-type]
