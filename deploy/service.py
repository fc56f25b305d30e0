"""The Kairos service: its configuration and `kairos serve`, the engine behind Ray Serve's HTTP
proxy on a local or a joined cluster. The HTTP API itself is ``deploy.api``."""

from __future__ import annotations

import functools
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from actors.gateway import GatewayConfig, MakeRetrainer, StartRanker
from actors.ingestlog import LogConfig
from deploy.paths import DEFAULT_OFFERS, DEFAULT_REFERENCE, DEFAULT_RULES
from deploy.ranker import make_retrainer, start_ranker
from engine.config import DEFAULT_PSEUDONYM_KEY, EngineSettings
from engine.errors import EngineError

console = Console()


class InsecureConfigError(EngineError):
    """A setting that would expose customers or the cluster; the message says what to do."""


class ServiceConfig(BaseModel):
    """How ``kairos serve`` (or ``serve run deploy/serve_config.yaml``) runs the engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("kairos", description="Prefix of the actor names (gateway, shards, sinks).")
    namespace: str = Field("kairos", description="Ray namespace of the named actors.")
    data_dir: str = Field("kairos-data/service", description="Logs, triggers and models.")
    rules: str = Field(str(DEFAULT_RULES), description="Rule file at start-up.")
    offers: str | None = Field(
        str(DEFAULT_OFFERS), description="Offer catalog at start-up (None: no offers)."
    )
    reference: str | None = Field(
        str(DEFAULT_REFERENCE),
        description="Reference tables at start-up (stores, stock, recalls; None: none).",
    )
    shards: int = Field(2, ge=1)
    shard_cpus: float = Field(0.25, gt=0)
    micro_batch_max_events: int = Field(16_384, ge=1)
    micro_batch_deadline_ms: float = Field(20.0, gt=0)
    allowed_lateness_s: float = Field(60.0, ge=0)
    idle_release_ms: float = Field(
        2_000.0, gt=0, description="Quiet for this long: release the watermark to the newest event."
    )
    max_body_bytes: int = Field(16 << 20, ge=1024, description="Larger bodies get 413.")
    retrain_every: int = Field(
        0, ge=0, description="Retrain the ranker every N new offer responses (0: never)."
    )
    ranker_cpus: float = Field(0.25, gt=0)
    nats_url: str | None = Field(
        None,
        description="The NATS JetStream server of the ingest log (`kairos serve` starts one); "
        "None: events go straight to the engine and nothing is durable.",
    )
    checkpoint_every_s: float = Field(10.0, gt=0, description="Seconds between checkpoints.")
    checkpoint_uri: str | None = Field(
        None, description="Where checkpoints go (default: <data_dir>/checkpoints; s3://...)."
    )
    max_lag_messages: int = Field(
        2_000, ge=1, description="503 to new events while the engine is this far behind the log."
    )
    log_max_bytes: int = Field(8 << 30, ge=1 << 20, description="The log's size limit (503 then).")
    max_events_in_flight: int = Field(
        32,
        ge=1,
        description="Event requests one API replica works on at once; beyond, 503 at once "
        "(before Serve's own queue fills, whose 503 has no Retry-After).",
    )

    rate_limit_per_s: float = Field(
        1_000.0,
        ge=0,
        description="Requests per second per API key across all replicas, unless the key sets "
        "its own (kairos keys create --rate); 0: no limit. Over it: 429 with Retry-After.",
    )
    dev_mode: bool = Field(
        False,
        description="Development: the public development pseudonym key is allowed (with a "
        "warning). Otherwise the service refuses to start with it.",
    )
    keys_file: str | None = Field(
        None, description="The API keys (hashed; default <data_dir>/keys.json)."
    )
    audit_file: str | None = Field(
        None, description="The hash-chained audit trail (default <data_dir>/audit/audit.jsonl)."
    )

    @property
    def keys_path(self) -> str:
        return self.keys_file or str(Path(self.data_dir) / "keys.json")

    @property
    def audit_path(self) -> str:
        return self.audit_file or str(Path(self.data_dir) / "audit" / "audit.jsonl")

    def check_secrets(self, settings: EngineSettings) -> None:
        """Refuse the public development pseudonym key outside development mode: with it,
        anyone can recompute every pseudonym from a guessed phone number."""
        if settings.pseudonym_key == DEFAULT_PSEUDONYM_KEY and not self.dev_mode:
            raise InsecureConfigError(
                "KAIROS_PSEUDONYM_KEY is the public development key: set a secret of your own "
                "(e.g. export KAIROS_PSEUDONYM_KEY=$(openssl rand -hex 32); keep it: customer "
                "keys derive from it) or run in development mode (kairos serve --dev)"
            )

    def settings(self) -> EngineSettings:
        return EngineSettings(
            shards=self.shards,
            micro_batch_max_events=self.micro_batch_max_events,
            micro_batch_deadline_ms=self.micro_batch_deadline_ms,
            allowed_lateness_s=self.allowed_lateness_s,
            dedupe_window_s=max(3600.0, self.allowed_lateness_s),
            data_dir=Path(self.data_dir),
        )

    def gateway(self) -> GatewayConfig:
        """What the gateway actor runs."""
        return GatewayConfig(
            settings=self.settings(),
            data_dir=self.data_dir,
            rules_file=self.rules,
            offers_file=self.offers,
            reference_file=self.reference,
            name=self.name,
            shard_cpus=self.shard_cpus,
            idle_release_ms=self.idle_release_ms,
            log=self.log(),
            checkpoint_every_s=self.checkpoint_every_s,
            checkpoint_uri=self.checkpoint_uri,
        )

    def log(self) -> LogConfig | None:
        """The ingest log's configuration (None: no log)."""
        if self.nats_url is None:
            return None
        return LogConfig(self.nats_url, self.name, max_bytes=self.log_max_bytes)

    @property
    def registry_uri(self) -> str:
        return str(Path(self.data_dir).resolve() / "models")

    def ranker_starter(self) -> StartRanker:
        """The gateway's way to start the ranker: the registry under ``data_dir``."""
        return functools.partial(start_ranker, self.registry_uri, num_cpus=self.ranker_cpus)

    def ranker_entries(self) -> list[dict[str, Any]]:
        """The ranker's Serve config entry serving the registry's champion (none without
        offers), to deploy with the API: the gateway's ``ranker_starter`` then finds it
        running (or swaps in the model its checkpoint names, in place)."""
        if self.offers is None:
            return []
        from deploy.ranker import ranker_entry
        from engine.decision.catalog import load_catalog
        from engine.rules.spec import load_rules

        rules, catalog = load_rules(self.rules), load_catalog(self.offers)
        _, entry = ranker_entry(self.registry_uri, rules, catalog, num_cpus=self.ranker_cpus)
        return [entry]

    def retrainer_maker(self) -> MakeRetrainer | None:
        """The gateway's way to make its retrainer (None: retraining is off)."""
        if not self.retrain_every:
            return None
        return functools.partial(make_retrainer, self.registry_uri, self.retrain_every)

    @property
    def gateway_name(self) -> str:
        return self.gateway().gateway_name


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
    rules: Annotated[Path, typer.Option(help="Rule file at start-up.")] = DEFAULT_RULES,
    offers: Annotated[Path, typer.Option(help="Offer catalog at start-up.")] = DEFAULT_OFFERS,
    reference: Annotated[
        Path, typer.Option(help="Reference tables at start-up (stores, stock, recalls).")
    ] = DEFAULT_REFERENCE,
    no_offers: Annotated[bool, typer.Option(help="Run without decisions.")] = False,
    shards: Annotated[int, typer.Option(min=1, help="Shard actors.")] = 2,
    replicas: Annotated[int, typer.Option(min=1, help="API replicas.")] = 2,
    retrain_every: Annotated[
        int, typer.Option(min=0, help="Retrain the ranker every N new offer responses (0: never).")
    ] = 0,
    dashboard: Annotated[bool, typer.Option(help="Start the Ray dashboard (local Ray).")] = True,
    metrics_port: Annotated[
        int | None, typer.Option(help="Port of the node's Prometheus endpoint (local Ray).")
    ] = 8080,
    detach: Annotated[
        bool, typer.Option(help="Deploy and return (on a cluster that outlives this command).")
    ] = False,
    nats: Annotated[
        str | None,
        typer.Option(
            help="NATS JetStream server(s) of the ingest log, e.g. nats://n1:4222,nats://n2:4222 "
            "(default: start one on 127.0.0.1 with its files under DATA_DIR/nats)."
        ),
    ] = None,
    checkpoint_every: Annotated[
        float, typer.Option(min=0.1, help="Seconds between checkpoints.")
    ] = 10.0,
    checkpoints: Annotated[
        str | None,
        typer.Option(help="Where checkpoints go (default DATA_DIR/checkpoints; s3://... too)."),
    ] = None,
    dev: Annotated[
        bool,
        typer.Option("--dev", help="Development mode: allow the public development pseudonym key."),
    ] = False,
) -> None:
    """Run Kairos as a service: POST /v1/events, POST /v1/decide, POST /v1/customers/lookup...

    Starts (or joins) Ray, starts Serve's HTTP proxy, deploys the API application and, through
    it, the engine's actors and the ranker. Runs until Ctrl-C unless --detach. Every call but
    the health checks needs an API key (a first one goes to DATA_DIR/bootstrap.key; see
    kairos keys).
    """
    from deploy.natsserver import EmbeddedNats, port_is_free
    from deploy.security import bootstrap_key

    ServiceConfig(dev_mode=dev).check_secrets(EngineSettings())  # before anything starts
    if dev and EngineSettings().pseudonym_key == DEFAULT_PSEUDONYM_KEY:
        console.print("[yellow]development mode: pseudonyms use the public development key")
    broker = None
    if nats is None:
        broker = EmbeddedNats(
            data_dir.resolve() / "nats", port=4222 if port_is_free(4222) else None
        )
        with console.status("starting the ingest log (NATS JetStream)..."):
            nats = broker.start()
    config = ServiceConfig(
        data_dir=str(data_dir.resolve()),
        rules=str(rules.resolve()),
        offers=None if no_offers else str(offers.resolve()),
        reference=str(reference.resolve()),
        shards=shards,
        retrain_every=retrain_every,
        nats_url=nats,
        checkpoint_every_s=checkpoint_every,
        checkpoint_uri=checkpoints,
        dev_mode=dev,
    )
    first_key = bootstrap_key(config.keys_path, config.audit_path, config.data_dir)
    if first_key is not None:
        console.print(
            f"[yellow]no API keys yet: created one with every scope; its token is in {first_key}"
            " (create narrower keys with `kairos keys create`, then revoke it)"
        )
    try:
        _serve(config, host, port, address, replicas, dashboard, metrics_port, detach, broker)
    finally:
        if broker is not None and not detach:
            broker.stop()


