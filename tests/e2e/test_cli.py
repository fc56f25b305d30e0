"""The `kairos` command as a user runs it, in a subprocess with its own embedded Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

KAIROS = [sys.executable, "-m", "deploy.cli"]
ENV = {**os.environ, "COLUMNS": "120"}


def kairos(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KAIROS, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300, check=False
    )


@pytest.mark.slow
def test_demo_replays_with_decisions_and_compares_with_a_blanket_campaign(tmp_path) -> None:
    done = kairos(
        "demo", "--customers", "2000", "--events", "30000", "--out", str(tmp_path),
        "--loop-customers", "1500", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Kairos replay summary" in done.stdout
    assert "data_cap_nearing" in done.stdout and "away_from_home" in done.stdout
    triggers = pq.read_table(str(tmp_path / "triggers"))
    assert triggers.num_rows > 0
    assert {"data_cap_nearing", "away_from_home"} <= set(triggers.column("rule_id").to_pylist())
    decisions = pq.read_table(str(tmp_path / "decisions"))
    answered = {"data_cap_nearing", "over_cap_third_time", "away_from_home",
                "recalled_device_in_use", "cart_left_while_browsing"}  # fmt: skip
    assert decisions.num_rows == sum(
        1 for r in triggers.column("rule_id").to_pylist() if r in answered
    )
    assert (tmp_path / "models" / "CHAMPION").exists()
    assert "Decisions" in done.stdout and "delivered" in done.stdout
    assert "blanket" in done.stdout and "x its acceptance rate" in " ".join(done.stdout.split())


@pytest.mark.slow
def test_replay_of_ndjson_dead_letters_bad_lines_and_applies_the_rest(tmp_path) -> None:
    lines = [
        {
            "event_id": 1,
            "customer_id": "+4915100000001",
            "kind": "profile_update",
            "ts": "2026-03-01T00:00:00Z",
            "plan_data_cap_mb": 1000,
            "cycle_day": 1,
            "home_lat": 52.52,
            "home_lon": 13.4,
            "tz": "Europe/Berlin",
        },
        {
            "event_id": 2,
            "customer_id": "+4915100000001",
            "kind": "usage",
            "ts": "2026-03-02T00:00:00Z",
            "mb": 850,
        },
        {
            "event_id": 3,
            "customer_id": "+4915100000001",
            "kind": "location",
            "ts": "2026-03-02T01:00:00Z",
            "lat": 95.0,
            "lon": 13.4,
        },
    ]
    path = tmp_path / "events.ndjson"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    done = kairos(
        "replay", str(path), "--shards", "1", "--out", str(tmp_path / "out"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"dead-lettered\s+2 ", done.stdout), done.stdout
    triggers = pq.read_table(str(tmp_path / "out" / "triggers"))
    assert triggers.column("rule_id").to_pylist() == ["data_cap_nearing"]
    dead = pq.read_table(str(tmp_path / "out" / "dead-letters")).to_pylist()
    reasons = sorted(d["reason"] for d in dead)
    assert any("'lat' = 95.0 is out of range" in r for r in reasons)
    assert any(r.startswith("line 4: not valid JSON") for r in reasons)
    assert {d["index"] for d in dead} == {3, 4}  # the lines of the file, counted from 1
    assert "+4915100000001" not in json.dumps(dead)


def test_rules_check_reports_problems_in_one_line_each_and_fails(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {id: r1, type: condition, on: usage, when: 'mb >'}\n")
    done = kairos("rules", "check", str(bad), cwd=tmp_path)
    assert done.returncode == 2
    assert f"error: {bad}: rule 'r1': field 'when': syntax error" in done.stderr
    assert "Traceback" not in done.stderr
    ok = kairos(
        "rules", "check", str(Path(__file__).parents[2] / "deploy/config/rules.yaml"), cwd=tmp_path
    )
    assert ok.returncode == 0 and "7 rules OK" in ok.stdout


@pytest.mark.slow
def test_simulate_json_reports_every_policy_and_writes_the_chart(tmp_path) -> None:
    done = kairos(
        "simulate", "--customers", "2000", "--days", "12", "--warmup-days", "6",
        "--policies", "blanket,rules,kairos,oracle,ceiling,uplift,kairos-uplift,uplift-ceiling",
        "--out", str(tmp_path), "--json", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    everyone = ("blanket", "rules", "kairos", "oracle", "ceiling", "uplift", "kairos-uplift",
                "uplift-ceiling")  # fmt: skip
    for policy in everyone:
        r = report[policy]
        assert {"offers_sent", "accepted", "acceptance_rate", "net_value", "opt_outs"} <= set(r)
        assert r["accepted"] <= r["offers_sent"]
        if r["offers_sent"]:
            assert r["acceptance_rate"] == pytest.approx(r["accepted"] / r["offers_sent"])
        moments = r["by_trigger"].values()  # the per-moment breakdown adds up to the whole
        for measure in ("offers_sent", "accepted", "opt_outs"):
            assert sum(m[measure] for m in moments) == r[measure]
        assert sum(m["net_value"] for m in moments) == pytest.approx(r["net_value"])
        incremental = sum(m["incremental_net_value"] for m in moments)
        assert incremental == pytest.approx(r["incremental_net_value"])
        # exploration's share and the policy's own choices add up to the whole too
        parts = (r["explored"], r["chosen"])
        for measure in ("offers_sent", "accepted", "opt_outs"):
            assert sum(p[measure] for p in parts) == r[measure], (policy, measure)
        split = sum(p["incremental_net_value"] for p in parts)
        assert split == pytest.approx(r["incremental_net_value"])
        explores = policy in ("kairos", "ceiling", "kairos-uplift", "uplift-ceiling")
        assert (r["explored"]["offers_sent"] > 0) == explores, policy
    assert set(report["blanket"]["offers_by_action"]) <= {"plan_upgrade"}
    assert set(report["blanket"]["by_trigger"]) == {"data_cap_nearing"}
    assert len(report["kairos"]["by_trigger"]) == 4
    assert report["kairos"]["models"], "kairos trained no model after its warm-up"
    assert [m["version"] for m in report["ceiling"]["models"]] == ["ceiling"]
    fits = report["uplift-ceiling"]["models"]  # at the warm-up's end (day 6), then weekly
    assert all(m["version"] == "uplift-ceiling" and m["promoted"] for m in fits), fits
    assert np.diff([m["cutoff_ms"] for m in fits]).tolist() == [7 * 86_400_000], fits
    # served with the no-action arm, as kairos-uplift serves its models
    assert report["uplift-ceiling"]["no_action_arm"]["decisions"] > 0
    trained = [m for m in report["kairos-uplift"]["models"] if m["version"]]
    assert trained, report["kairos-uplift"]["models"]  # uplift rounds, each judged by the gate
    assert all("DR incremental gain over" in m["reason"] for m in trained), trained
    # the randomized no-action arm of its warm-up is in the log, not in the after-warm-up
    # figures (its share there is 10 %)
    assert report["kairos-uplift"]["no_action_arm"]["decisions"] > 0
    # deciding on true incremental value beats deciding on true response
    assert report["uplift"]["incremental_net_value"] > report["oracle"]["incremental_net_value"]
    assert (tmp_path / "acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["targets"]) == 10  # 4 of them issue 16's, on incremental value
    assert sum("(on data_cap_nearing moments)" in t for t in report["targets"]) == 4
    assert sum(t.startswith("kairos-uplift") for t in report["targets"]) == 4


def test_offers_check_names_the_offer_and_field_in_one_line(tmp_path) -> None:
    bad = tmp_path / "offers.yaml"
    bad.write_text("offers:\n  - {id: x, answers: [r], channels: [fax], value: 1}\n")
    done = kairos("offers", "check", str(bad), cwd=tmp_path)
    assert done.returncode == 2
    assert f"error: {bad}: offer 'x': field 'channels'" in done.stderr
    assert "Traceback" not in done.stderr
    ok = kairos("offers", "check", str(Path(__file__).parents[2] / "deploy/config/offers.yaml"),
                cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0 and "5 offers OK" in ok.stdout


@pytest.mark.slow
def test_train_an_uplift_model_from_a_decision_log_and_its_outcome_events(tmp_path) -> None:
    """`kairos train` on what a user has: a decision log (Parquet) and the events that
    followed (responses, purchases, consent changes; by customer id): an uplift model is
    trained, judged by the incremental-value gate and registered with its three boosters."""
    import pyarrow as pa

    from deploy.paths import DEFAULT_OFFERS, DEFAULT_RULES
    from engine.decision.catalog import load_catalog
    from engine.rules.spec import load_rules
    from models.registry import ModelRegistry
    from models.simulate import Simulation, SimulationConfig

    config = SimulationConfig(customers=3000, days=16, warmup_days=16, seed=3, world="uplift")
    sim = Simulation(config, load_rules(DEFAULT_RULES), load_catalog(DEFAULT_OFFERS),
                     str(tmp_path / "unused"))  # fmt: skip
    run = sim.run("kairos-uplift")  # its warm-up: exploration and a randomized no-action arm
    (tmp_path / "decisions").mkdir()
    pq.write_table(pa.concat_tables(run.decisions), tmp_path / "decisions" / "part.parquet")
    pq.write_table(pa.concat_tables(run.responses), tmp_path / "outcomes.parquet")
    done = kairos(
        "train", str(tmp_path / "decisions"), str(tmp_path / "outcomes.parquet"),
        "--registry", str(tmp_path / "models"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "trained uplift model v0001" in done.stdout
    assert '"qini"' in done.stdout and '"incremental_value"' in done.stdout
    assert ("promoted" in done.stdout) or ("refused" in done.stdout)
    # what the warm-up's randomization gave up, by its own expected values (the prior's)
    line = next(x for x in done.stdout.splitlines() if x.startswith("randomization"))
    cost = json.loads(line.split(": ", 1)[1])
    assert cost["no_action_arm"]["decisions"] > 0 and cost["exploration"]["offers"] > 0, cost
    artifact = ModelRegistry(str(tmp_path / "models")).load("v0001")
    assert artifact.kind == "uplift" and artifact.metrics["train_rows"]["untreated"] > 100
    bad = kairos("train", str(tmp_path / "decisions"), str(tmp_path / "outcomes.parquet"),
                 "--kind", "bandit", cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "--kind 'bandit'" in bad.stderr
