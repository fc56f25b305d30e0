"""`make loadtest`: Locust, headless and bounded, against a local `kairos serve`; then checks
that every event the API accepted was applied, exactly once.

    python loadtests/run_loadtest.py                       # starts `kairos serve` itself
    python loadtests/run_loadtest.py --host http://HOST:8000   # an already running service
    python loadtests/run_loadtest.py --users 200 --only WebSession   # decide latency
    python loadtests/run_loadtest.py --only DeviceUser -- --replicas 1   # `kairos serve` options

Writes Locust's CSV and HTML report under --out and prints one JSON line: requests/s,
p50/p95/p99 per request type, failures, and events accepted vs applied.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


#: the API key of the calls below (KAIROS_API_KEY, or the bootstrap key of a service started here)
TOKEN: dict[str, str] = {}


def get(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if "key" in TOKEN:
        request.add_header("Authorization", f"Bearer {TOKEN['key']}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def wait_ready(host: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get(f"{host}/readyz")[0] == 200:
            return
        time.sleep(1)
    raise SystemExit(f"{host} is not ready after {timeout:.0f}s")


def settle(host: str, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the engine has read the whole ingest log, nothing is pending and the applied
    count stops moving."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, stats = get(f"{host}/v1/stats", timeout=30)
        caught_up = stats and stats.get("log", {}).get("lag", 0) == 0
        if caught_up and stats["pending"] == 0 and last and stats["applied"] == last["applied"]:
            return stats
        last = stats or last
        time.sleep(2)
    return last


def summary(csv_prefix: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with open(f"{csv_prefix}_stats.csv") as f:
        for row in csv.DictReader(f):
            out[row["Name"]] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "rps": round(float(row["Requests/s"]), 1),
                "p50_ms": float(row["50%"] or 0),
                "p95_ms": float(row["95%"] or 0),
                "p99_ms": float(row["99%"] or 0),
            }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", help="a running Kairos (default: start `kairos serve` here)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--ramp", type=float, default=10.0, help="seconds of ramp-up")
    p.add_argument("--hold", type=float, default=60.0, help="seconds at full load")
    p.add_argument("--only", nargs="*", default=[], help="user classes (DeviceUser, ...)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--decide-rps", type=float, default=1.0, help="per web session")
    p.add_argument("--out", type=Path, default=ROOT / "kairos-data" / "loadtest")
    p.add_argument(
        "serve_args", nargs="*", help="more `kairos serve` options, after -- (no --host)"
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = None
    host = args.host
    if host is None:
        host = f"http://127.0.0.1:{args.port}"
        log = open(args.out / "kairos-serve.log", "w")  # noqa: SIM115
        server = subprocess.Popen(
            [str(BIN / "kairos"), "serve", "--dev", "--port", str(args.port), "--no-dashboard",
             "--data-dir", str(args.out / "service"), *args.serve_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env=dict(os.environ),
        )  # fmt: skip
    try:
        wait_ready(host, timeout=600)
        TOKEN["key"] = os.environ.get("KAIROS_API_KEY") or (
            (args.out / "service" / "bootstrap.key").read_text().strip()
        )
        before = settle(host)  # earlier events all read and applied: the deltas are ours
        report = args.out / "client.json"
        prefix = args.out / "locust"
        env = {
            **os.environ,
            "KAIROS_LT_USERS": str(args.users),
            "KAIROS_LT_RAMP_S": str(args.ramp),
            "KAIROS_LT_HOLD_S": str(args.hold),
            "KAIROS_LT_BATCH": str(args.batch),
            "KAIROS_LT_DECIDE_RPS": str(args.decide_rps),
            "KAIROS_LT_REPORT": str(report),
            "KAIROS_API_KEY": TOKEN["key"],
        }
        subprocess.run(
            [str(BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
             "--host", host, "--csv", str(prefix), "--html", f"{prefix}.html",
             "--only-summary", "--loglevel", "WARNING", *args.only],
            env=env, check=False, timeout=args.ramp + args.hold + 300,
        )  # fmt: skip
        client = json.loads(report.read_text())
        after = settle(host)
        stats = summary(prefix)
        ingested = after["ingested"] - before["ingested"]
        applied = after["applied"] - before["applied"]
        duplicates = after["duplicates"] - before["duplicates"]
        # accepted into the log, then found late by the engine (dead-lettered, not applied)
        late = after["rejected_by_reason"].get("late", 0) - before["rejected_by_reason"].get(
            "late", 0
        )
        result = {
            "requests": stats,
            "events_accepted_by_api": client["accepted"],
            "events_ingested_by_gateway": ingested,
            "events_applied": applied,
            "duplicates": duplicates,
            "late_after_acceptance": late,
            "pending": after["pending"],
            "events_per_s": round(ingested / max(args.hold + args.ramp / 2, 1), 1),
            "report": f"{prefix}.html",
        }
        print(json.dumps(result))
        failures = sum(s["failures"] for s in stats.values())
        # the server's count of accepted events is exact; Locust may abandon requests in flight
        # when it stops, so the events its responses reported accepted are a lower bound
        lost = ingested != applied + duplicates or client["accepted"] > ingested + late
        if lost:
            print(f"events lost: accepted {ingested}, applied {applied}", file=sys.stderr)
        return 1 if lost or failures else 0
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
