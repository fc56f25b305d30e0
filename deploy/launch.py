"""The ``kairos`` command's entry point: an embedded Ray that listens on loopback only.

Ray picks a routable address for a new local node, and its GCS, raylet, workers and agents
listen there (or on every interface). For a cluster of one machine that is a door left open:
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray use 127.0.0.1 as the node address, and then
every one of its servers, the dashboard and the metrics endpoint bind to loopback. Ray reads
it when first imported, so it is set here, before anything imports Ray, and only when the
command starts its own Ray (no ``--address``, no ``RAY_ADDRESS``). Setting the variable to 1
keeps Ray's choice (a node others can reach; close it with a firewall then).
"""

from __future__ import annotations

import os
import sys

#: Ray's switch between a node address others can reach and loopback (see above)
RAY_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def embedded(argv: list[str]) -> bool:
    """Does this command start a Ray of its own (rather than join one)?"""
    joins = any(a == "--address" or a.startswith("--address=") for a in argv)
    return not joins and not os.environ.get("RAY_ADDRESS")


def main() -> None:
    if embedded(sys.argv[1:]):
        os.environ.setdefault(RAY_LOOPBACK_SWITCH, "0")
    from deploy.cli import main as cli_main

    cli_main()
