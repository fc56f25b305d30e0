"""`kairos doctor`'s rules, each on made-up facts of a running setup."""

from __future__ import annotations

import pytest

from deploy.doctor import Facts, Listener, diagnose

SECRET = "a-secret-of-this-site"


def _good() -> Facts:
    return Facts(
        ray_version="2.60.0",
        auth_mode="token",
        listeners=[
            Listener("gcs_server", 10, "127.0.0.1", 6379),
            Listener("ray::ProxyActor", 11, "127.0.0.1", 8000),
            Listener("nats-server", 12, "127.0.0.1", 4222),
            Listener("raylet", 13, "::1", 40001),
        ],
        jobs_api_status=401,
        worker_pseudonym_key=SECRET,
        active_keys=1,
        token_file_mode=0o600,
    )


def test_the_default_setup_has_no_problem() -> None:
    assert diagnose(_good()) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"ray_version": "2.49.1"}, "no token authentication"),
        ({"auth_mode": "disabled"}, "RAY_AUTH_MODE=disabled"),
        ({"auth_mode": ""}, "RAY_AUTH_MODE=unset"),
        ({"jobs_api_status": 200}, "jobs API answered 200"),
        ({"worker_pseudonym_key": None}, "public development key"),
        ({"worker_pseudonym_key": "kairos-development-key-change-me"}, "public development key"),
        ({"token_file_mode": 0o644}, "chmod 600"),
    ],
)
def test_each_insecure_setting_is_named(change, named) -> None:
    facts = _good()
    for name, value in change.items():
        setattr(facts, name, value)
    problems = diagnose(facts)
    assert len(problems) == 1 and named in problems[0], problems


def test_a_port_beyond_loopback_is_named_with_its_process_and_serve_without_keys_too() -> None:
    facts = _good()
    facts.listeners.append(Listener("ray::ProxyActor", 11, "0.0.0.0", 8000))
    facts.listeners.append(Listener("raylet", 13, "192.0.2.2", 40002))
    problems = diagnose(facts)
    assert any("ray::ProxyActor (pid 11) listens on 0.0.0.0:8000" in p for p in problems)
    assert any("raylet (pid 13) listens on 192.0.2.2:40002" in p for p in problems)
    assert not any("no API key" in p for p in problems)
    facts.active_keys = 0
    assert any("no API key exists" in p for p in diagnose(facts))


def test_no_ray_running_is_not_a_problem_of_its_own() -> None:
    assert diagnose(Facts(ray_version="2.60.0")) == []


def test_a_serve_replica_s_internal_grpc_port_passes_only_with_ray_s_token() -> None:
    """Ray 2.60 binds each Serve replica's inter-deployment gRPC server to every interface;
    it answers only with Ray's token, so it is not a problem then, and is one without."""
    facts = _good()
    facts.listeners.append(Listener("ray::ServeReplica:kairos:api", 20, "::", 46259))
    assert diagnose(facts) == []
    facts.auth_mode = "disabled"
    assert any("ServeReplica:kairos:api (pid 20) listens on ::" in p for p in diagnose(facts))


def test_serve_replicas_on_a_loopback_node_bind_their_internal_grpc_server_to_loopback(
    monkeypatch,
) -> None:
    """Ray 2.60 binds each replica's inter-deployment gRPC server to ``[::]:0``; the
    deployments' constructors make it 127.0.0.1 on a loopback node, and leave it alone on a
    node with a routable address."""
    import ray
    from ray.serve._private import replica

    from models.loopback import confine_serve_grpc

    class Server:
        def __init__(self) -> None:
            self.addresses: list[str] = []

        def add_insecure_port(self, address: str) -> int:
            self.addresses.append(address)
            return 4242

    original = replica.add_port_to_grpc_server
    monkeypatch.setattr(replica, "add_port_to_grpc_server", original)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.1.2.3")
    assert not confine_serve_grpc() and replica.add_port_to_grpc_server is original
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    assert confine_serve_grpc() and confine_serve_grpc()  # twice: wrapped once
    server = Server()
    assert replica.add_port_to_grpc_server(server, "[::]:0") == 4242
    assert replica.add_port_to_grpc_server(server, "10.1.2.3:5000") == 4242
    assert server.addresses == ["127.0.0.1:0", "10.1.2.3:5000"]
