"""The Ray Serve deployment of the ranker: the only module in ``models`` that imports Serve.

Model versions arrive through ``user_config`` (a RankerConfig): changing it with
``serve.run`` or ``serve deploy`` calls ``reconfigure`` on the running replicas, which load
the new versions and swap them in between two requests; nothing is restarted and no request
is lost. A config naming a model this engine cannot serve (missing, or built on other
features) is refused: the replica keeps serving the models it has and reports the error
from ``status()``. Requests arriving together (one per shard micro-batch) are scored in one
``@serve.batch`` call.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from engine.decision.scorer import RANKER_APP, RANKER_DEPLOYMENT, ScoreRequest, ScoreResponse
from engine.errors import ConfigError
from models.ranker import Ranker, RankerConfig

log = logging.getLogger("kairos.ranker")


@serve.deployment(
    name=RANKER_DEPLOYMENT,
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,
)
class RankerDeployment:
    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        from models.loopback import confine_serve_grpc

        confine_serve_grpc()  # this replica's internal gRPC server on loopback, as the node

        self.ranker: Ranker | None = None
        self.error: str | None = None
        self.swaps = 0
        self.live = Gauge(
            "kairos_model_version_live",
            description="1 for each model version a ranker replica serves, 0 once swapped out.",
            tag_keys=("version", "role"),
        )
        self._roles: dict[str, str] = {}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        try:
            ranker = Ranker(RankerConfig.model_validate(user_config))
        except (ConfigError, ValueError) as exc:
            self.error = str(exc)
            if self.ranker is None:
                raise  # nothing to serve with: the deployment must not come up
            log.error("model swap refused, still serving %s: %s", self.ranker.versions, exc)
            return
        self.ranker, self.error = ranker, None
        self.swaps += 1
        self._publish(ranker.config)

    def _publish(self, config: RankerConfig) -> None:
        roles = {config.champion: "champion"}
        if config.challenger:
            roles[config.challenger] = "challenger"
        for version, role in self._roles.items():
            self.live.set(0, tags={"version": version, "role": role})
        for version, role in roles.items():
            self.live.set(1, tags={"version": version, "role": role})
        self._roles = roles

    def status(self) -> dict[str, Any]:
        """Serving versions, the last refused swap's error (or None) and the swap count."""
        versions = list(self.ranker.versions) if self.ranker else []
        return {"versions": versions, "error": self.error, "swaps": self.swaps}

    async def __call__(self, request: ScoreRequest) -> ScoreResponse:
        return await self.score_batch(request)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        ranker = self.ranker  # one model set for the whole batch, even if a swap lands now
        if ranker is None:
            raise ConfigError("the ranker has no model loaded")
        names = requests[0].feature_names
        if len(requests) == 1 or any(r.feature_names != names for r in requests):
            return [ranker.score(r) for r in requests]
        merged = ScoreRequest(
            np.concatenate([r.features for r in requests]),
            names,
            np.concatenate([r.customer_keys for r in requests]),
        )
        answer = ranker.score(merged)
        bounds = np.cumsum([0, *(r.rows for r in requests)])
        return [
            ScoreResponse(
                answer.propensity[a:b],
                answer.versions,
                answer.version_index[a:b],
                None if answer.baseline is None else answer.baseline[a:b],
                None if answer.opt_out is None else answer.opt_out[a:b],
            )
            for a, b in itertools.pairwise(bounds)
        ]


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Serve application builder (import path ``models.deployment:build_app``).

    Models, replicas and CPUs come from the Serve config's ``deployments`` entry, so that a
    changed ``user_config`` is a lightweight, in-place update.
    """
    return RankerDeployment.bind()  # type: ignore[attr-defined]


def ranker_app_config(
    config: RankerConfig, replicas: int = 1, num_cpus: float = 0.5
) -> dict[str, Any]:
    """The ranker's entry of a Serve config file (``applications:``)."""
    return {
        "name": RANKER_APP,
        "route_prefix": None,
        "import_path": "models.deployment:build_app",
        # a log line per request costs more CPU than a decision: errors are still logged
        "logging_config": {"enable_access_log": False},
        "deployments": [
            {
                "name": RANKER_DEPLOYMENT,
                "num_replicas": replicas,
                "ray_actor_options": {"num_cpus": num_cpus},
                "user_config": config.model_dump(),
            }
        ],
    }


def apply_apps(entries: list[dict[str, Any]], timeout_s: float = 300.0) -> None:
    """Apply Serve application entries declaratively, as ``serve deploy`` would, keeping the
    other declared applications (a declarative apply deletes the ones it does not list).

    An entry whose config is unchanged is left alone; one whose ``user_config`` alone changed
    is updated in place through ``reconfigure()``.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start()
    client = _get_global_client()
    if client is None:
        raise ConfigError("Serve did not start")
    apps: dict[str, dict[str, Any]] = {}
    for name, app in client.get_serve_details().get("applications", {}).items():
        deployed = app.get("deployed_app_config")
        if deployed:
            apps[name] = dict(deployed)
    for entry in entries:
        apps[entry["name"]] = entry
    schema = ServeDeploySchema.model_validate({"applications": list(apps.values())})
    client.deploy_apps(schema, _blocking=False)
    # wait for the entries' applications only: one of the others may be waiting for us
    wait_running([e["name"] for e in entries], timeout_s)


def wait_running(names: list[str], timeout_s: float = 300.0) -> None:
    """Wait until the Serve applications ``names`` run; raise if one fails to deploy."""
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n, st in states.items() if st == "DEPLOY_FAILED"}
        if failed:
            raise ConfigError(f"Serve application(s) failed to deploy: {failed}")
        if all(st == "RUNNING" for st in states.values()):
            return
        if time.monotonic() > deadline:
            raise ConfigError(f"Serve application(s) not running after {timeout_s:g}s: {states}")
        time.sleep(0.25)


def deploy_ranker(config: RankerConfig, replicas: int = 1, num_cpus: float = 0.5) -> Any:
    """Deploy the ranker, or swap its models in place; returns its handle once it is running.

    This applies a declarative Serve config, as ``serve deploy`` does: only then is a changed
    ``user_config`` a lightweight update that calls ``reconfigure`` on the running replicas.
    (``serve.run`` gives every call a new code version and so replaces the replicas.)
    """
    apply_apps([ranker_app_config(config, replicas, num_cpus)])
    return serve.get_deployment_handle(RANKER_DEPLOYMENT, app_name=RANKER_APP)
