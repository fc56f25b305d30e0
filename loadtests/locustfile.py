"""Locust users for Kairos's HTTP API: devices posting events, web sessions asking for the
next best action, call-center agents reading golden records; a ramp-and-hold load shape.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000            # web UI
    locust -f loadtests/locustfile.py --host URL --headless -t 60s            # headless
    locust -f loadtests/locustfile.py --host URL --headless DeviceUser        # one kind only

Knobs (environment): KAIROS_LT_USERS (peak users, default 40), KAIROS_LT_RAMP_S (10),
KAIROS_LT_HOLD_S (60), KAIROS_LT_BATCH (events per device request, 1000),
KAIROS_LT_CUSTOMERS (population, 100000), KAIROS_LT_DECIDE_RPS (requests/s per web session,
1), KAIROS_LT_REPORT (a JSON file: events accepted and rejected as the responses said).
KAIROS_API_KEY (required): a key with the scopes ingest, ingest_restricted, decide and
read_profile (``kairos keys create lt -s ingest -s ingest_restricted -s decide -s read_profile``).

Every event id is unique (a per-process prefix and a counter), so every accepted event must be
applied exactly once: ``loadtests/run_loadtest.py`` checks that against the server's counters.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Any

import msgpack
from locust import FastHttpUser, LoadTestShape, between, constant_throughput, events, task

USERS = int(os.environ.get("KAIROS_LT_USERS", "40"))
RAMP_S = float(os.environ.get("KAIROS_LT_RAMP_S", "10"))
HOLD_S = float(os.environ.get("KAIROS_LT_HOLD_S", "60"))
BATCH = int(os.environ.get("KAIROS_LT_BATCH", "1000"))
CUSTOMERS = int(os.environ.get("KAIROS_LT_CUSTOMERS", "100000"))
DECIDE_RPS = float(os.environ.get("KAIROS_LT_DECIDE_RPS", "1"))
REPORT = os.environ.get("KAIROS_LT_REPORT")

_PREFIX = random.SystemRandom().getrandbits(22) << 40  # this process's event ids
_ids = itertools.count(1)
_totals = {"accepted": 0, "rejected": 0, "requests": 0}
CITIES = [(52.52, 13.405), (48.137, 11.575), (53.551, 9.993), (50.937, 6.96), (48.775, 9.182)]
PAGES = ["/", "/plans", "/shop/phones", "/cart", "/account/usage"]
MSGPACK = {"content-type": "application/msgpack"}
#: every user sends the key (FastHttpUser.default_headers)
KEYED = {"Authorization": f"Bearer {os.environ.get('KAIROS_API_KEY', '')}"}


def customer(rng: random.Random) -> str:
    """Skewed activity: a few customers are much busier than most."""
    return f"lt-{int(CUSTOMERS * rng.random() ** 2)}"


def device_batch(rng: random.Random, size: int) -> list[dict[str, Any]]:
    """One device gateway's batch: mostly usage, some location, a few page views."""
    now = int(time.time() * 1000)
    out: list[dict[str, Any]] = []
    for i in range(size):
        event: dict[str, Any] = {
            "event_id": _PREFIX | next(_ids),
            "customer_id": customer(rng),
            "ts": now - (size - i),
        }
        r = rng.random()
        if r < 0.02:  # a profile (plan, home, zone) so thresholds and trips can fire
            lat, lon = CITIES[rng.randrange(len(CITIES))]
            event.update(
                kind="profile_update",
                plan_data_cap_mb=rng.choice([2000.0, 5000.0, 10000.0]),
                cycle_day=rng.randint(1, 28),
                home_lat=lat,
                home_lon=lon,
                tz="Europe/Berlin",
                channels=["sms", "push", "app", "web"],
            )
        elif r < 0.8:
            event["kind"] = "usage"
            event["mb"] = round(rng.expovariate(1 / 40), 2)
        elif r < 0.95:
            lat, lon = CITIES[rng.randrange(len(CITIES))]
            event.update(kind="location", lat=lat + rng.gauss(0, 0.05), lon=lon)
        else:
            event.update(kind="page_view", page=PAGES[rng.randrange(len(PAGES))])
        out.append(event)
    return out


class DeviceUser(FastHttpUser):
    """A device gateway posting msgpack batches of events as fast as they are accepted."""

    weight = 4
    wait_time = between(0, 0.01)
    default_headers = KEYED

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def post_events(self) -> None:
        body = msgpack.packb(device_batch(self.rng, BATCH))
        with self.client.post(
            "/v1/events", data=body, headers=MSGPACK, name="POST /v1/events", catch_response=True
        ) as response:
            if response.status_code != 202:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            report = response.json()
            _totals["accepted"] += report["accepted"]
            _totals["rejected"] += report["rejected"]
            _totals["requests"] += 1
            if report["rejected"]:
                response.failure(f"{report['rejected']} rejected: {report['errors'][:1]}")


class WebSession(FastHttpUser):
    """A web or app session asking for the next best action on the page it shows."""

    weight = 2
    wait_time = constant_throughput(DECIDE_RPS)
    default_headers = KEYED

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def decide(self) -> None:
        body = {
            "customer_id": customer(self.rng),
            "channel": self.rng.choice(["web", "app"]),
            "context": {"page": self.rng.choice(PAGES)},
        }
        self.client.post("/v1/decide", json=body, name="POST /v1/decide")


class Agent(FastHttpUser):
    """A call-center agent opening customers' golden records."""

    weight = 1
    wait_time = between(0.5, 2)
    default_headers = KEYED

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def profile(self) -> None:
        with self.client.post(
            "/v1/customers/lookup",
            json={"customer_id": customer(self.rng)},
            name="POST /v1/customers/lookup",
            catch_response=True,
        ) as response:
            if response.status_code == 404:
                response.success()  # not every customer has sent an event yet


class RampAndHold(LoadTestShape):
    """Ramp up to KAIROS_LT_USERS over KAIROS_LT_RAMP_S, hold for KAIROS_LT_HOLD_S, stop."""

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        if t < RAMP_S:
            return max(1, round(USERS * t / RAMP_S)), max(1.0, USERS / max(RAMP_S, 1))
        if t < RAMP_S + HOLD_S:
            return USERS, max(1.0, USERS / max(RAMP_S, 1))
        return None


@events.test_stop.add_listener
def _write_report(**_: Any) -> None:
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(_totals, f)
