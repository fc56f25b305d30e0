"""The ranker on real Ray Serve: scoring through a handle, hot swaps under load, refusals."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from actors.scorer import ServeScorer
from engine.decision.scorer import (
    RANKER_APP,
    RANKER_DEPLOYMENT,
    RemoteScorer,
    ScoreRequest,
    ScorerUnavailableError,
)
from engine.testing import FixedScorer
from models.deployment import deploy_ranker
from models.ranker import RankerConfig
from models.registry import ModelRegistry
from tests.factories import SPEC, generated_rows, trained_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(ray_cluster, tmp_path_factory):
    from ray import serve

    registry = ModelRegistry(str(tmp_path_factory.mktemp("registry")))
    a = trained_model(registry, seed=1)
    b = trained_model(registry, seed=2, invert=True)
    handle = deploy_ranker(RankerConfig(registry=registry.uri, champion=a.version), num_cpus=0.25)
    yield registry, a, b, handle
    serve.delete(RANKER_APP)


def request(n: int, seed: int = 0) -> ScoreRequest:
    x, _ = generated_rows(n, seed)
    return ScoreRequest(
        x, SPEC.names, np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    )


def test_a_shard_side_scorer_gets_the_models_propensities_through_serve(models) -> None:
    registry, a, _, _ = models
    deploy_ranker(RankerConfig(registry=registry.uri, champion=a.version), num_cpus=0.25)
    r = request(50_000)
    answer = ServeScorer().score(r)
    assert answer.versions == (a.version,)
    np.testing.assert_allclose(answer.propensity, a.booster.inplace_predict(r.features), rtol=1e-6)


def test_connect_warms_the_handle_and_a_missing_ranker_fails_fast(models) -> None:
    registry, a, _, _ = models
    deploy_ranker(RankerConfig(registry=registry.uri, champion=a.version), num_cpus=0.25)
    scorer = ServeScorer()
    assert isinstance(scorer, RemoteScorer) and not isinstance(FixedScorer(), RemoteScorer)
    scorer.connect()  # an empty request: the handle is made and the replica answered
    assert scorer.score(request(10)).versions == (a.version,)

    missing = ServeScorer(app_name="no-such-ranker", timeout_s=2.0, retry_after_s=30.0)
    with pytest.raises(ScorerUnavailableError, match="no-such-ranker"):
        missing.connect(timeout_s=2.0)
    started = time.perf_counter()
    with pytest.raises(ScorerUnavailableError, match="retrying in"):
        missing.score(request(10))  # down: fails at once instead of waiting again
    assert time.perf_counter() - started < 0.5


def test_swapping_models_under_load_loses_no_request(models) -> None:
    registry, a, b, handle = models
    deploy_ranker(RankerConfig(registry=registry.uri, champion=a.version), num_cpus=0.25)
    r = request(2_000, seed=5)
    expected = {
        a.version: a.booster.inplace_predict(r.features),
        b.version: b.booster.inplace_predict(r.features),
    }
    results: list[tuple[str, np.ndarray]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            pending = [handle.remote(r) for _ in range(4)]  # several in flight at once
            for p in pending:
                try:
                    answer = p.result(timeout_s=30)
                    results.append((answer.versions[0], answer.propensity))
                except BaseException as exc:
                    errors.append(exc)

    from ray import serve

    status = serve.get_deployment_handle(RANKER_DEPLOYMENT, app_name=RANKER_APP).status
    swaps_before = status.remote().result(timeout_s=30)["swaps"]
    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(1.0)
    deploy_ranker(RankerConfig(registry=registry.uri, champion=b.version), num_cpus=0.25)
    deadline = time.time() + 30
    while time.time() < deadline and (not results or results[-1][0] != b.version):
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    thread.join(timeout=60)
    assert not errors, errors[:3]
    versions = [v for v, _ in results]
    assert versions[0] == a.version and versions[-1] == b.version
    switch = versions.index(b.version)
    assert all(v == b.version for v in versions[switch:]), "a request went back to the old model"
    for version, propensity in results:  # every answer is wholly one model's
        np.testing.assert_allclose(propensity, expected[version], rtol=1e-6)
    assert len(results) > 20
    # swapped in place by reconfigure(), not by replacing the replica
    assert status.remote().result(timeout_s=30)["swaps"] == swaps_before + 1


def test_a_mismatched_model_is_refused_and_the_old_one_keeps_serving(models, tmp_path) -> None:
    import json

    from ray import serve

    registry, a, _, handle = models
    deploy_ranker(RankerConfig(registry=registry.uri, champion=a.version), num_cpus=0.25)
    bad = trained_model(registry, seed=9)
    meta = registry.path_of(bad.version, "meta.json")
    with registry.fs.open_input_stream(meta) as f:
        doc = json.loads(f.read())
    doc["feature_set_version"] = 99
    with registry.fs.open_output_stream(meta) as out:
        out.write(json.dumps(doc).encode())
    deploy_ranker(RankerConfig(registry=registry.uri, champion=bad.version), num_cpus=0.25)
    status_handle = serve.get_deployment_handle(RANKER_DEPLOYMENT, app_name=RANKER_APP)
    status = status_handle.status.remote().result(timeout_s=30)
    assert status["versions"] == [a.version]
    assert "trained on feature set 99" in status["error"]
    answer = handle.remote(request(100)).result(timeout_s=30)
    assert answer.versions == (a.version,)
