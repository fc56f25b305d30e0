"""`kairos doctor`: look at the running Kairos and Ray on this machine and say what is open.

It gathers facts (``gather``): Ray's version, the auth mode its GCS runs with, every listening
socket of Ray's, NATS's and Serve's processes, whether the dashboard's jobs API answers without
a token, the pseudonym key the workers run with, the API keys in the data folder and the Ray
token file's permissions. ``diagnose`` turns facts into problems, each with what to do; it is
pure, so each rule is unit-tested on made-up facts. Exit 1 when there is any problem.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from engine.config import DEFAULT_PSEUDONYM_KEY

#: Ray versions with token authentication
MIN_RAY_FOR_TOKENS = (2, 52)
_RAY_NAMES = ("gcs_server", "raylet", "dashboard", "ray::", "default_worker", "runtime_env")


@dataclass(frozen=True)
class Listener:
    process: str
    pid: int
    address: str
    port: int

    @property
    def serve_internal(self) -> bool:
        """A Serve replica's inter-deployment gRPC server bound to every interface: Ray 2.60's
        default whatever the node address (``serve/_private/replica.py``, ``[::]:0``; Kairos's
        deployments bind it to loopback on a loopback node: ``confine_serve_grpc``). It
        requires Ray's token when token authentication is on."""
        return self.process.startswith("ray::ServeReplica") and self.address in ("::", "0.0.0.0")

    @property
    def loopback(self) -> bool:
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
        return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


@dataclass
class Facts:
    ray_version: str = ""
    #: RAY_AUTH_MODE of the running GCS ("" unset, None when no Ray runs here)
    auth_mode: str | None = None
    listeners: list[Listener] = field(default_factory=list)
    #: the dashboard's HTTP API without a token: 200 open, 401/403 closed, None not found
    jobs_api_status: int | None = None
    #: KAIROS_PSEUDONYM_KEY of the Ray workers (None: not set there, the default applies)
    worker_pseudonym_key: str | None = None
    active_keys: int = 0
    token_file_mode: int | None = None


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def diagnose(facts: Facts) -> list[str]:
    """Every problem in ``facts``, each with what to do about it."""
    problems = []
    if facts.ray_version and _version(facts.ray_version) < MIN_RAY_FOR_TOKENS:
        problems.append(
            f"Ray {facts.ray_version} has no token authentication: upgrade to 2.52 or later"
        )
    if facts.auth_mode is not None and facts.auth_mode.lower() != "token":
        mode = facts.auth_mode or "unset"
        problems.append(
            f"Ray runs with RAY_AUTH_MODE={mode}: anyone who reaches its ports can attach a "
            "driver or submit a job; start it with RAY_AUTH_MODE=token (kairos serve does)"
        )
    if facts.jobs_api_status is not None and facts.jobs_api_status < 400:
        problems.append(
            f"the dashboard's jobs API answered {facts.jobs_api_status} without a token: it runs "
            "any command anyone sends; enable token authentication or start without a dashboard"
        )
    token = (facts.auth_mode or "").lower() == "token"
    for sock in facts.listeners:
        if sock.serve_internal and token:
            continue  # open, but it answers only calls with Ray's token
        if not sock.loopback:
            problems.append(
                f"{sock.process} (pid {sock.pid}) listens on {sock.address}:{sock.port}, beyond "
                "loopback: bind it to 127.0.0.1 (kairos serve does) or firewall it"
            )
    serve_open = any(
        not s.loopback and ("proxy" in s.process.lower() or "serve" in s.process.lower())
        for s in facts.listeners
    )
    if serve_open and facts.active_keys == 0:
        problems.append("Serve listens beyond loopback and no API key exists: create keys first")
    if facts.auth_mode is not None and facts.worker_pseudonym_key in (None, DEFAULT_PSEUDONYM_KEY):
        problems.append(
            "the workers' KAIROS_PSEUDONYM_KEY is the public development key: pseudonyms can "
            "be recomputed from guessed identifiers; set a secret of your own and restart"
        )
    if facts.token_file_mode is not None and facts.token_file_mode & 0o077:
        problems.append(
            f"Ray's token file is readable by others (mode {facts.token_file_mode:o}): "
            "chmod 600 ~/.ray/auth_token"
        )
    return problems


