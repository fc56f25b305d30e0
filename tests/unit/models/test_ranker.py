"""The ranker's logic without Serve: model versions, champion/challenger, refusing bad models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.decision.scorer import ScoreRequest
from engine.errors import ConfigError
from models.ranker import Ranker, RankerConfig
from models.registry import ModelRegistry
from models.uplift import calibrate
from tests.factories import SPEC, generated_rows, trained_model


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(str(tmp_path / "models"))


def request(n: int, seed: int = 0) -> ScoreRequest:
    x, _ = generated_rows(n, seed)
    keys = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ScoreRequest(x, SPEC.names, keys)


def test_registry_keeps_versions_their_metrics_and_the_champion(registry) -> None:
    a = trained_model(registry, seed=1)
    b = trained_model(registry, seed=2)
    assert (a.version, b.version) == ("v0001", "v0002")
    assert registry.versions() == ["v0001", "v0002"]
    registry.set_champion("v0001")
    registry.set_champion("v0002")
    assert registry.champion() == "v0002"
    assert registry.load("v0001").status == "retired"
    loaded = registry.load("v0002")
    assert loaded.metrics == {"seed": 2, "invert": False} and loaded.status == "champion"
    r = request(1000)
    np.testing.assert_array_equal(
        loaded.booster.inplace_predict(r.features), b.booster.inplace_predict(r.features)
    )
    with pytest.raises(ConfigError, match="v0009 is not in the registry"):
        registry.load("v0009")
    registry.clear()
    assert registry.versions() == [] and registry.champion() is None
    assert trained_model(registry, seed=3).version == "v0001"


def test_the_ranker_scores_with_the_champion_and_sends_a_stable_share_to_the_challenger(
    registry,
) -> None:
    a = trained_model(registry, seed=1)
    b = trained_model(registry, seed=2, invert=True)
    r = request(20_000)
    solo = Ranker(RankerConfig(registry=registry.uri, champion=a.version)).score(r)
    np.testing.assert_allclose(solo.propensity, a.booster.inplace_predict(r.features), rtol=1e-6)
    assert solo.versions == ("v0001",) and not solo.version_index.any()

    split = RankerConfig(
        registry=registry.uri, champion=a.version, challenger=b.version, challenger_share=0.3
    )
    answer = Ranker(split).score(r)
    to_b = answer.version_index == 1
    assert to_b.mean() == pytest.approx(0.3, abs=0.02)
    np.testing.assert_allclose(
        answer.propensity[to_b], b.booster.inplace_predict(r.features[to_b]), rtol=1e-6
    )
    # the same customers meet the same model in every request
    again = Ranker(split).score(
        ScoreRequest(r.features[::-1], r.feature_names, r.customer_keys[::-1])
    )
    np.testing.assert_array_equal(again.version_index[::-1], answer.version_index)


def test_new_offers_score_as_unknown_and_a_reordered_request_scores_the_same(registry) -> None:
    a = trained_model(registry, seed=1)
    ranker = Ranker(RankerConfig(registry=registry.uri, champion=a.version))
    r = request(500)
    base = ranker.score(r).propensity
    names = (*r.feature_names, "offer=brand_new")
    wider = np.concatenate([r.features, np.zeros((500, 1), np.float32)], axis=1)
    wider_answer = ranker.score(ScoreRequest(wider, names, r.customer_keys)).propensity
    np.testing.assert_array_equal(wider_answer, base)


def test_the_ranker_refuses_a_model_built_on_other_features(registry, tmp_path) -> None:
    a = trained_model(registry, seed=1)
    meta_path = tmp_path / "models" / a.version / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["feature_set_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="trained on feature set 99"):
        Ranker(RankerConfig(registry=registry.uri, champion=a.version))
    meta["feature_set_version"] = 1
    meta["feature_names"] = ["days_left", *meta["feature_names"][1:]]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="feature names differ"):
        Ranker(RankerConfig(registry=registry.uri, champion=a.version))
    ok = trained_model(registry, seed=3)
    ranker = Ranker(RankerConfig(registry=registry.uri, champion=ok.version))
    bad = request(10)
    names = ("days_left", *bad.feature_names[1:])
    with pytest.raises(ConfigError, match="context columns differ"):
        ranker.score(ScoreRequest(bad.features, names, bad.customer_keys))


def test_an_uplift_model_keeps_its_three_boosters_and_serves_beside_a_response_model(
    registry,
) -> None:
    """Registered, loaded, and served with a response champion: its rows get all three
    probabilities, the response model's rows NaN for the two it does not model."""
    response = trained_model(registry, seed=1)
    extra = (trained_model(registry, seed=2).booster, trained_model(registry, seed=3).booster)
    offer = SPEC.offers[0]
    lines = {offer: (0.01, 0.5)}
    uplift = registry.register(response.booster, SPEC.names, {}, uplift=extra, lines=lines)
    loaded = registry.load(uplift.version)
    assert loaded.kind == "uplift" and registry.load(response.version).kind == "response"
    assert loaded.lines == lines
    r = request(5_000)
    for got, want in ((loaded.baseline, extra[0]), (loaded.opt_out, extra[1])):
        assert got is not None
        np.testing.assert_array_equal(got.inplace_predict(r.features),
                                      want.inplace_predict(r.features))  # fmt: skip
    config = RankerConfig(registry=registry.uri, champion=response.version,
                          challenger=uplift.version, challenger_share=0.5)  # fmt: skip
    ranker = Ranker(config)
    assert ranker.models[1].arms.joint is not None  # its three boosters scored in one call
    scored = ranker.score(r)
    assert scored.baseline is not None and scored.opt_out is not None
    mine = scored.version_index == 1
    assert 0.4 < mine.mean() < 0.6
    assert np.isnan(scored.baseline[~mine]).all() and np.isnan(scored.opt_out[~mine]).all()
    np.testing.assert_allclose(scored.baseline[mine],
                               extra[0].inplace_predict(r.features[mine]), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(scored.opt_out[mine],
                               extra[1].inplace_predict(r.features[mine]), rtol=1e-6)  # fmt: skip
    # its P(convert | offer) carries the calibration of its uplift, offer by offer
    x = r.features[mine]
    p1, p0 = response.booster.inplace_predict(x), extra[0].inplace_predict(x)
    want = calibrate(p1, p0, x, SPEC.names, lines)
    np.testing.assert_allclose(scored.propensity[mine], want, rtol=1e-5, atol=1e-6)
    of_offer = x[:, SPEC.names.index(f"offer={offer}")] == 1
    assert 0 < of_offer.sum() < of_offer.size
    np.testing.assert_allclose(scored.propensity[mine][~of_offer], np.clip(p1[~of_offer], 0, 1),
                               rtol=1e-5)  # fmt: skip
    alone = Ranker(RankerConfig(registry=registry.uri, champion=response.version)).score(r)
    assert alone.baseline is None and alone.opt_out is None
    registry.fs.delete_file(registry.path_of(uplift.version, "opt_out.json"))
    with pytest.raises(ConfigError, match=r"opt_out\.json is missing"):
        registry.load(uplift.version)
