"""How long `kairos serve` takes to be ready on an empty data folder.

    python loadtests/bench_ready.py --repeat 3            # offers on (the ranker is trained)
    python loadtests/bench_ready.py --repeat 3 -- --no-offers

Each run starts `kairos serve` on a new folder and a free port, polls /readyz every 0.2 s and
records when the proxy first answers and when /readyz first says 200; then stops it with
Ctrl-C. Prints one JSON line: the median and every run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def one(extra: list[str]) -> dict[str, float]:
    from deploy.natsserver import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory() as data:
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(BIN / "kairos"), "serve", "--dev", "--port", str(port), "--no-dashboard",
             "--metrics-port", str(free_port()), "--data-dir", data, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            start_new_session=True,
        )  # fmt: skip
        out: dict[str, float] = {}
        try:
            while time.monotonic() - started < 600:
                try:
                    status = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
                except requests.RequestException:
                    status = 0
                if status and "proxy_s" not in out:
                    out["proxy_s"] = round(time.monotonic() - started, 1)
                if status == 200:
                    out["ready_s"] = round(time.monotonic() - started, 1)
                    break
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("serve_args", nargs="*", help="more `kairos serve` options, after --")
    args = p.parse_args()
    runs = [one(args.serve_args) for _ in range(args.repeat)]
    ready = [r["ready_s"] for r in runs if "ready_s" in r]
    print(json.dumps({"ready_s_median": statistics.median(ready) if ready else None,
                      "runs": runs}))  # fmt: skip
    return 0 if len(ready) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
