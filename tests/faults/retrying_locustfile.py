"""Locust users for the kill test (``test_serve_killed.py``): devices that post usage batches
and resend each one, with the same Idempotency-Key, until it gets 202.

Every batch is made from its number alone (``batch``), so the test can make it again; its
Idempotency-Key is ``kt-b<number>``. Each user appends ``sent N`` to ``KAIROS_KT_RECORD`` before
the first attempt and ``ok N`` after the 202: a batch sent but never answered (Locust stopped
during its retries) is resent by the test.

An answer other than 202, 503, no answer at all (the service is down) or Serve's own 404 of the
seconds before any application is deployed (counted as ``serve-404``) is a Locust failure.
"""

from __future__ import annotations

import itertools
import os
import time

import msgpack
from locust import FastHttpUser, constant, task

from tests.faults.killtest import batch

RECORD = os.environ.get("KAIROS_KT_RECORD", "kill-test-record.txt")
AUTHORIZATION = f"Bearer {os.environ['KAIROS_API_KEY']}"
_batches = itertools.count()
#: what Serve's proxy answers for a route no application has yet
SERVE_STARTING = "not found. Ping http"


class RetryingDevice(FastHttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.record = open(RECORD, "a", buffering=1)  # noqa: SIM115 (a line per write)

    def on_stop(self) -> None:
        self.record.close()

    def _post(self, body: bytes, key: str) -> int:
        headers = {
            "content-type": "application/msgpack",
            "Idempotency-Key": key,
            "Authorization": AUTHORIZATION,
        }
        with self.client.post(
            "/v1/events", data=body, headers=headers, name="POST /v1/events", catch_response=True
        ) as response:
            status = response.status_code or 0
            if status in (202, 503, 0):  # 0: refused or reset while the service is down
                response.success()
            elif status == 404 and SERVE_STARTING in (response.text or ""):
                # Serve's proxy in the seconds before any application is deployed: a client
                # retries it like a 503
                response.success()
                self.record.write("serve-404 -1\n")
            else:
                response.failure(f"status {status}: {(response.text or '')[:200]}")
            return int(status)

    @task
    def post(self) -> None:
        number = next(_batches)
        key = f"kt-b{number}"
        body = msgpack.packb(batch(number))
        self.record.write(f"sent {number}\n")
        while self._post(body, key) != 202:
            time.sleep(0.2)
        self.record.write(f"ok {number}\n")
