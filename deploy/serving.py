"""`kairos serve`: the engine behind Ray Serve's HTTP proxy, on a local or a joined cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deploy.gateway import CONFIG_DIR, ServiceConfig

console = Console()


def serve(
    host: Annotated[
        str, typer.Option(help="Interface Serve's HTTP proxy listens on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of Serve's HTTP proxy.")] = 8000,
    address: Annotated[
        str | None,
        typer.Option(help="Join this Ray cluster (default: RAY_ADDRESS or a local one)."),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Logs, triggers and models.")] = Path(
        "kairos-data/service"
    ),
    rules: Annotated[Path, typer.Option(help="Rule file at start-up.")] = CONFIG_DIR / "rules.yaml",
    offers: Annotated[Path, typer.Option(help="Offer catalog at start-up.")] = CONFIG_DIR
    / "offers.yaml",
    no_offers: Annotated[bool, typer.Option(help="Run without decisions.")] = False,
    shards: Annotated[int, typer.Option(min=1, help="Shard actors.")] = 2,
    replicas: Annotated[int, typer.Option(min=1, help="API replicas.")] = 2,
    retrain_every: Annotated[
        int, typer.Option(min=0, help="Retrain the ranker every N new outcomes (0: never).")
    ] = 0,
    dashboard: Annotated[bool, typer.Option(help="Start the Ray dashboard (local Ray).")] = True,
    metrics_port: Annotated[
        int | None, typer.Option(help="Port of the node's Prometheus endpoint (local Ray).")
    ] = 8080,
    detach: Annotated[
        bool, typer.Option(help="Deploy and return (on a cluster that outlives this command).")
    ] = False,
) -> None:
    """Run Kairos as a service: POST /v1/events, POST /v1/decide, GET /v1/customers/ID, ...

    Starts (or joins) Ray, starts Serve's HTTP proxy, deploys the API application and, through
    it, the engine's actors and the ranker. Runs until Ctrl-C unless --detach.
    """
    from ray import serve as ray_serve

    from actors.runtime import init_ray
    from deploy.service import api_app_config
    from models.deployment import apply_apps

    config = ServiceConfig(
        data_dir=str(data_dir.resolve()),
        rules=str(rules.resolve()),
        offers=None if no_offers else str(offers.resolve()),
        shards=shards,
        retrain_every=retrain_every,
    )
    with console.status("starting Ray..."):
        init_ray(address=address, dashboard=dashboard, metrics_export_port=metrics_port)
        ray_serve.start(http_options={"host": host, "port": port})
    with console.status("deploying Kairos (shards, gateway, ranker, API)..."):
        apply_apps([api_app_config(config, replicas=replicas)])
    url = f"http://{host}:{port}"
    console.print(f"[bold green]Kairos is serving[/] at {url}  (API docs: {url}/docs)")
    if metrics_port and not address:
        console.print(f"metrics: http://127.0.0.1:{metrics_port}/metrics (ray_kairos_*)")
    if detach:
        return
    console.print("Ctrl-C stops it.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping: applying what is pending and writing the logs...")
        import ray

        gateway = ray.get_actor(config.gateway_name, namespace=config.namespace)
        ray.get(gateway.shutdown.remote())
        ray_serve.shutdown()