def _stop_on_signals() -> None:
    """SIGTERM (what systemd, Docker and Kubernetes send) stops the service as Ctrl-C does: a
    last checkpoint, then Serve and Ray down. SIGINT too, even when the shell that started it
    in the background left SIGINT ignored (Python keeps an inherited SIG_IGN)."""

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _serve(
    config: ServiceConfig,
    host: str,
    port: int,
    address: str | None,
    replicas: int,
    dashboard: bool,
    metrics_port: int | None,
    detach: bool,
    broker: object | None,
) -> None:
    from ray import serve as ray_serve

    from actors.runtime import init_ray
    from deploy.api import api_app_config
    from models.deployment import apply_apps

    with console.status("starting Ray..."):
        init_ray(address=address, dashboard=dashboard, metrics_export_port=metrics_port)
        if not detach:  # after ray.init, which sets a SIGTERM handler of its own
            _stop_on_signals()
        ray_serve.start(http_options={"host": host, "port": port})
    with console.status("deploying Kairos (shards, gateway, ranker, API)..."):
        apply_apps([*config.ranker_entries(), api_app_config(config, replicas=replicas)])
    url = f"http://{host}:{port}"
    console.print(f"[bold green]Kairos is serving[/] at {url}  (API docs: {url}/docs)")
    console.print(
        f"ingest log: {config.nats_url}; checkpoints every {config.checkpoint_every_s:g} s"
    )
    if detach and broker is not None:
        console.print("[yellow]the embedded NATS server stays up with the detached service")
    if metrics_port and not address:
        console.print(f"metrics: http://127.0.0.1:{metrics_port}/metrics (ray_kairos_*)")
    if detach:
        return
    console.print("Ctrl-C (or SIGTERM) stops it.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping: a last checkpoint (the logs are committed with it)...")
        import ray

        gateway = ray.get_actor(config.gateway_name, namespace=config.namespace)
        ray.get(gateway.shutdown.remote())
        ray_serve.shutdown()
