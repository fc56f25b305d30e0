"""From events to logged decisions and outcomes on a real local Ray with the ranker on Serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from actors.scorer import ServeScorer
from actors.supervisor import Supervisor
from engine.config import EngineSettings
from engine.decision.catalog import load_catalog
from engine.decision.scorer import RANKER_APP, RANKER_DEPLOYMENT
from engine.local import LocalEngine
from engine.rules.spec import load_rules
from models.deployment import deploy_ranker
from models.promotion import train_round
from models.ranker import Ranker, RankerConfig
from models.registry import ModelRegistry
from models.simulate import Simulation, SimulationConfig, with_exploration
from tests.conftest import BROAD_RULES, ROOT

pytestmark = pytest.mark.integration

DAY = 86_400_000


def _live_days(
    sim: Simulation, sup: Supervisor, decisions: Path, days: int, each_day: Any = None
) -> None:
    """Feed the engine ``days`` of the simulation's events, a day at a time; after each, the
    simulator answers the decisions logged that day (at the day's end: a later event time
    would make the next day's events late) and ``each_day`` runs (a retraining check)."""
    answered = sim.simulator()
    seen: set[str] = set()
    arrival = sim.events.column("ts").cast(pa.int64()).to_numpy()
    for day in range(days):
        lo, hi = np.searchsorted(arrival, [sim.t0 + day * DAY, sim.t0 + (day + 1) * DAY])
        sup.router.submit(sim.events.slice(int(lo), int(hi - lo)))
        sup.router.drain()
        sup.router.write_logs()
        logged = ds.dataset(str(decisions), format="parquet", partitioning="hive")
        new = [f for f in logged.files if f not in seen]
        seen.update(new)
        if new:
            answers, _ = answered.respond(ds.dataset(new, format="parquet").to_table())
            ts = np.full(answers.num_rows, int(arrival[hi - 1]))
            field = answers.schema.field("ts")
            answers = answers.set_column(
                answers.schema.get_field_index("ts"), field, pa.array(ts).cast(field.type)
            ).sort_by("ts")
            sup.router.submit(answers)
        if each_day is not None:
            each_day()


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory):
    """A champion trained on a simulated log (real XGBoost), served by the ranker on Serve."""
    from ray import serve

    # the moments and world of before issue 17: a log rich in decisions (see the rules file)
    rules = load_rules(BROAD_RULES)
    catalog = load_catalog(ROOT / "deploy" / "config" / "offers.yaml")
    config = SimulationConfig(customers=3000, days=16, warmup_days=16, seed=5, visits=False)
    sim = Simulation(config, rules, catalog, str(tmp_path_factory.mktemp("sim")))
    run = sim.run("kairos")
    registry = ModelRegistry(str(tmp_path_factory.mktemp("registry")))
    log = pa.concat_tables(run.decisions), pa.concat_tables(run.responses)
    result = train_round(*log, catalog, registry, sim.t0 + config.days * DAY)
    assert result.artifact is not None
    registry.set_champion(result.artifact.version)
    config_ = RankerConfig(registry=registry.uri, champion=result.artifact.version)
    deploy_ranker(config_, num_cpus=0.25)
    yield sim, rules, catalog, config_, log
    serve.delete(RANKER_APP)


