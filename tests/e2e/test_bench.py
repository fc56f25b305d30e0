"""The throughput benchmark as `make bench` runs it, on a small stream: one JSON line per shard
count with the keys issue 3 names, and the same triggers whatever the number of shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_prints_one_json_line_per_shard_count() -> None:
    done = subprocess.run(
        [
            sys.executable, "loadtests/bench_throughput.py", "--events", "40000",
            "--customers", "4000", "--shards", "1", "2", "--repeat", "2",
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["shards"] for line in lines] == [1, 2]
    for line in lines:
        for key in ("events_per_s", "p50_ms", "p99_ms", "state_bytes_per_customer", "peak_rss_mb"):
            assert line[key] > 0, key
        assert line["runs"] == 2 and len(line["events_per_s_runs"]) == 2
        assert line["events_per_s"] in line["events_per_s_runs"]
        assert line["applied"] + line["rejected"] + line["duplicates"] == 40_000
    assert lines[0]["triggers"] == lines[1]["triggers"] > 0
    assert lines[0]["triggers_by_rule"] == lines[1]["triggers_by_rule"]


@pytest.mark.slow
def test_ranker_benchmark_scores_through_serve_with_the_largest_model() -> None:
    done = subprocess.run(
        [
            sys.executable, "loadtests/bench_ranker.py", "--rows", "5000", "--seconds", "1",
            "--concurrency", "2",
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["model"] == "full" and line["trees"] == 150
    assert line["leaves_per_tree"] > 24  # grown to depth 5, not the shallow bootstrap
    assert line["rows_per_s"] > 0 and line["requests_per_s"] > 0
    assert line["features"] == 24 and line["concurrency"] == 2
