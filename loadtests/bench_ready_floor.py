"""The floor under `kairos serve`'s start on this machine: Ray and Serve started as `kairos
serve` starts them, and the same processes (two API replicas behind the proxy, a detached
gateway actor that starts seven actors and waits for them, a ranker replica importing
XGBoost), each doing nothing but import NumPy and pyarrow. Ready is the first 200 from
`/readyz` through Serve's proxy, timed from this script's first line.

    python loadtests/bench_ready_floor.py            # one run; prints one JSON line

Compare with `python loadtests/bench_ready.py --repeat 1`, alternately (docs/benchmarks.md).
"""

import time

T0 = time.monotonic()

import json  # noqa: E402
import logging  # noqa: E402

import ray  # noqa: E402
import requests  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from ray import serve  # noqa: E402

from deploy.natsserver import free_port  # noqa: E402

PORT = free_port()
app = FastAPI()


@ray.remote(num_cpus=0.1)
class Trivial:
    def __init__(self):
        import numpy  # noqa: F401
        import pyarrow  # noqa: F401


@ray.remote(num_cpus=0.25)
class Gateway:
    def __init__(self):
        import numpy  # noqa: F401
        import pyarrow  # noqa: F401

        self.actors = [Trivial.remote() for _ in range(7)]

    def ready(self):
        ray.get([a.__ray_ready__.remote() for a in self.actors])
        return True


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Api:
    def __init__(self):
        import numpy  # noqa: F401
        import pyarrow  # noqa: F401

        self.gw = Gateway.options(name="gw", lifetime="detached", get_if_exists=True).remote()
        ray.get(self.gw.ready.remote())

    @app.get("/readyz")
    def readyz(self):
        return {"ok": True}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25})
class Ranker:
    def __init__(self):
        import xgboost  # noqa: F401

    def __call__(self, x):
        return x


ray.init(address="local", object_store_memory=1024 << 20, include_dashboard=False,
         _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
         log_to_driver=False)  # fmt: skip
serve.start(http_options={"host": "127.0.0.1", "port": PORT})
serve.run(Ranker.bind(), name="ranker", route_prefix=None, blocking=False)
serve.run(Api.bind(), name="api", route_prefix="/", blocking=False)
proxy = None
while time.monotonic() - T0 < 300:
    try:
        code = requests.get(f"http://127.0.0.1:{PORT}/readyz", timeout=5).status_code
    except requests.RequestException:
        code = 0
    if code and proxy is None:
        proxy = time.monotonic() - T0
    if code == 200:
        break
    time.sleep(0.2)
print(json.dumps({"proxy_s": round(proxy or -1, 1), "ready_s": round(time.monotonic() - T0, 1)}))
serve.shutdown()
ray.shutdown()