def test_shards_decide_through_serve_exactly_as_the_local_engine_and_log_by_day(
    world, tmp_path
) -> None:
    sim, rules, catalog, ranker_config, _ = world
    events = sim.events.slice(0, 120_000)
    settings = EngineSettings(shards=2, allowed_lateness_s=60, micro_batch_max_events=1_000_000)
    local = LocalEngine(settings, rules, catalog, Ranker(ranker_config))
    sup = Supervisor(
        settings,
        rules,
        shard_cpus=0.25,
        namespace_prefix="it-decide",
        catalog=catalog,
        scorer=ServeScorer(),
        decision_uri=str(tmp_path / "decisions"),
    )
    try:
        assert sup.connect_scorers() == []  # every shard reached the ranker before deciding
        for start in range(0, events.num_rows, 20_000):  # one micro-batch per shard per chunk
            chunk = events.slice(start, 20_000)
            local.submit(chunk)
            sup.router.submit(chunk)
            sup.router.drain()
        local.end_stream()
        sup.router.end_stream()
        logged = ds.dataset(str(tmp_path / "decisions"), format="parquet", partitioning="hive")
        got = logged.to_table().sort_by([("ts", "ascending"), ("decision_id", "ascending")])
        want = local.decision_table()
        assert got.num_rows == want.num_rows > 500
        for column in ("decision_id", "action", "channel", "probability", "delivered", "reason"):
            assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
        np.testing.assert_allclose(
            got.column("propensity").to_numpy(zero_copy_only=False),
            want.column("propensity").to_numpy(zero_copy_only=False),
            rtol=1e-6,
        )
        days = {p.split("day=")[1][:10] for p in logged.files}
        assert len(days) >= 3  # partitioned by the day of the decision
        scored = got.filter(pa.compute.is_valid(got.column("model_version")))
        assert set(scored.column("model_version").to_pylist()) == {ranker_config.champion}
        assert sup.router.stats.as_dict()["decisions"] == got.num_rows

        # outcomes flow back as events and land in the golden record
        sim_responses, outcome = sim.simulator().respond(got)
        accepted = int(outcome["accepted"].sum())
        assert accepted > 10 and sim_responses.num_rows >= accepted
        # they arrive after the replayed stream: shift them to its end so none is late
        end = pa.compute.max(events.column("ts")).cast(pa.int64()).as_py()
        ts = np.maximum(sim_responses.column("ts").cast(pa.int64()).to_numpy(), end + 1000)
        field = sim_responses.schema.field("ts")
        sim_responses = sim_responses.set_column(
            sim_responses.schema.get_field_index("ts"), field, pa.array(ts).cast(field.type)
        ).sort_by("ts")
        assert not sup.router.submit(sim_responses)  # no dead letters
        sup.router.end_stream()
        accepted_ids = set(
            sim_responses.filter(pa.compute.equal(sim_responses.column("response"), "accepted"))
            .column("customer_id")
            .to_pylist()
        )
        someone = sorted(accepted_ids)[0]
        assert sup.customer(someone)["offers_accepted"] >= 1
    finally:
        sup.shutdown()


def test_the_running_engine_retrains_from_its_outcomes_and_swaps_the_winner_in(
    world, tmp_path
) -> None:
    """A bad champion serves (it thinks nobody accepts anything, so it never makes an offer
    but the exploring ones); outcomes flow back day by day; the retrainer trains from the
    engine's own logs and swaps the better model into Serve."""
    from ray import serve

    from deploy.retraining import Retrainer
    from engine.decision.features import feature_spec
    from models.training import fit, training_set

    sim, rules, shipped, _, log = world
    catalog = with_exploration(shipped, 0.5)  # the bad champion's log must still hold offers
    registry = ModelRegistry(str(tmp_path / "registry"))
    spec = feature_spec(catalog.trigger_ids, catalog.offer_ids)
    data = training_set(*log, sim.t0 + 16 * DAY, catalog.policy.attribution_window_ms, spec)
    rare = (np.random.default_rng(0).random(data.labels.size) < 0.01).astype(np.float32)
    bad = registry.register(fit(data.features, rare, spec.names, rounds=20), spec.names, {})
    registry.set_champion(bad.version)
    deploy_ranker(RankerConfig(registry=registry.uri, champion=bad.version), num_cpus=0.25)
    status = serve.get_deployment_handle(RANKER_DEPLOYMENT, app_name=RANKER_APP).status
    swaps = status.remote().result(timeout_s=30)["swaps"]
    sup = Supervisor(
        EngineSettings(shards=2, allowed_lateness_s=60),
        rules,
        shard_cpus=0.25,
        namespace_prefix="it-retrain",
        catalog=catalog,
        scorer=ServeScorer(),
        decision_uri=str(tmp_path / "decisions"),
        response_uri=str(tmp_path / "responses"),
    )
    retrainer = Retrainer(sup, registry, catalog, every=100, kind="response")
    try:
        _live_days(sim, sup, tmp_path / "decisions", 16, retrainer.maybe_retrain)
        retrainer.maybe_retrain(force=True)  # and once more at the end of the stream
        assert sup.router.stats.responses > 100
        trained = [r for r in retrainer.history if r.artifact is not None]
        assert trained, [r.reason for r in retrainer.history]
        promoted = [r for r in trained if r.promoted]
        assert promoted, [r.reason for r in trained]
        winner = promoted[-1].artifact
        assert winner is not None and registry.champion() == winner.version
        served = status.remote().result(timeout_s=30)
        assert served["versions"] == [winner.version] and served["swaps"] > swaps
    finally:
        sup.shutdown()


