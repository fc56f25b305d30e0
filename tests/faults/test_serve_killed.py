"""``kairos serve`` SIGKILLed, whole process tree (Ray, Serve, the gateway, the shards, the
embedded NATS server), twice, under Locust ingest with client retries; started again each time
on the same data folder.

Then: every event of every batch answered 202 is applied exactly once, and the golden records
(aggregates and rule state) of the customers touched equal those of a run without faults fed
the same batches (``LocalEngine``, event by event in time order). Locust reports no answer other
than 202, 503 or no answer (the service down).
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT
from tests.faults.killtest import BATCH, CUSTOMERS
from tests.faults.service import settle
from tests.keys import http, keyed, lookup, make_key

pytestmark = [pytest.mark.integration, pytest.mark.faults]

BIN = Path(sys.executable).parent
LOCUSTFILE = Path(__file__).with_name("retrying_locustfile.py")


class Service:
    """``kairos serve`` in a session of its own, so its whole tree can be killed at once."""

    def __init__(self, data: Path, port: int, metrics_port: int) -> None:
        self.data, self.port, self.metrics_port = data, port, metrics_port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # a key of its own in the service's data folder (kairos serve then makes no other)
        self.token = make_key(data / "keys.json", ["ingest", "read_profile", "admin"])

    def start(self) -> float:
        """Start and wait for /readyz; the seconds it took."""
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        log = open(self.data.parent / f"serve-{self.starts}.log", "wb")  # noqa: SIM115
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "kairos"), "serve", "--dev", "--port", str(self.port), "--no-dashboard",
             "--no-offers", "--replicas", "1", "--data-dir", str(self.data),
             "--checkpoint-every", "2", "--metrics-port", str(self.metrics_port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip
        deadline = started + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"kairos serve exited: see {log.name}"
            try:
                if requests.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"kairos serve was not ready in 300 s: see {log.name}")

    def kill(self) -> int:
        """SIGKILL every process of the tree at once; how many there were."""
        import psutil

        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        with_group = os.getpgid(self.proc.pid)
        os.killpg(with_group, signal.SIGKILL)  # Ray's processes share the driver's group
        for p in procs:  # and anything that left it
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, alive
        self.proc.wait()
        return len(procs)


def _record(path: Path) -> tuple[set[int], set[int]]:
    sent: set[int] = set()
    ok: set[int] = set()
    if path.exists():
        for line in path.read_text().splitlines():
            what, number = line.split()
            if what in ("sent", "ok"):
                (sent if what == "sent" else ok).add(int(number))
    return sent, ok


def _wait_for_more(path: Path, more: int, timeout: float = 180) -> None:
    start = len(_record(path)[1])
    deadline = time.monotonic() + timeout
    while len(_record(path)[1]) < start + more:
        assert time.monotonic() < deadline, f"fewer than {more} batches accepted in {timeout} s"
        time.sleep(0.5)


def test_kairos_serve_killed_twice_under_locust_loses_and_doubles_nothing(tmp_path) -> None:
    from deploy.natsserver import free_port

    service = Service(tmp_path / "service", free_port(), free_port())
    with keyed(service.token):  # settle() and the lookups below call with its key
        _killed_twice(service, tmp_path)


def _killed_twice(service: Service, tmp_path: Path) -> None:
    import msgpack

    from deploy.paths import DEFAULT_RULES
    from engine.config import EngineSettings
    from engine.local import LocalEngine
    from engine.rules.spec import load_rules
    from tests.faults.killtest import batch

    base_ms = int(time.time() * 1000) - 60_000
    record = tmp_path / "record.txt"
    ready_s = [service.start()]
    env = {
        **os.environ,
        "KAIROS_API_KEY": service.token,
        "KAIROS_KT_BATCH": str(BATCH),
        "KAIROS_KT_CUSTOMERS": str(CUSTOMERS),
        "KAIROS_KT_BASE_MS": str(base_ms),
        "KAIROS_KT_RECORD": str(record),
        "PYTHONPATH": str(ROOT),
    }
    prefix = tmp_path / "locust"
    locust = subprocess.Popen(
        [str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4",
         "-t", "900s", "--host", service.url, "--csv", str(prefix), "--only-summary",
         "--loglevel", "WARNING"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    killed = []
    try:
        for _ in range(2):
            _wait_for_more(record, 100)  # 20,000 events since the last start
            killed.append(service.kill())
            ready_s.append(service.start())
        _wait_for_more(record, 100)
    finally:
        locust.send_signal(signal.SIGTERM)
        locust.wait(timeout=60)
    try:
        sent, ok = _record(record)
        for number in sorted(sent - ok):  # Locust stopped while they were being retried
            body = msgpack.packb(batch(number, base_ms))
            headers = {"content-type": "application/msgpack", "Idempotency-Key": f"kt-b{number}"}
            while http.post(f"{service.url}/v1/events", data=body, headers=headers,
                                timeout=60).status_code != 202:  # fmt: skip
                time.sleep(0.5)
        stats = settle(service.url, timeout=180)
        assert stats["applied"] == len(sent) * BATCH, (stats, len(sent))
        assert stats["duplicates"] == 0 and stats["rejected"] == 0, stats

        reference = LocalEngine(EngineSettings(), load_rules(DEFAULT_RULES))
        for number in sorted(sent):
            reference.submit_rows(batch(number, base_ms))
        reference.end_stream()
        for k in range(0, CUSTOMERS, 7):
            customer = f"kt-{k}"
            got = lookup(service.url, customer, timeout=30).json()
            want = reference.customer(customer)
            assert want is not None
            assert got["rule_state"] == want["rules"], customer
            for name, value in got["aggregates"].items():
                assert value == want[name], (customer, name)
        with open(f"{prefix}_stats.csv") as f:
            rows = {row["Name"]: row for row in csv.DictReader(f)}
        assert int(rows["POST /v1/events"]["Failure Count"]) == 0, rows["POST /v1/events"]
        serve_404 = record.read_text().count("serve-404")
        print(f"\nkilled {killed} processes; ready after {[round(s, 1) for s in ready_s]} s; "
              f"{len(sent)} batches, {len(sent) * BATCH} events applied once; "
              f"{rows['POST /v1/events']['Request Count']} requests, {serve_404} of them "
              "answered 404 by Serve's proxy before any application was up")  # fmt: skip
    finally:
        service.kill()
