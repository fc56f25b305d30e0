"""The HTTP API end to end: real Ray Serve, real HTTP through Serve's proxy, real shard actors,
a real XGBoost ranker; status codes, content types, errors, decisions logged, rules swapped,
metrics scraped, and the OpenAPI spec fuzzed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT
from tests.keys import bearer, http, lookup, make_key

pytestmark = pytest.mark.integration

MSGPACK = {"content-type": "application/msgpack"}


def now_ms() -> int:
    return int(time.time() * 1000)


def profile(customer: str, event_id: int, ts: int) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "customer_id": customer,
        "kind": "profile_update",
        "ts": ts,
        "plan_data_cap_mb": 1000.0,
        "cycle_day": 1,
        "home_lat": 52.52,
        "home_lon": 13.405,
        "tz": "Europe/Berlin",
        "channels": ["sms", "push"],
    }


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_a_batch_mixing_valid_and_invalid_events_applies_the_valid_ones(service) -> None:
    url, _, _ = service
    t = now_ms()  # the newest so far: the shared service has seen earlier tests' events
    events = [
        profile("http-a", 101, t),
        {"event_id": 102, "customer_id": "http-a", "kind": "usage", "ts": t + 1, "mb": 850.0},
        {"event_id": 103, "customer_id": "http-a", "kind": "usage", "ts": t + 2, "mb": -5},
        {"event_id": 104, "customer_id": "http-a", "kind": "teleport", "ts": t + 3},
        {"event_id": 105, "customer_id": "http-a", "kind": "usage", "ts": "yesterday", "mb": 1},
    ]
    r = http.post(f"{url}/v1/events", data=msgpack.packb(events), headers=MSGPACK)
    assert r.status_code == 202, r.text
    report = r.json()
    assert (report["accepted"], report["rejected"]) == (2, 3)
    errors = {e["index"]: e for e in report["errors"]}
    assert set(errors) == {2, 3, 4}
    assert errors[2]["field"] == "mb" and "-5" in errors[2]["value"]
    assert errors[3]["field"] == "kind" and "teleport" in errors[3]["reason"]
    assert errors[4]["field"] == "ts"

    def record() -> Any:
        r = lookup(url, "http-a")
        return r.json() if r.status_code == 200 and r.json()["recent_triggers"] else None

    body = wait_for(record)  # applied once the stream went quiet (idle release)
    assert body is not None
    assert body["profile"]["plan_data_cap_mb"] == 1000.0
    assert body["profile"]["channels"] == ["sms", "push"]
    assert body["aggregates"]["cycle_usage_mb"] == 850.0
    assert body["recent_triggers"][0]["rule_id"] == "data_cap_nearing"
    assert body["recent_triggers"][0]["values"]["pct_of_cap"] == pytest.approx(85.0)
    assert body["recent_decisions"][0]["rule_id"] == "data_cap_nearing"


def test_json_events_are_accepted_one_or_many(service) -> None:
    url, _, _ = service
    ts = datetime.now(UTC).isoformat()
    one = {"event_id": "evt-1", "customer_id": "http-j", "kind": "page_view", "ts": ts,
           "page": "/plans"}  # fmt: skip
    r = http.post(f"{url}/v1/events", json=one)
    assert r.status_code == 202 and r.json()["accepted"] == 1
    r = http.post(f"{url}/v1/events", json=[{**one, "event_id": "evt-2"}])
    assert r.status_code == 202 and r.json()["accepted"] == 1


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [
        (b"\xc1\xc1\xc1", MSGPACK, 400, "not valid msgpack"),
        (msgpack.packb(42), MSGPACK, 400, "expected an event"),
        (b"{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b"a,b\n1,2", {"content-type": "text/csv"}, 415, "text/csv"),
        (b"", {}, 415, "not supported"),
        (msgpack.packb([{"x": "y" * 10_000}] * 1_700), MSGPACK, 413, "over the limit"),
    ],
)
def test_unreadable_bodies_get_a_clear_client_error(service, body, headers, status, says) -> None:
    url, _, _ = service
    r = http.post(f"{url}/v1/events", data=body, headers=headers)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_decide_answers_for_the_channel_and_the_decision_is_logged(service) -> None:
    url, config, gateway = service
    import ray

    t = now_ms()
    events = [profile("http-d", 201, t)]
    http.post(f"{url}/v1/events", data=msgpack.packb(events), headers=MSGPACK)
    wait_for(lambda: lookup(url, "http-d").status_code == 200)
    body = {"customer_id": "http-d", "channel": "web", "context": {"page": "/plans"},
            "request_id": "req-1"}  # fmt: skip
    r = http.post(f"{url}/v1/decide", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert len(d["decision_id"]) == 16
    assert 0 < d["probability"] <= 1
    # only offers shown on the web are candidates; the roaming pass is push/sms only
    offered = {c["offer_id"] for c in d["candidates"]}
    assert offered <= {"data_pass_1gb", "plan_upgrade", "cart_incentive"} and offered
    if d["action"] != "NO_ACTION":
        assert d["channel"] == "web" and d["model_version"]
    ray.get(gateway.drain.remote())  # writes the decision log
    log = ds.dataset(f"{config.data_dir}/decisions", format="parquet", partitioning="hive")
    ids = {f"{i:016x}" for i in log.to_table(columns=["decision_id"]).column(0).to_pylist()}
    assert d["decision_id"] in ids
    # the same request id gets the same decision id (idempotent draws)
    again = http.post(f"{url}/v1/decide", json=body).json()
    assert again["decision_id"] == d["decision_id"]
    record = lookup(url, "http-d").json()
    assert record["recent_decisions"][0]["decision_id"] == d["decision_id"]


@pytest.mark.parametrize(
    "body",
    [
        {"customer_id": "x", "channel": "carrier_pigeon"},
        {"channel": "web"},
        {"customer_id": "", "channel": "web"},
        {"customer_id": "x", "channel": "web", "context": {"ts": "not a time"}},
    ],
)
def test_decide_rejects_a_malformed_request_with_422(service, body) -> None:
    url, _, _ = service
    assert http.post(f"{url}/v1/decide", json=body).status_code == 422


def test_an_unknown_customer_is_404(service) -> None:
    url, _, _ = service
    r = lookup(url, "nobody-at-all")
    assert r.status_code == 404 and "no event of this customer" in r.json()["detail"]
    assert "nobody-at-all" not in r.text  # the identifier is not echoed


def test_rules_are_replaced_at_run_time_and_an_invalid_document_changes_nothing(service) -> None:
    url, _, _ = service
    running = http.get(f"{url}/v1/rules").json()
    ids = [r["id"] for r in running["rules"]]
    assert "data_cap_nearing" in ids
    broken = {"rules": [{**running["rules"][0], "threshold": "0.8 * nonsense"}]}
    r = http.put(f"{url}/v1/rules", json=broken)
    assert r.status_code == 422
    assert any("nonsense" in e for e in r.json()["errors"])
    assert http.get(f"{url}/v1/rules").json() == running
    fewer = {"rules": [r for r in running["rules"] if r["id"] != "away_from_home"]}
    r = http.put(
        f"{url}/v1/rules", data=yaml.safe_dump(fewer), headers={"content-type": "application/yaml"}
    )
    assert r.status_code == 200 and r.json()["rules"] == len(ids) - 1
    assert "away_from_home" not in [x["id"] for x in http.get(f"{url}/v1/rules").json()["rules"]]
    assert http.put(f"{url}/v1/rules", json=running).status_code == 200
    r = http.put(f"{url}/v1/rules", data=b"rules: [", headers={"content-type": "text/yaml"})
    assert r.status_code == 400


def test_offers_are_replaced_at_run_time_and_an_invalid_catalog_changes_nothing(service) -> None:
    url, _, _ = service
    running = http.get(f"{url}/v1/offers").json()
    bad = {**running, "offers": [{**running["offers"][0], "channels": ["telepathy"]}]}
    r = http.put(f"{url}/v1/offers", json=bad)
    assert r.status_code == 422 and any("telepathy" in e for e in r.json()["errors"])
    assert http.get(f"{url}/v1/offers").json() == running
    assert http.put(f"{url}/v1/offers", json=running).status_code == 200


def test_a_reference_table_is_replaced_at_run_time_and_the_recall_moment_follows_it(
    service, ray_cluster
) -> None:
    """PUT /v1/reference/stock: refused whole (422, 400, 404, 415, 403) with nothing changed, or
    taken and broadcast: a recalled phone next to a store that sold out gets no recall moment,
    one next to a store with the replacement does."""
    url, _, _ = service
    summary = http.get(f"{url}/v1/reference").json()
    assert summary["tables"]["stores"] > 20 and summary["tables"]["recalls"] == 1
    stores = {s["store_id"]: s for s in http.get(f"{url}/v1/reference/stores").json()["rows"]}
    stock = http.get(f"{url}/v1/reference/stock").json()["rows"]
    held = [s for s in stock if s["product"] == "Nimbus X3" and s["quantity"] > 0]
    shop = stores[held[0]["store_id"]]
    csv = "store_id,product,quantity\nNOWHERE,Nimbus X3,3\n"
    r = http.put(f"{url}/v1/reference/stock", data=csv, headers={"content-type": "text/csv"})
    assert r.status_code == 422 and "NOWHERE" in r.json()["errors"][0], r.text
    bad = http.put(f"{url}/v1/reference/stock", data="store_id,quantity\nA,many\n",
                   headers={"content-type": "text/csv"})  # fmt: skip
    assert bad.status_code == 400 and "not valid csv" in bad.json()["detail"]
    unknown = http.put(f"{url}/v1/reference/shops", json=[])
    assert unknown.status_code == 404 and "stores" in unknown.text
    wrong = http.put(f"{url}/v1/reference/stock", data=b"x", headers={"content-type": "image/png"})
    assert wrong.status_code == 415
    plain = bearer(make_key(ray_cluster.keys_file, ["ingest"], name="no-admin"))
    time.sleep(1.2)  # the replicas see the new key
    assert http.put(f"{url}/v1/reference/stock", json=stock, headers=plain).status_code == 403
    assert http.get(f"{url}/v1/reference").json() == summary  # nothing changed

    def recall_moment(customer: str, event_id: int) -> bool:
        t = now_ms()
        events = [
            {**profile(customer, event_id, t), "device_model": "Nimbus X2"},
            {"event_id": event_id + 1, "customer_id": customer, "kind": "location", "ts": t + 1,
             "lat": shop["lat"], "lon": shop["lon"]},
            {"event_id": event_id + 2, "customer_id": customer, "kind": "usage", "ts": t + 2,
             "mb": 1.0},
        ]  # fmt: skip
        assert http.post(f"{url}/v1/events", json=events).status_code == 202

        def applied() -> Any:
            r = lookup(url, customer)
            ok = r.status_code == 200 and r.json()["aggregates"]["event_count"] == 3
            return r.json() if ok else None

        body = wait_for(applied)
        assert body is not None, customer
        return "recalled_device_in_use" in [t["rule_id"] for t in body["recent_triggers"]]

    sold_out = [s for s in stock if s["product"] != "Nimbus X3"]
    r = http.put(f"{url}/v1/reference/stock", json=sold_out)
    assert r.status_code == 200 and r.json()["rows"] == len(sold_out), r.text
    assert http.get(f"{url}/v1/reference").json()["version"] != summary["version"]
    assert not recall_moment("http-recall-1", 9101)
    parquet = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(stock), parquet)
    r = http.put(f"{url}/v1/reference/stock", data=parquet.getvalue(),
                 headers={"content-type": "application/vnd.apache.parquet"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert http.get(f"{url}/v1/reference").json() == summary  # the same tables: the same version
    assert recall_moment("http-recall-2", 9201)


def test_health_and_readiness(service) -> None:
    url, _, _ = service
    assert http.get(f"{url}/healthz").json() == {"status": "ok"}
    r = http.get(f"{url}/readyz")
    assert r.status_code == 200 and r.json()["shards"] == 2
    spec = http.get(f"{url}/openapi.json").json()
    assert {"/v1/events", "/v1/decide", "/v1/customers/lookup", "/v1/rules"} <= set(spec["paths"])
    assert "application/msgpack" in spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]


def test_kairos_metrics_appear_on_the_nodes_metrics_endpoint(service, ray_cluster) -> None:
    url, _, _ = service
    t = now_ms()
    events = [profile("http-m", 301, t - 3000)]
    events.append({"event_id": 302, "customer_id": "http-m", "kind": "usage", "ts": t - 2000,
                   "mb": 900.0})  # fmt: skip
    events.append({"event_id": 303, "customer_id": "http-m", "kind": "usage", "ts": t, "mb": -1})
    http.post(f"{url}/v1/events", data=msgpack.packb(events), headers=MSGPACK)
    http.post(f"{url}/v1/decide", json={"customer_id": "http-m", "channel": "app"})
    wanted = [
        "ray_kairos_events_ingested_total{",
        "ray_kairos_events_rejected_total{",
        "ray_kairos_triggers_total{",
        "ray_kairos_decisions_total{",
        "ray_kairos_micro_batch_latency_ms_bucket{",
        "ray_kairos_shard_queue_depth{",
        "ray_kairos_shard_pending_events{",
        "ray_kairos_ranker_latency_ms_bucket{",
        "ray_kairos_model_version_live{",
    ]

    def missing() -> list[str]:
        text = http.get(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics").text
        return [w for w in wanted if w not in text]

    assert wait_for(lambda: not missing(), timeout=40), missing()
    text = http.get(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics").text
    assert 'kind="usage"' in text and 'rule="data_cap_nearing"' in text


def test_a_short_locust_run_has_no_failure_and_every_accepted_event_is_applied(
    service, ray_cluster, tmp_path: Path
) -> None:
    url, _, _ = service
    result = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "run_loadtest.py"), "--host", url,
         "--users", "6", "--ramp", "2", "--hold", "8", "--batch", "200",
         "--out", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "KAIROS_API_KEY": ray_cluster.token},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    requests_by_name = report["requests"]
    assert requests_by_name["POST /v1/events"]["requests"] > 0
    assert requests_by_name["POST /v1/decide"]["requests"] > 0
    assert all(r["failures"] == 0 for r in requests_by_name.values())
    assert report["events_ingested_by_gateway"] == report["events_applied"] > 0
    assert report["events_accepted_by_api"] <= report["events_ingested_by_gateway"]
    assert (tmp_path / "locust.html").exists() and (tmp_path / "locust_stats.csv").exists()


@pytest.mark.parametrize("keyed", [True, False], ids=["with-key", "without-key"])
def test_schema_driven_fuzzing_with_every_check_passes(
    service, ray_cluster, tmp_path: Path, keyed: bool
) -> None:
    """Schemathesis over the whole API (PUTs of rules and offers included). With a key, every
    check: no server error, every status and body as documented, schema-invalid data refused,
    schema-valid data taken (see tests/e2e/schemathesis.toml for the one exception), and
    ``ignored_auth``: each operation refuses a request without the key. Without a key: no
    server error, and every answer is documented (401 everywhere but the health checks)."""
    url, _, _ = service
    schema = tmp_path / "openapi.json"
    schema.write_text(http.get(f"{url}/openapi.json").text)  # the schema itself needs a key
    tables = ("stores", "stock", "recalls", "accessories")  # stores before the stock of them
    kept = {name: http.get(f"{url}/v1/reference/{name}").json()["rows"] for name in tables}
    st = Path(sys.executable).with_name("st")
    auth = ["-H", f"Authorization: Bearer {ray_cluster.token}"] if keyed else []
    checks = "all" if keyed else "not_a_server_error,status_code_conformance"
    result = subprocess.run(
        [
            str(st), "--config-file", str(ROOT / "tests" / "e2e" / "schemathesis.toml"),
            "run", str(schema), "--url", url, *auth, "--checks", checks,
            "--max-examples", "40" if keyed else "10", "--seed", "7", "--request-timeout", "30",
            "--report", "junit", "--report-dir", str(tmp_path),
        ],
        check=False, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    for name in tables:  # what the fuzzing replaced (an empty stock is a valid table)
        assert http.put(f"{url}/v1/reference/{name}", json=kept[name]).status_code == 200
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "generated" in result.stdout, result.stdout[-2000:]
