"""`kairos serve` as a user starts it, seen from outside: which sockets its process tree opens,
whether Ray's jobs API or a driver gets in without Ray's token, and what `kairos doctor` says;
then the same with every insecure setting at once, which the doctor must name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
SECRET = "a-site-secret-for-the-secure-defaults-test"


class Serve:
    """``kairos serve`` in a session of its own (its whole tree is stopped at the end)."""

    def __init__(self, data: Path, *args: str, env: dict[str, str]) -> None:
        from deploy.natsserver import free_port

        self.port = free_port()
        self.log = data.parent / f"{data.name}.log"
        self.proc = subprocess.Popen(
            [str(BIN / "kairos"), "serve", "--port", str(self.port), "--data-dir", str(data),
             "--metrics-port", str(free_port()), "--no-offers", "--replicas", "1", *args],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=env,  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready in 300 s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:  # stopped already, and all of its tree
            return
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def terminate(self) -> int | None:
        """SIGTERM to ``kairos serve`` alone, as a process manager stops a service; its exit
        code (None if it did not stop in 120 s: then its tree is killed)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.stop()
            return None


def _grpc_status(port: int) -> str:
    """The status of a call without Ray's token to a gRPC server on this machine."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=10)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return "OK"


def _env(**extra: str) -> dict[str, str]:
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "KAIROS_PSEUDONYM_KEY")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _doctor(serve: Serve, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kairos"), "doctor", "--pid", str(serve.proc.pid), "--data-dir", str(data)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"},
        check=False, timeout=120,
    )  # fmt: skip


@pytest.mark.faults
def test_kairos_serve_listens_on_loopback_only_and_ray_refuses_everyone_without_its_token(
    tmp_path,
) -> None:
    from deploy.doctor import gather

    data = tmp_path / "secure"
    serve = Serve(data, env=_env(KAIROS_PSEUDONYM_KEY=SECRET))
    try:
        facts = gather(data, serve.proc.pid)
        census = sorted((s.process, s.address, s.port) for s in facts.listeners)
        print(f"\nsocket census of kairos serve ({len(census)} listeners):")
        for row in census:
            print("  ", row)
        assert len(census) >= 5, census  # the proxy, NATS, GCS, raylet, dashboard at least
        assert facts.auth_mode == "token"
        # every listener on loopback, Serve's inter-deployment gRPC server of each replica
        # too (Ray 2.60 binds it to every interface; models.loopback.confine_serve_grpc), and
        # Ray's gRPC servers refuse a call without the token
        assert all(s.loopback for s in facts.listeners), census
        replicas: dict[int, dict[int, str]] = {}
        for sock in facts.listeners:
            if sock.process.startswith("ray::ServeReplica"):
                replicas.setdefault(sock.pid, {})[sock.port] = _grpc_status(sock.port)
        assert replicas, census
        for statuses in replicas.values():  # its inter-deployment server (the other port is
            # the worker's, which has no such method) is among them, and refuses the call
            assert "UNAUTHENTICATED" in statuses.values() and "OK" not in statuses.values()

        # the jobs API (CVE-2023-48022, "ShadowRay"): refused without the token
        dashboards = [s for s in facts.listeners if "dashboard" in s.process.lower()]
        assert dashboards, census
        refused = []
        for sock in dashboards:
            try:
                r = requests.post(f"http://127.0.0.1:{sock.port}/api/jobs/",
                                  json={"entrypoint": "id"}, timeout=5)  # fmt: skip
            except requests.RequestException:
                continue
            refused.append(r.status_code)
        # the dashboard 401; its agent's HTTP port has no jobs route (404 or 405)
        assert 401 in refused and all(code >= 400 for code in refused), refused

        # a driver with a wrong token cannot attach to the GCS
        gcs = [s for s in facts.listeners if s.process == "gcs_server"]
        assert gcs, census
        attach = subprocess.run(
            [sys.executable, "-c",
             f"import ray; ray.init(address='127.0.0.1:{gcs[0].port}'); print('ATTACHED')"],
            capture_output=True, text=True, timeout=180, check=False,
            env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token"),
        )  # fmt: skip
        assert "ATTACHED" not in attach.stdout, attach.stdout[-2000:]
        assert attach.returncode != 0

        doctor = _doctor(serve, data)
        assert doctor.returncode == 0, doctor.stdout[-3000:] + doctor.stderr[-2000:]
        assert "ok" in doctor.stdout
    finally:
        serve.stop()


@pytest.mark.faults
def test_kairos_doctor_names_each_insecure_setting(tmp_path) -> None:
    data = tmp_path / "insecure"
    env = _env(RAY_AUTH_MODE="disabled")  # and the public development pseudonym key
    serve = Serve(data, "--host", "0.0.0.0", "--dev", env=env)
    try:
        doctor = _doctor(serve, data)
        out = doctor.stdout
        assert doctor.returncode == 1, out[-3000:]
        assert "RAY_AUTH_MODE=disabled" in out, out[-3000:]
        assert f"0.0.0.0:{serve.port}" in out, out[-3000:]  # Serve's proxy beyond loopback
        assert "public development key" in out, out[-3000:]
        assert "jobs API answered" in out, out[-3000:]
        # SIGTERM, as systemd, Docker or Kubernetes stop it: a clean stop, as Ctrl-C
        assert serve.terminate() == 0, serve.log.read_text()[-3000:]
        assert "stopping: a last checkpoint" in serve.log.read_text()
    finally:
        serve.stop()


def test_kairos_serve_refuses_the_development_pseudonym_key_outside_development_mode(
    tmp_path,
) -> None:
    result = subprocess.run(
        [str(BIN / "kairos"), "serve", "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, cwd=ROOT, env=_env(), check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "public development key" in result.stderr and "--dev" in result.stderr
    assert not (tmp_path / "d" / "nats").exists()  # refused before anything started