def test_the_running_engine_learns_incremental_value_from_its_own_logs(
    ray_cluster, tmp_path
) -> None:
    """The uplift world: a champion that offers everything to everyone (a response model sure
    that everybody buys) serves; conversions of every arm and opt-outs flow back as ordinary
    events; the retrainer trains an uplift model from the engine's own decision and response
    logs, the incremental-value gate finds it better, and Serve serves its three
    probabilities."""
    from ray import serve

    from deploy.retraining import Retrainer
    from engine.decision.features import feature_spec
    from engine.decision.scorer import ScoreRequest
    from models.simulate import with_no_action_arm
    from models.training import fit

    rules = load_rules(BROAD_RULES)  # a log rich in decisions, as in the world fixture
    shipped = load_catalog(ROOT / "deploy" / "config" / "offers.yaml")
    config = SimulationConfig(customers=8000, days=18, warmup_days=18, seed=21, world="uplift",
                              visits=False)  # fmt: skip
    sim = Simulation(config, rules, shipped, str(tmp_path / "sim"))
    catalog = with_no_action_arm(with_exploration(shipped, 0.3), 0.2)
    registry = ModelRegistry(str(tmp_path / "registry"))
    spec = feature_spec(catalog.trigger_ids, catalog.offer_ids)
    rng = np.random.default_rng(0)
    x = rng.random((2_000, len(spec.names))).astype(np.float32)
    sure = fit(x, (rng.random(2_000) < 0.97).astype(np.float32), spec.names, rounds=5)
    blanket = registry.register(sure, spec.names, {})
    registry.set_champion(blanket.version)
    deploy_ranker(RankerConfig(registry=registry.uri, champion=blanket.version), num_cpus=0.25)
    handle = serve.get_deployment_handle(RANKER_DEPLOYMENT, app_name=RANKER_APP)
    sup = Supervisor(
        EngineSettings(shards=2, allowed_lateness_s=60),
        rules,
        shard_cpus=0.25,
        namespace_prefix="it-uplift",
        catalog=catalog,
        scorer=ServeScorer(),
        decision_uri=str(tmp_path / "decisions"),
        response_uri=str(tmp_path / "responses"),
    )
    retrainer = Retrainer(sup, registry, catalog, every=10**9)  # uplift: the catalog's offers
    assert retrainer.uplift  # name their conversions
    try:
        _live_days(sim, sup, tmp_path / "decisions", 18)
        result = retrainer.maybe_retrain(force=True)
        assert result is not None and result.artifact is not None, result
        # the response log kept the conversions of every arm and the opt-outs, by key only
        outcomes = ds.dataset(str(tmp_path / "responses"), format="parquet").to_table()
        kinds = set(outcomes.column("kind").to_pylist())
        assert {"offer_response", "purchase", "consent"} <= kinds, kinds
        assert "customer_id" not in outcomes.schema.names
        rows = result.metrics["train_rows"]
        assert rows["treated"] > 200 and rows["untreated"] > 200, rows
        gate = result.metrics["gate"]
        assert gate["against"] == f"champion {blanket.version}"
        # offering everything loses money here: the uplift model is confidently better
        assert result.promoted and gate["gain"]["low"] > 0, result.reason
        winner = result.artifact
        assert registry.champion() == winner.version and registry.load(winner.version).kind == (
            "uplift"
        )
        served = handle.status.remote().result(timeout_s=30)
        assert served["versions"] == [winner.version]
        request = ScoreRequest(x[:50], spec.names, np.arange(50, dtype=np.uint64))
        answer = handle.remote(request).result(timeout_s=30)
        assert answer.baseline is not None and answer.opt_out is not None
        assert winner.baseline is not None
        np.testing.assert_allclose(
            answer.baseline, np.clip(winner.baseline.inplace_predict(x[:50]), 0, 1), rtol=1e-5
        )
    finally:
        sup.shutdown()
