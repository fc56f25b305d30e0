"""The engine on two Ray nodes on one machine: a shard of the second node killed, then the node
removed, during a replay; the outputs equal a run without faults (``tests/faults/multinode.py``
runs in a process of its own: a driver joins one cluster per process)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.faults


def test_two_nodes_a_shard_and_then_a_node_lost() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.faults.multinode", "--events", "300000"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
        # every node of the cluster and the driver with one token of the test's own
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["second_node_used"] and result["nodes"] == 2, result
    assert result["faults"] == ["a shard on the second node killed", "the second node removed"]
    assert len(result["recoveries"]) >= 2, result
    assert result["faulty"] == result["clean"], result
    assert result["applied"][0] == result["applied"][1]
