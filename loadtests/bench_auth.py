"""What API keys and the audit trail add to a request: the middleware (key check, scope check;
all an ingest pays) and one audit record with its customer handle besides (what a decide or a
profile read pays), timed in-process against the same request without them. The per-key rate
limit is left out here: a replica spends a leased token locally (a dict update) and asks the
ledger once per lease.

    python loadtests/bench_auth.py --requests 20000 --repeat 5

A request through Serve's proxy costs about 10 ms here, a decide 2-10 ms more: the microseconds
below are what authentication and audit add to each. Prints one JSON line per run and the
medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.security import AuthMiddleware, Guard, install
from engine.governance.keys import SCOPES, KeyStore


async def _endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _sink(message: dict[str, Any]) -> None:
    return None


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _scope(token: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/decide",
        "headers": [
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {token}".encode()),
        ],
    }


async def _time(app: Any, token: str, n: int, guard: Guard | None) -> float:
    """Seconds per request through ``app`` (plus an audit record when ``guard`` is given)."""
    started = time.perf_counter()
    for i in range(n):
        await app(_scope(token), _receive, _sink)
        if guard is not None:
            # each request a customer never named before: their audit handle is made (the
            # worst case; a returning customer's is only looked up)
            subject = guard.subject(i)
            guard.record(None, "decide", subject=subject, decision=f"{i:016x}", offer="x")
    return (time.perf_counter() - started) / n


def one_run(n: int, folder: Path) -> dict[str, float]:
    keys = KeyStore(folder / "keys.json")
    for i in range(50):  # a store of some size
        keys.create(f"k{i}", ["ingest"])
    _, token = keys.create("bench", list(SCOPES))
    guard = Guard.open(str(folder / "keys.json"), str(folder / "audit.jsonl"), "bench-secret", None)
    install(guard)
    bare = asyncio.run(_time(_endpoint, token, n, None))
    checked = asyncio.run(_time(AuthMiddleware(_endpoint), token, n, None))  # an ingest
    guarded = asyncio.run(_time(AuthMiddleware(_endpoint), token, n, guard))  # a decide
    guard.audit.close()
    return {
        "bare_us": round(bare * 1e6, 2),
        "ingest_added_us": round((checked - bare) * 1e6, 2),
        "decide_added_us": round((guarded - bare) * 1e6, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as folder:
            runs.append(one_run(args.requests, Path(folder)))
            print(json.dumps(runs[-1]))
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(json.dumps({"median": medians, "runs": len(runs), "requests": args.requests}))


if __name__ == "__main__":
    main()
