"""Serve replicas bound to loopback on a loopback node (see ``confine_serve_grpc``)."""

from __future__ import annotations

import ray


def confine_serve_grpc() -> bool:
    """Keep this Serve replica's inter-deployment gRPC server on loopback when the node is.

    Ray 2.60 binds that server to ``[::]:0`` whatever the node address
    (``ray/serve/_private/replica.py``; no setting changes it: ray-project/ray#64544). A
    deployment's constructor calls this; it runs before the replica starts the server, which
    then binds ``127.0.0.1``. Only on a node whose address is loopback (what ``kairos serve``
    starts by default): on a cluster other nodes must reach it. A no-op if Ray no longer has
    the function. Returns whether the bind is confined.
    """
    try:
        from ray.serve._private import replica
    except ImportError:
        return False
    if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):  # type: ignore[no-untyped-call]
        return False
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        return False
    if getattr(original, "kairos_confined", False):
        return True

    def confined(server: object, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return int(original(server, address))

    confined.__dict__["kairos_confined"] = True
    setattr(replica, "add_port_to_grpc_server", confined)  # noqa: B010  (not exported by Ray)
    return True
