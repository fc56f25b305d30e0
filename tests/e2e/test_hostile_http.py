"""Hostile requests against the real HTTP API (Serve's proxy, the gateway, the shards): each
gets a 4xx naming what is wrong, or a 202 whose dead letters name it; never a 500; and the
service keeps applying valid events. The cases of issue 13, one by one."""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
import pytest
import requests

from tests.conftest import RULES_FILE
from tests.e2e.test_http_api import MSGPACK, now_ms, profile, wait_for
from tests.keys import http, lookup

pytestmark = pytest.mark.integration

JSON = {"content-type": "application/json"}
YAML = {"content-type": "application/yaml"}


def post_events(url: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return http.post(f"{url}/v1/events", data=body, headers=headers, timeout=60)


def usage(event_id: Any, mb: Any = 1.0, **extra: Any) -> dict[str, Any]:
    return {"event_id": event_id, "customer_id": "hostile-c", "kind": "usage",
            "ts": now_ms(), "mb": mb, **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [
        (b"[" * 10_000 + b"]" * 10_000, JSON, 400, "max_event_depth"),
        (msgpack.packb(list(range(1_000_000))), MSGPACK, 422, "max_events_per_request"),
        (json.dumps([[[[1]]]]).encode(), JSON, 400, "not an event map"),
        (json.dumps([{"mb": {"x": 1}}]).encode(), JSON, 400, "max_event_depth"),
    ],
)
def test_bodies_over_a_limit_are_refused_naming_it(service, body, headers, status, says) -> None:
    url, _, _ = service
    started = time.perf_counter()
    r = post_events(url, body, headers)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]
    assert len(r.content) < 2_000 and time.perf_counter() - started < 10


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'"mb": ' + b"1" + b"0" * 400, "mb"),
        (b'"mb": ' + b"9" * 5000, "mb"),
        (b'"lat": 1' + b"0" * 400 + b', "lon": 1', "lat"),
        (b'"tz": "' + b"x" * 300 + b'"', "tz"),
        (b'"\\ud800": 1', "\\ud800"),
    ],
)
def test_bad_values_are_dead_letters_naming_the_field_next_to_valid_events(
    service, raw, field
) -> None:
    url, _, _ = service
    kind = {"lat": "location", "tz": "profile_update"}.get(field, "usage")
    head = json.dumps({"event_id": "h-bad", "customer_id": "hostile-c", "kind": kind,
                       "ts": now_ms()})[:-1].encode()  # fmt: skip
    good = json.dumps(usage("h-good")).encode()
    body = b"[" + head + b", " + raw + b"}, " + good + b"]"
    r = post_events(url, body, JSON)
    assert r.status_code == 202, r.text
    report = r.json()
    assert (report["accepted"], report["rejected"]) == (1, 1)
    assert report["errors"][0]["field"] == field


def test_an_answer_lists_at_most_100_errors_and_counts_them_all(service) -> None:
    url, _, _ = service
    body = msgpack.packb([usage(i, mb=-1.0) for i in range(1, 5_001)])
    r = post_events(url, body, MSGPACK)
    assert r.status_code == 202
    report = r.json()
    assert report["rejected"] == 5_000 and len(report["errors"]) == 100
    assert report["errors_truncated"] and len(r.content) < 40_000


def test_megabyte_identifiers_are_dead_letters_and_do_not_stall_ingest(service) -> None:
    url, _, _ = service
    huge = [{**usage(f"h-id-{i}"), "customer_id": "c" * (1 << 20)} for i in range(15)]
    started = time.perf_counter()
    r = post_events(url, msgpack.packb(huge), MSGPACK)
    assert r.status_code == 202 and r.json()["rejected"] == 15
    assert {e["field"] for e in r.json()["errors"]} == {"customer_id"}
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("what", ["rules", "offers"])
def test_deep_or_aliased_documents_are_refused_and_nothing_changes(service, what) -> None:
    url, _, _ = service
    running = http.get(f"{url}/v1/{what}").json()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    cases = [
        (b'{"' + what.encode() + b'": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
         JSON, 422, "max_document_depth"),
        (("rules:\n  - " + "[" * 900 + "]" * 900).encode(), YAML, 422, "max_document_depth"),
        (bomb.encode(), YAML, 422, "aliases"),
        (b"x" * (2 << 20), YAML, 413, "max_document_bytes"),
    ]  # fmt: skip
    for body, headers, status, says in cases:
        started = time.perf_counter()
        r = http.put(f"{url}/v1/{what}", data=body, headers=headers, timeout=60)
        assert r.status_code == status, (says, r.text[:500])
        assert says in r.json()["detail"]
        assert time.perf_counter() - started < 5
    assert http.get(f"{url}/v1/{what}").json() == running


