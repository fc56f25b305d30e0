"""Shared fixtures: settings, rules and an event factory for the pure core."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# the session's Ray listens on loopback only, as `kairos serve`'s does (deploy.launch); set
# before anything imports Ray, which reads it then
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from engine.config import EngineSettings
from engine.rules.spec import RuleSet, load_rules
from engine.testing import EventFactory, utc_ms

ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = ROOT / "deploy" / "config" / "rules.yaml"
#: the moments before issue 17, for tests that need a log rich in decisions (see the file)
BROAD_RULES = ROOT / "loadtests" / "rules_before_patterns.yaml"


@pytest.fixture
def settings() -> EngineSettings:
    return EngineSettings(shards=2, allowed_lateness_s=60, dedupe_window_s=3600)


@pytest.fixture
def rules() -> RuleSet:
    return load_rules(RULES_FILE)


def ms(*args: int) -> int:
    """Epoch ms of a UTC date-time: ms(2026, 3, 1, 12) is noon on 1 March 2026."""
    return utc_ms(*args)


@pytest.fixture
def event() -> EventFactory:
    """Factory of wire events with fresh ids: event("usage", "c1", ts, mb=100)."""
    return EventFactory()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Cluster:
    """The session's local Ray cluster: Serve's HTTP proxy and the node's metrics endpoint."""

    http_port: int
    metrics_port: int
    #: the session's API keys: every service the suites deploy reads this file
    keys_file: str = ""
    #: a key with every scope, which ``tests.keys.http`` carries
    token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One local Ray cluster with Serve for the whole session (starting one takes seconds)."""
    import ray
    from ray import serve

    from actors.runtime import init_ray
    from tests.keys import make_key, use_key

    keys_file = str(tmp_path_factory.mktemp("keys") / "keys.json")
    cluster = Cluster(free_port(), free_port(), keys_file, make_key(keys_file))
    use_key(cluster.token)
    init_ray(num_cpus=4, object_store_mb=512, metrics_export_port=cluster.metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": cluster.http_port})
    yield cluster
    serve.shutdown()
    ray.shutdown()
