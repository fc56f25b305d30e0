"""The e2e suites' one running service: the API, gateway, shards and ranker on the session's
cluster, behind Serve's HTTP proxy (deploying one takes seconds: every module shares it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Cluster


@pytest.fixture(scope="session")
def service(ray_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import ray
    from ray import serve

    from deploy.api import API_APP, api_app_config
    from deploy.natsserver import EmbeddedNats
    from deploy.service import ServiceConfig
    from models.deployment import apply_apps

    data = tmp_path_factory.mktemp("service")
    broker = EmbeddedNats(data / "nats")
    config = ServiceConfig(
        name="kairos-e2e",
        data_dir=str(data),
        keys_file=ray_cluster.keys_file,
        dev_mode=True,  # the public development pseudonym key: a test suite
        idle_release_ms=300,
        nats_url=broker.start(),
        checkpoint_every_s=2.0,
    )
    apply_apps([api_app_config(config, replicas=2)])  # two, as kairos serve runs
    gateway = ray.get_actor(config.gateway_name, namespace=config.namespace)
    yield ray_cluster.url, config, gateway
    serve.delete(API_APP)
    ray.get(gateway.shutdown.remote())
    ray.kill(gateway)
    broker.stop()