@pytest.mark.parametrize(
    "expression", ["not " * 5000 + "true", "-" * 100_000 + "1", "mb > 1" + "0" * 400]
)
def test_expressions_over_a_limit_are_422_for_rules_and_offers(service, expression) -> None:
    url, _, _ = service
    rules = http.get(f"{url}/v1/rules").json()
    bad = {"rules": [{**rules["rules"][0], "when": expression}]}
    r = http.put(f"{url}/v1/rules", json=bad)
    assert r.status_code == 422, r.text[:300]
    offers = http.get(f"{url}/v1/offers").json()
    bad = {**offers, "offers": [{**offers["offers"][0], "eligible": expression}]}
    r = http.put(f"{url}/v1/offers", json=bad)
    assert r.status_code == 422, r.text[:300]


def test_a_poisoned_catalog_is_refused_and_events_keep_being_applied(service) -> None:
    url, _, _ = service
    offers = http.get(f"{url}/v1/offers").json()
    poisoned = {**offers, "offers": [{**o, "cooldown": "99999999999999999999d"}
                                     for o in offers["offers"]]}  # fmt: skip
    r = http.put(f"{url}/v1/offers", json=poisoned)
    assert r.status_code == 422 and any("cooldown" in e for e in r.json()["errors"])
    t = now_ms()
    body = msgpack.packb([profile("hostile-p", "hp-1", t),
                          {**usage("hp-2", mb=900.0), "customer_id": "hostile-p"}])  # fmt: skip
    assert post_events(url, body, MSGPACK).json()["accepted"] == 2

    def applied() -> Any:
        r = lookup(url, "hostile-p")
        return r.status_code == 200 and r.json()["aggregates"]["cycle_usage_mb"] == 900.0

    assert wait_for(applied)
    assert http.get(f"{url}/v1/stats").json()["failed"] == 0


def test_the_shipped_rules_file_round_trips_through_the_api_as_yaml(service) -> None:
    url, _, _ = service
    running = http.get(f"{url}/v1/rules").json()
    r = http.put(f"{url}/v1/rules", data=RULES_FILE.read_bytes(), headers=YAML)
    assert r.status_code == 200, r.text
    assert http.put(f"{url}/v1/rules", json=running).status_code == 200


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (msgpack.packb({"customer_id": "x", "channel": "web"}), MSGPACK),
        (b'{"customer_id": NaN, "channel": "web"}', JSON),
        (b'{"customer_id": "\\ud800", "channel": "web"}', JSON),
        (b'{"customer_id": "x", "channel": "web", "request_id": "\\udfff"}', JSON),
        (json.dumps({"customer_id": "x", "channel": "web",
                     "context": {"ts": "0001-01-01T00:00:00Z"}}).encode(), JSON),
        (json.dumps({"customer_id": "x", "channel": "web",
                     "context": {"ts": "9999-12-31T00:00:00Z"}}).encode(), JSON),
    ],
)  # fmt: skip
def test_decide_refuses_what_it_cannot_carry_with_an_encodable_422(service, body, headers) -> None:
    url, _, _ = service
    r = http.post(f"{url}/v1/decide", data=body, headers=headers, timeout=30)
    assert r.status_code == 422, r.text[:300]
    assert r.json()["detail"]  # a JSON body that names the problem
