"""Cluster submission for real: `ray start --head`, `ray job submit --working-dir .`, SUCCEEDED."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node of its own (not the session's cluster), stopped by killing its process group:
    `ray stop` would stop every Ray on the machine."""
    dashboard, gcs = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # token authentication, with a token of the test's own for the head and its clients
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    logs = tmp_path_factory.mktemp("head")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--include-dashboard=true", "--num-cpus=2", "--object-store-memory=300000000",
         "--disable-usage-stats",
         # another Ray (the session's cluster) may run here: none of its default ports
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}",
         f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        env=env, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail(f"head node did not come up: {(logs / 'head.log').read_text()[-2000:]}")
    yield address, env
    # SIGTERM first (the head cleans up its session), SIGKILL after 5 s: a graceful stop of
    # the whole head took about 30 s here, a third of this module's time
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # `ray start` recorded this head as the machine's current cluster; `serve run` and
    # `ray.init("auto")` would try to join it after we are gone
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{gcs}"):
        current.unlink()


def submit(address: str, env: dict[str, str], *job: str) -> subprocess.CompletedProcess[str]:
    """`ray job submit ... -- job`; retried while the head's job agent is still starting."""
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--", *job],
            env=env, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
        )  # fmt: skip
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(2)


def test_a_replay_job_submitted_to_a_cluster_succeeds_and_reports(head) -> None:
    address, env = head
    result = submit(
        address, env, "python", "-m", "deploy.job", "replay", "--generate", "30000",
        "--customers", "3000", "--shards", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    line = next(x for x in reversed(result.stdout.splitlines()) if x.startswith('{"job"'))
    report = json.loads(line)
    assert report["events"] == 30_000
    # the generator repeats some events (devices retry): each is applied once
    assert report["applied"] + report["rejected"] + report["duplicates"] == 30_000
    assert report["duplicates"] > 0
    assert report["triggers"] > 0 and report["triggers_by_rule"]["data_cap_nearing"] > 0


def test_a_job_with_bad_arguments_fails_with_one_clear_line(head) -> None:
    address, env = head
    result = submit(
        address, env, "python", "-m", "deploy.job", "replay", "--file", "/nowhere/events.parquet"
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "failed" in output.lower()
    assert "error:" in output and "/nowhere/events.parquet" in output


def test_the_jobs_api_refuses_a_job_without_the_token(head) -> None:
    """The head runs with token authentication: `POST /api/jobs/` without it (the ShadowRay
    attack: any command as entrypoint) is refused, and `ray job submit` with a wrong token
    fails; nothing ran."""
    import requests

    address, env = head
    r = requests.post(f"{address}/api/jobs/", json={"entrypoint": "id"}, timeout=30)
    assert r.status_code in (401, 403), r.text[:300]
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--", "id"],
        env=wrong, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0 and "uid=" not in result.stdout, result.stdout[-2000:]