def _process_name(proc: object) -> str:
    import psutil

    assert isinstance(proc, psutil.Process)
    try:
        cmdline = proc.cmdline()
    except (psutil.Error, OSError):
        cmdline = []
    if any(part.endswith("dashboard/dashboard.py") for part in cmdline):
        return "ray-dashboard"  # a python process: its script says what it is
    title = cmdline[0] if cmdline else proc.name()
    return str(title) if str(title).startswith("ray::") else str(proc.name())


def _candidates(root_pid: int | None) -> list[object]:
    """The processes to look at: ``root_pid`` and all its descendants (a ``kairos serve`` tree:
    its driver, Ray's processes and workers, NATS), else every process on the machine."""
    import psutil

    if root_pid is None:
        return list(psutil.process_iter())
    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def gather(data_dir: Path, root_pid: int | None = None) -> Facts:
    """What runs on this machine now: the ``root_pid`` tree, or every Ray and NATS process."""
    import psutil
    import ray

    from engine.governance.keys import KeyStore

    facts = Facts(ray_version=ray.__version__)
    ray_procs, others = [], []
    for proc in _candidates(root_pid):
        assert isinstance(proc, psutil.Process)
        try:
            name = _process_name(proc)
            cmd = " ".join(proc.cmdline())
        except (psutil.Error, OSError):
            continue
        if "kairos doctor" in cmd:
            continue
        if any(n in name or n in cmd for n in _RAY_NAMES):
            ray_procs.append((proc, name))
        elif "nats-server" in name or root_pid is not None:
            others.append((proc, name))
    for proc, name in [*ray_procs, *others]:
        try:
            connections = proc.net_connections(kind="inet")
        except (psutil.Error, OSError):
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN and c.laddr:
                facts.listeners.append(Listener(name, proc.pid, c.laddr.ip, c.laddr.port))
    for proc, name in ray_procs:
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if name == "gcs_server":
            facts.auth_mode = env.get("RAY_AUTH_MODE", "")
        if name == "raylet":
            facts.worker_pseudonym_key = env.get("KAIROS_PSEUDONYM_KEY")
    dashboards = [s for s in facts.listeners if "dashboard" in s.process]
    facts.jobs_api_status = _probe_jobs(dashboards)
    keys_file = data_dir / "keys.json"
    if keys_file.exists():
        now = int(time.time() * 1000)
        facts.active_keys = sum(k.state(now) == "active" for k in KeyStore(keys_file).entries())
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if token.exists():
        facts.token_file_mode = stat.S_IMODE(token.stat().st_mode)
    return facts


def _probe_jobs(dashboards: list[Listener]) -> int | None:
    """Is the dashboard's HTTP API (the jobs API among it) open? ``GET /api/version`` without
    a token on each port of the dashboard's processes: 200 with Ray's version there means
    open (200 is returned), 401 or 403 means it wants the token; other ports are not it."""
    import requests

    found = None
    for sock in dashboards:
        host = "127.0.0.1" if sock.address in ("0.0.0.0", "::") else sock.address
        try:
            r = requests.get(f"http://{host}:{sock.port}/api/version", timeout=3)
        except requests.RequestException:
            continue
        if r.status_code in (401, 403):
            found = r.status_code
        elif r.status_code == 200 and "ray_version" in r.text:
            return 200
    return found


def doctor(
    data_dir: Annotated[
        Path, typer.Option(help="The service's data folder (its API keys).")
    ] = Path("kairos-data/service"),
    pid: Annotated[
        int | None,
        typer.Option(help="Only this process tree (a kairos serve), not every Ray process here."),
    ] = None,
) -> None:
    """Check the running Kairos and Ray on this machine: Ray's version and auth mode, which
    ports listen where, the jobs API, the pseudonym key, API keys. Exit 1 naming each
    problem and what to do."""
    console = Console()
    facts = gather(data_dir, pid)
    if facts.auth_mode is None:
        console.print("[yellow]no Ray runs on this machine (as this user): nothing to check")
    for sock in sorted(facts.listeners, key=lambda s: (s.process, s.port)):
        where = "[green]loopback[/]" if sock.loopback else "[red]open[/]"
        if sock.serve_internal and (facts.auth_mode or "").lower() == "token":
            where = "[yellow]open, Ray's token required[/]"
        console.print(f"  {sock.process:<28} {sock.address}:{sock.port:<6} {where}")
    problems = diagnose(facts)
    for problem in problems:
        console.print(f"[red]problem:[/] {problem}", soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: Ray {facts.ray_version}, RAY_AUTH_MODE={facts.auth_mode}, "
                  f"{len(facts.listeners)} listening sockets, all on loopback")  # fmt: skip
