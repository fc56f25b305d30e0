"""Hostile requests against a real `kairos` service while a background client ingests.

    .venv/bin/python loadtests/hostile.py [--json]

Starts the service on a local Ray (Serve's HTTP proxy on 127.0.0.1), runs a background client
that posts 100-event batches without pause, sends each hostile request of issue 13 in turn,
and prints one row per case: the status, the answer's size, how long the request took, and the
slowest background request while it ran (how long it stalled everyone else's ingest). Last it
checks that nothing restarted: the same gateway actor answers, and every event the background
client got accepted was applied.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.paths import DEFAULT_RULES

JSON = {"content-type": "application/json"}
MSGPACK = {"content-type": "application/msgpack"}
YAML = {"content-type": "application/yaml"}


#: the key every request carries (created with the service below)
KEYED: dict[str, str] = {}


def _event(i: int, **fields: Any) -> dict[str, Any]:
    return {"event_id": f"hostile-{i}", "customer_id": f"c{i % 50}", "kind": "usage",
            "ts": int(time.time() * 1000) - 5_000, "mb": 1.0, **fields}  # fmt: skip


def _json_event(raw: bytes) -> bytes:
    head = json.dumps({"event_id": "h", "customer_id": "c", "kind": "usage", "ts": 1})[:-1]
    return b"[" + head.encode() + b", " + raw + b"}]"


def cases() -> list[tuple[str, str, str, bytes, dict[str, str]]]:
    """(name, method, path, body, headers) of each hostile request."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    rule = {"id": "r", "type": "condition", "on": ["usage"]}
    offer = {"id": "o", "answers": ["r"], "channels": ["sms"], "value": 1}
    return [
        ("events: JSON nested 10,000 deep", "POST", "/v1/events",
         b"[" * 10_000 + b"]" * 10_000, JSON),
        ("rules: JSON nested 10,000 deep", "PUT", "/v1/rules",
         b'{"rules": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", JSON),
        ("offers: JSON nested 10,000 deep", "PUT", "/v1/offers",
         b'{"offers": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", JSON),
        ("rules: YAML nested 900 deep", "PUT", "/v1/rules",
         ("rules:\n  - " + "[" * 900 + "]" * 900).encode(), YAML),
        ("events: mb = 10**400", "POST", "/v1/events", _json_event(b'"mb": 1' + b"0" * 400), JSON),
        ("events: lat = 10**400", "POST", "/v1/events", _json_event(b'"lat": 1' + b"0" * 400),
         JSON),
        ("events: 5,000-digit integer", "POST", "/v1/events",
         _json_event(b'"mb": ' + b"9" * 5000), JSON),
        ("events: tz of 300 characters", "POST", "/v1/events",
         msgpack.packb([{**_event(1), "kind": "profile_update", "tz": "x" * 300, "mb": None}]),
         MSGPACK),
        ("events: a lone surrogate as a key", "POST", "/v1/events",
         _json_event(b'"\\ud800": 1'), JSON),
        ("decide: msgpack body", "POST", "/v1/decide",
         msgpack.packb({"customer_id": "c", "channel": "web"}), MSGPACK),
        ("decide: customer_id NaN", "POST", "/v1/decide",
         b'{"customer_id": NaN, "channel": "web"}', JSON),
        ("decide: customer_id a lone surrogate", "POST", "/v1/decide",
         b'{"customer_id": "\\ud800", "channel": "web"}', JSON),
        ("decide: ts in year 1", "POST", "/v1/decide",
         b'{"customer_id": "c", "channel": "web", "context": {"ts": "0001-01-01T00:00:00Z"}}',
         JSON),
        ("decide: ts in year 9999", "POST", "/v1/decide",
         b'{"customer_id": "c", "channel": "web", "context": {"ts": "9999-12-31T00:00:00Z"}}',
         JSON),
        ("rules: when = 'not ' x 5000", "PUT", "/v1/rules",
         json.dumps({"rules": [{**rule, "when": "not " * 5000 + "true"}]}).encode(), JSON),
        ("rules: when = '-' x 100000", "PUT", "/v1/rules",
         json.dumps({"rules": [{**rule, "when": "-" * 100_000 + "1"}]}).encode(), JSON),
        ("rules: the literal 10**400", "PUT", "/v1/rules",
         json.dumps({"rules": [{**rule, "when": "mb > 1" + "0" * 400}]}).encode(), JSON),
        ("offers: eligible = 'not ' x 5000", "PUT", "/v1/offers",
         json.dumps({"offers": [{**offer, "eligible": "not " * 5000 + "true"}]}).encode(), JSON),
        ("events: msgpack array of 1,000,000 ints", "POST", "/v1/events",
         msgpack.packb(list(range(1_000_000))), MSGPACK),
        ("rules: 390-byte YAML alias bomb", "PUT", "/v1/rules", bomb.encode(), YAML),
        ("events: 15 customer ids of 1 MB", "POST", "/v1/events",
         msgpack.packb([{**_event(i), "customer_id": "c" * (1 << 20)} for i in range(15)]),
         MSGPACK),
        ("offers: cooldown 99999999999999999999d", "PUT", "/v1/offers",
         json.dumps({"offers": [{**offer, "cooldown": "99999999999999999999d"}]}).encode(), JSON),
        ("rules: the shipped rules.yaml as YAML", "PUT", "/v1/rules",
         DEFAULT_RULES.read_bytes(), YAML),
    ]  # fmt: skip


class Background:
    """Posts 100-event batches without pause; keeps (start, seconds, status) of each."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.calls: list[tuple[float, float, int]] = []
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        with requests.Session() as session:
            session.headers.update(KEYED)
            while not self._stop.is_set():
                batch = [_event(1_000_000 + i + k) for k in range(100)]
                i += 100
                started = time.perf_counter()
                r = session.post(f"{self.url}/v1/events", data=msgpack.packb(batch),
                                 headers=MSGPACK, timeout=120)  # fmt: skip
                self.calls.append((started, time.perf_counter() - started, r.status_code))
                if r.status_code == 202:
                    self.accepted += r.json()["accepted"]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def slowest_between(self, start: float, end: float) -> float:
        """The longest background request that overlapped [start, end]."""
        overlapping = [s for t0, s, _ in self.calls if t0 <= end and t0 + s >= start]
        return max(overlapping, default=0.0)


def _replicas(serve: Any) -> dict[str, int]:
    """Replicas of the API deployment by state (a restart shows as STARTING or a new count)."""
    app = serve.status().applications.get("kairos")
    if app is None:
        return {}
    states = app.deployments["api"].replica_states
    return {str(k): int(v) for k, v in states.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = parser.parse_args()
    import ray
    from ray import serve

    from actors.runtime import init_ray
    from deploy.api import api_app_config
    from deploy.service import ServiceConfig
    from engine.governance.keys import SCOPES, KeyStore
    from models.deployment import apply_apps

    port = _free_port()
    init_ray(num_cpus=4, object_store_mb=512)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServiceConfig(
        name="hostile", data_dir=tempfile.mkdtemp(), idle_release_ms=300, dev_mode=True
    )
    _, token = KeyStore(config.keys_path).create("hostile", list(SCOPES))
    KEYED["Authorization"] = f"Bearer {token}"
    apply_apps([api_app_config(config)])
    url = f"http://127.0.0.1:{port}"
    gateway = ray.get_actor(config.gateway_name, namespace=config.namespace)
    gateway_id = gateway._actor_id.hex()  # noqa: SLF001 (the same actor must answer at the end)
    replicas_before = _replicas(serve)
    background = Background(url)
    background.start()
    time.sleep(2)
    rows = []
    for name, method, path, body, headers in cases():
        started = time.perf_counter()
        r = requests.request(
            method, f"{url}{path}", data=body, headers={**KEYED, **headers}, timeout=300
        )
        ended = time.perf_counter()
        rows.append(
            {
                "case": name,
                "request_bytes": len(body),
                "status": r.status_code,
                "answer_bytes": len(r.content),
                "seconds": round(ended - started, 3),
                "others_stalled_s": round(background.slowest_between(started, ended), 3),
                "says": r.text[:90].replace("|", "/"),
            }
        )
        time.sleep(0.5)
    background.stop()
    stats = ray.get(gateway.drain.remote())
    same_gateway = ray.get_actor(config.gateway_name, namespace=config.namespace)
    summary = {
        "server_errors": sum(r["status"] >= 500 for r in rows)
        + sum(s >= 500 for _, _, s in background.calls),
        "background_requests": len(background.calls),
        "background_p99_s": sorted(s for _, s, _ in background.calls)[
            int(0.99 * (len(background.calls) - 1))
        ],
        "background_accepted": background.accepted,
        "gateway_restarted": same_gateway._actor_id.hex() != gateway_id,  # noqa: SLF001
        "api_replicas_before_after": [replicas_before, _replicas(serve)],
        "shard_failed_events": stats["failed"],
    }
    if args.json:
        print(json.dumps({"cases": rows, "summary": summary}, indent=1))
    else:
        print("| case | request bytes | status | answer bytes | s | others stalled s | answer |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['case']} | {r['request_bytes']:,} | {r['status']} | "
                  f"{r['answer_bytes']:,} | {r['seconds']} | {r['others_stalled_s']} | "
                  f"`{r['says']}` |")  # fmt: skip
        print(json.dumps(summary))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
