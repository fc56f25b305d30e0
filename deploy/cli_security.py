"""`kairos keys create|list|revoke` and `kairos audit verify`: they work on the service's data
folder (the key file and the audit trail), with or without the service running; a running
service sees key changes within a second."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from deploy.security import record_key_change
from engine.config import EngineSettings
from engine.governance.audit import audit_key, verify
from engine.governance.keys import SCOPES, KeyStore

keys_app = typer.Typer(help="API keys of a service: create, list, revoke.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail of a service.", no_args_is_help=True)
console = Console()

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="The service's data folder (as for kairos serve).")
]
DEFAULT_DATA = Path("kairos-data/service")


def _paths(data_dir: Path) -> tuple[Path, Path]:
    """(keys file, audit trail) of a data folder, as ``ServiceConfig`` places them."""
    from deploy.service import ServiceConfig

    config = ServiceConfig(data_dir=str(data_dir.resolve()))
    return Path(config.keys_path), Path(config.audit_path)


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who or what uses the key (shown in lists).")],
    scope: Annotated[
        list[str],
        typer.Option("--scope", "-s", help=f"A scope (repeat for more): {', '.join(SCOPES)}."),
    ],
    data_dir: DataDir = DEFAULT_DATA,
    expires_in_days: Annotated[
        float | None, typer.Option(min=0.0, help="The key stops working after this many days.")
    ] = None,
    rate: Annotated[
        float | None, typer.Option(min=0.0, help="Requests per second (default: the service's).")
    ] = None,
) -> None:
    """Create a key. Its token is printed once, on stdout alone (only its hash is kept):
    ``TOKEN=$(kairos keys create loader -s ingest)``."""
    keys_file, audit_file = _paths(data_dir)
    expires = None if expires_in_days is None else expires_in_days * 86_400
    key, token = KeyStore(keys_file).create(name, scope, expires_in_s=expires, rate_per_s=rate)
    record_key_change(audit_file, "key.create", key)
    Console(stderr=True).print(
        f"created key {key.id} ({', '.join(key.scopes)}); the token below is shown only now"
    )
    print(token)


@keys_app.command("list")
def list_keys(
    data_dir: DataDir = DEFAULT_DATA,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """Every key: id, name, scopes, state (active, expired, revoked). Never a secret."""
    keys_file, _ = _paths(data_dir)
    now = int(time.time() * 1000)
    keys = KeyStore(keys_file).entries()
    if as_json:
        print(json.dumps([key.public(now) for key in keys]))
        return
    table = Table("name", "scopes", "state", "created", "expires")
    table.add_column("id", no_wrap=True, min_width=12)
    for key in keys:
        table.add_row(
            key.name, ", ".join(key.scopes), key.state(now), _when(key.created_ms),
            _when(key.expires_ms), key.id,
        )  # fmt: skip
    console.print(table)


def _when(ms: int | None) -> str:
    return "-" if ms is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (kairos keys list).")],
    data_dir: DataDir = DEFAULT_DATA,
) -> None:
    """Revoke a key: every replica refuses it within a second."""
    keys_file, audit_file = _paths(data_dir)
    key = KeyStore(keys_file).revoke(key_id)
    record_key_change(audit_file, "key.revoke", key)
    console.print(f"revoked key {key.id} ({key.name})")


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = DEFAULT_DATA) -> None:
    """Recompute the audit trail's chain: exit 1, naming each line, if a record was changed,
    removed, inserted or moved. Prints the head to keep elsewhere (truncation shows against
    it)."""
    _, audit_file = _paths(data_dir)
    if not audit_file.exists():
        console.print(f"[red]no audit trail at {audit_file}")
        raise typer.Exit(1)
    result = verify(audit_file, audit_key(EngineSettings().pseudonym_key))
    for problem in result.problems:
        console.print(f"[red]{problem}")
    status = "[green]intact" if result.ok else "[red]BROKEN"
    console.print(
        f"{status}[/]: {result.records:,} records; head seq {result.head_seq} mac {result.head_mac}"
    )
    if not result.ok:
        raise typer.Exit(1)
