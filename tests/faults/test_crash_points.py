"""The crash-point matrix: a replay's process (or its sink actor) exits hard at each named step
of a checkpoint; the run resumed from the last complete checkpoint ends with the outputs of a
run without the crash (every trigger and decision written once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.faults


def _run(out: Path, resume: bool = False, crash: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if crash:
        env.update(KAIROS_CRASH_AT=crash, KAIROS_CRASH_AFTER="3",
                   KAIROS_CRASH_MARK=str(out / "crashed"))  # fmt: skip
    command = [sys.executable, "-m", "tests.faults.crashpoint", "--out", str(out)]
    return subprocess.run(
        [*command, *(["--resume"] if resume else [])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def _result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    return _result(_run(tmp_path_factory.mktemp("clean")))


@pytest.mark.parametrize(
    "step",
    [
        "checkpoint:before_manifest",  # shard snapshots written, sinks pre-committed
        "checkpoint:before_current",  # the manifest written, CURRENT not replaced
        "checkpoint:before_commit",  # CURRENT replaced, the sinks' files not renamed
    ],
)
def test_a_driver_killed_at_each_step_resumes_to_the_same_outputs(clean, tmp_path, step) -> None:
    crashed = _run(tmp_path, crash=step)
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    assert (tmp_path / "crashed").read_text() == step
    resumed = _result(_run(tmp_path, resume=True))
    assert resumed["logs"] == clean["logs"]


def test_a_sink_killed_during_its_commit_recovers_in_the_run(clean, tmp_path) -> None:
    """The decision sink actor dies between two renames: the run notices, restores
    from CURRENT (the sink settles: pending files up to CURRENT committed, later ones dropped)
    and goes on."""
    done = _result(_run(tmp_path, crash="sink:decisions:during_commit"))
    assert (tmp_path / "crashed").exists()
    assert done["recoveries"] >= 1
    assert done["logs"] == clean["logs"]
