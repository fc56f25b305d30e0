"""Closed-loop evaluation: the same simulated population under four policies.

* ``blanket``: a plan upgrade to everyone who crosses 80 % of the cap, no targeting;
* ``rules``: the shipped catalog and contact policy, no model: the most valuable eligible
  offer always;
* ``kairos``: the shipped catalog with the learning ranker: a warm-up with an uninformed
  prior and more exploration, then a model trained from its own log, retrained every N new
  outcomes and swapped in when the off-policy gate says it is better;
* ``oracle``: the shipped catalog scored with the simulator's true propensities (the
  yardstick; Kairos never sees them);
* ``uplift`` (uplift world only): the shipped catalog with the true probabilities of both
  arms and of opt-out, decided on incremental value (the yardstick of issue 16);
* ``kairos-uplift`` (issue 16): Kairos's warm-up with a randomized no-action arm, then uplift
  rounds (``models.promotion.uplift_round``: a T-learner trained from its own log, judged by
  the DR incremental-value gate against the champion) at the end of the warm-up and weekly
  after; the champion serves through the ``Ranker`` and decides on incremental value;
* ``ceiling`` (on request): Kairos's warm-up, then a "perfect learner" for the rest of the
  run: a model fitted to the simulator's true propensity of every candidate in the warm-up
  log, from the features Kairos has, with no label noise. How far a model with these features
  can go; the gap between it and ``kairos`` is what learning from outcomes loses, the gap
  between it and ``oracle`` what the features cannot know;
* ``uplift-ceiling`` (on request, uplift world): ``kairos-uplift``'s warm-up, then the same
  kind of perfect learner of all three probabilities, refitted weekly on every decision so
  far and served as ``kairos-uplift`` serves its champion (the shipped exploration and the
  randomized no-action arm): what a model of Kairos's features earns under Kairos's own
  exploration when its labels have no noise (not a strict bound: a fit of the past's
  contexts, greedy on them).

Every policy sees the same events and the same per-customer random draws; responses and
opt-outs flow back into the engine as events. Metrics count decisions after the warm-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import xgboost as xgb

from engine.config import EngineSettings
from engine.decision.catalog import NO_ACTION, Catalog, parse_catalog
from engine.decision.features import FeatureSpec, feature_spec
from engine.decision.log import DECISION_SCHEMA, randomization_cost
from engine.decision.scorer import OfferScorer, ScoreRequest, ScoreResponse
from engine.events.schema import RAW_SCHEMA
from engine.governance.pseudonym import Pseudonymizer
from engine.local import LocalEngine
from engine.rules.spec import RuleSet
from engine.synthetic import telco
from engine.synthetic.response import OracleScorer, ResponseSimulator
from engine.synthetic.uplift import UpliftOracleScorer, UpliftSimulator
from engine.units import DAY_MS, HOUR_MS
from models.promotion import train_round, uplift_round
from models.ranker import Ranker, RankerConfig
from models.registry import ModelRegistry
from models.training import context_of, features_of

POLICIES = (
    "blanket", "rules", "kairos", "oracle", "ceiling", "uplift", "kairos-uplift", "uplift-ceiling",
)  # fmt: skip
WORLDS = ("classic", "uplift")


@dataclass(frozen=True)
class SimulationConfig:
    customers: int = 20_000
    days: int = 84
    warmup_days: int = 42
    events_per_customer_day: float = 2.0
    retrain_every: int = 1_500  # new known outcomes between retrainings
    warmup_exploration: float = 0.3
    prior_propensity: float = 0.15
    shards: int = 2
    seed: int = 7
    start: datetime = datetime(2026, 9, 1, tzinfo=UTC)
    #: "classic" (one response probability, a fixed fifth of it organic: the figures before
    #: issue 16) or "uplift" (response types: ``engine.synthetic.uplift``)
    world: str = "classic"
    #: web events come in visits (``telco.events``); False: each at a time of its own (the
    #: world of the figures before issue 17)
    visits: bool = True


class TruthFitScorer:
    """An OfferScorer answering with boosters fitted to the true probabilities (``ceiling``,
    ``uplift-ceiling``): P(convert | offer), and in the uplift world P(convert | no action)
    and P(opt-out | contact) too."""

    def __init__(self, booster: xgb.Booster, spec: FeatureSpec,
                 uplift: tuple[xgb.Booster, xgb.Booster] | None = None) -> None:  # fmt: skip
        self.booster, self.spec, self.uplift = booster, spec, uplift

    def score(self, request: ScoreRequest) -> ScoreResponse:
        if tuple(request.feature_names) != self.spec.names:
            raise ValueError("the ceiling model was fitted on other features")

        def p(b: xgb.Booster) -> np.ndarray:
            return np.clip(b.inplace_predict(request.features), 0.0, 1.0).astype(np.float32)

        n = request.rows
        if self.uplift is None:
            return ScoreResponse(p(self.booster), ("ceiling",), np.zeros(n, np.int8))
        return ScoreResponse(p(self.booster), ("uplift-ceiling",), np.zeros(n, np.int8),
                             baseline=p(self.uplift[0]), opt_out=p(self.uplift[1]))  # fmt: skip


def fit_truth(
    decisions: pa.Table, sim: ResponseSimulator, catalog: Catalog, uplift: bool = False
) -> TruthFitScorer | None:
    """The ``ceiling`` model: every candidate offer of every logged decision, labelled with the
    simulator's true propensity in that decision's logged context (no noise), fitted by
    XGBoost from the features the ranker gets; with ``uplift`` (``uplift-ceiling``, the uplift
    world only), also P(convert | no action) and P(opt-out | contact), each a booster of its
    own. None when the log has no candidate."""
    spec = feature_spec(catalog.trigger_ids, catalog.offer_ids)
    candidates = decisions.column("candidates").combine_chunks()
    counts = np.diff(candidates.offsets.to_numpy())
    if counts.sum() == 0:
        return None
    offers = np.asarray(
        candidates.flatten().field("offer_id").to_numpy(zero_copy_only=False), dtype=object
    )
    rows = decisions.take(pa.array(np.repeat(np.arange(decisions.num_rows), counts)))
    ctx = {k: v.astype(np.float64) for k, v in context_of(rows).items()}
    args = (sim.index_of(rows.column("customer_key").to_numpy()), offers, ctx["days_left"],
            ctx["km_from_home"], ctx["cart_items"], ctx["contacts_7d"])  # fmt: skip
    x = features_of(rows, spec, offers)
    params = {"objective": "reg:logistic", "max_depth": 6, "eta": 0.1, "nthread": 1, "seed": 0}

    def fitted(truth: np.ndarray) -> xgb.Booster:
        data = xgb.DMatrix(x, label=truth, feature_names=list(spec.names))
        return xgb.train(params, data, 300)

    if uplift:
        if not isinstance(sim, UpliftSimulator):
            raise ValueError("the three probabilities need the uplift world")
        p1, p0, out = sim.arms(*args)
        return TruthFitScorer(fitted(p1), spec, (fitted(p0), fitted(out)))
    return TruthFitScorer(fitted(sim.propensity(*args)), spec)


class ConstantScorer:
    """The same propensity for everything: the uninformed prior, or 1.0 for 'value only'."""

    def __init__(self, p: float, version: str) -> None:
        self.p, self.version = p, version

    def score(self, request: ScoreRequest) -> ScoreResponse:
        n = request.rows
        return ScoreResponse(np.full(n, self.p, np.float32), (self.version,), np.zeros(n, np.int8))


@dataclass
class PolicyRun:
    """What one policy did: its decisions, the simulator's outcomes and the model history."""

    name: str
    decisions: list[pa.Table] = field(default_factory=list)
    outcomes: list[dict[str, np.ndarray]] = field(default_factory=list)
    responses: list[pa.Table] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def blanket_catalog(catalog: Catalog) -> Catalog:
    doc = dict(catalog.document)
    upgrade = next(o for o in doc["offers"] if o["id"] == "plan_upgrade")
    doc["offers"] = [{**upgrade, "eligible": None, "cooldown": "0s"}]
    doc["policy"] = {
        **(doc.get("policy") or {}),
        "frequency_caps": [],
        "exploration": 0.0,
    }
    return parse_catalog(doc, "blanket")


#: the randomized no-action arm of ``kairos-uplift``: in the warm-up, and after it
WARMUP_NO_ACTION_SHARE = 0.2
UPLIFT_NO_ACTION_SHARE = 0.1


def with_no_action_arm(catalog: Catalog, share: float) -> Catalog:
    doc = dict(catalog.document)
    doc["policy"] = {**(doc.get("policy") or {}), "no_action_share": share}
    return parse_catalog(doc, catalog.source)


def with_exploration(catalog: Catalog, exploration: float) -> Catalog:
    doc = dict(catalog.document)
    doc["policy"] = {**(doc.get("policy") or {}), "exploration": exploration}
    return parse_catalog(doc, catalog.source)


class Simulation:
    """Runs the policies over one generated month (or more) of one population."""

    def __init__(
        self,
        config: SimulationConfig,
        rules: RuleSet,
        catalog: Catalog,
        registry_uri: str,
        progress: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config
        self.rules = rules
        self.catalog = catalog
        self.registry_uri = registry_uri
        self.progress = progress or (lambda name, share: None)
        self.settings = EngineSettings(shards=config.shards, allowed_lateness_s=60)
        self.pop = telco.population(config.customers, seed=config.seed)
        total = int(config.customers * config.days * config.events_per_customer_day)
        self.events = telco.events(
            self.pop,
            total,
            days=config.days,
            seed=config.seed,
            start=config.start,
            visits=config.visits,
        )
        self.t0 = int(config.start.timestamp() * 1000)
        self.warmup_end = self.t0 + config.warmup_days * DAY_MS

    def simulator(self) -> ResponseSimulator:
        if self.config.world not in WORLDS:
            raise ValueError(f"unknown world {self.config.world!r}; known: {', '.join(WORLDS)}")
        kind = UpliftSimulator if self.config.world == "uplift" else ResponseSimulator
        return kind(self.pop, self.settings.pseudonym_key, seed=self.config.seed)

    def run(self, name: str) -> PolicyRun:
        started = time.perf_counter()
        sim = self.simulator()
        catalog, scorer = self._policy(name, sim)
        # the engine knows the world's stores and stock, as a retailer knows its own inventory
        engine = LocalEngine(self.settings, self.rules, catalog, scorer, reference=sim.reference)
        run = PolicyRun(name)
        learns = name in ("kairos", "kairos-uplift")
        registry = ModelRegistry(f"{self.registry_uri}/{name}") if learns else None
        if registry is not None:
            registry.clear()  # a rerun must not start from an earlier run's champion
        outcomes_at_last_train = 0
        arrival = self.events.column("ts").cast(pa.int64()).to_numpy()
        steps = np.arange(self.t0, self.t0 + (self.config.days + 1) * DAY_MS + 1, HOUR_MS)
        bounds = np.searchsorted(arrival, steps)
        bounds[-1] = self.events.num_rows
        pending = _empty_raw()
        seen = 0
        for i in range(len(steps) - 1):
            chunk = self.events.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
            due, pending = _split_due(pending, int(steps[i + 1]), int(steps[i]))
            engine.submit(pa.concat_tables([chunk, due]) if due.num_rows else chunk)
            seen, answers = self._answer(engine, sim, run, seen)
            pending = pa.concat_tables([pending, *answers])
            if name == "ceiling" and steps[i + 1] >= self.warmup_end and not run.models:
                ceiling = fit_truth(_all(run), sim, self.catalog)
                if ceiling is not None:  # else the warm-up policy carries on
                    engine.set_catalog(self.catalog, ceiling)
                run.models.append({"version": "ceiling", "promoted": ceiling is not None})
            if name == "uplift-ceiling" and steps[i + 1] >= self.warmup_end:
                # refitted weekly on every decision so far, as kairos-uplift retrains, and
                # served as kairos-uplift serves its models
                due_at = run.models[-1]["cutoff_ms"] + 7 * DAY_MS if run.models else 0
                if steps[i + 1] >= due_at:
                    ceiling = fit_truth(_all(run), sim, self.catalog, uplift=True)
                    if ceiling is not None:  # else the warm-up policy carries on
                        served = with_no_action_arm(self.catalog, UPLIFT_NO_ACTION_SHARE)
                        engine.set_catalog(served, ceiling)
                    run.models.append({"version": name, "promoted": ceiling is not None,
                                       "cutoff_ms": int(steps[i + 1])})  # fmt: skip
            if name == "kairos-uplift" and steps[i + 1] >= self.warmup_end:
                assert registry is not None
                # weekly; daily until a first model is promoted
                last = run.models[-1] if run.models else None
                champion = registry.champion()
                every = 7 * DAY_MS if champion else DAY_MS
                due_at = self.warmup_end if last is None else last["cutoff_ms"] + every
                if steps[i + 1] >= due_at:
                    self._retrain_uplift(engine, run, registry, int(steps[i + 1]))
            elif registry is not None and steps[i + 1] >= self.warmup_end:
                known = sum(int(o["accepted"].size) for o in run.outcomes)
                first = not run.models
                if first or known - outcomes_at_last_train >= self.config.retrain_every:
                    outcomes_at_last_train = known
                    model = self._retrain(run, registry, int(steps[i + 1]))
                    if model is not None:
                        engine.set_catalog(self.catalog, model)
            self.progress(name, (i + 1) / (len(steps) - 1))
        engine.end_stream()
        self._answer(engine, sim, run, seen)
        run.seconds = time.perf_counter() - started
        return run

    @staticmethod
    def _answer(
        engine: LocalEngine, sim: ResponseSimulator, run: PolicyRun, seen: int
    ) -> tuple[int, list[pa.Table]]:
        """Let the simulator answer the decisions made since ``seen``; returns its events."""
        answers = []
        for table in engine.decisions[seen:]:
            events, outcome = sim.respond(table)
            run.decisions.append(table)
            run.outcomes.append(outcome)
            if events.num_rows:
                run.responses.append(events)
                answers.append(events)
        return len(engine.decisions), answers

    def _retrain_uplift(
        self, engine: LocalEngine, run: PolicyRun, registry: ModelRegistry, cutoff_ms: int
    ) -> None:
        responses = pa.concat_tables(run.responses) if run.responses else _empty_raw()
        result = uplift_round(_all(run), responses, self.catalog, registry, cutoff_ms,
                              Pseudonymizer(self.settings.pseudonym_key),
                              seed=len(run.models))  # fmt: skip
        champion = registry.champion()
        if result.promoted and champion is not None:
            ranker = Ranker(RankerConfig(registry=registry.uri, champion=champion))
            engine.set_catalog(with_no_action_arm(self.catalog, UPLIFT_NO_ACTION_SHARE), ranker)
        gate = result.metrics.get("gate", {})
        run.models.append({"cutoff_day": (cutoff_ms - self.t0) / DAY_MS, "cutoff_ms": cutoff_ms,
                           "version": result.artifact.version if result.artifact else None,
                           "promoted": result.promoted, "reason": result.reason,
                           "silenced": bool(gate.get("silenced")),
                           "gain": gate.get("gain"), "changed": gate.get("changed"),
                           "qini": result.metrics.get("holdout", {}).get("qini")})  # fmt: skip

    def _policy(self, name: str, sim: ResponseSimulator) -> tuple[Catalog, OfferScorer]:
        if name == "blanket":
            return blanket_catalog(self.catalog), ConstantScorer(1.0, "blanket")
        if name == "rules":
            return with_exploration(self.catalog, 0.0), ConstantScorer(1.0, "rules")
        if name == "oracle":
            return with_exploration(self.catalog, 0.0), OracleScorer(sim)
        if name == "uplift":
            if not isinstance(sim, UpliftSimulator):
                raise ValueError("the uplift yardstick needs the uplift world (--world uplift)")
            return with_exploration(self.catalog, 0.0), UpliftOracleScorer(sim)
        if name in ("kairos", "ceiling"):
            warm = with_exploration(self.catalog, self.config.warmup_exploration)
            return warm, ConstantScorer(self.config.prior_propensity, "prior")
        if name in ("kairos-uplift", "uplift-ceiling"):
            if name == "uplift-ceiling" and not isinstance(sim, UpliftSimulator):
                raise ValueError("uplift-ceiling needs the uplift world (--world uplift)")
            warm = with_exploration(self.catalog, self.config.warmup_exploration)
            warm = with_no_action_arm(warm, WARMUP_NO_ACTION_SHARE)
            return warm, ConstantScorer(self.config.prior_propensity, "prior")
        raise ValueError(f"unknown policy '{name}'; known: {', '.join(POLICIES)}")

    def _retrain(
        self, run: PolicyRun, registry: ModelRegistry, cutoff_ms: int
    ) -> OfferScorer | None:
        decisions = _all(run)
        responses = pa.concat_tables(run.responses) if run.responses else _empty_raw()
        result = train_round(
            decisions, responses, self.catalog, registry, cutoff_ms, seed=len(run.models)
        )
        run.models.append(
            {
                "cutoff_day": (cutoff_ms - self.t0) / DAY_MS,
                "version": result.artifact.version if result.artifact else None,
                "promoted": result.promoted,
                "reason": result.reason,
                "auc": result.metrics.get("holdout", {}).get("auc"),
            }
        )
        champion = registry.champion()
        if champion is None or not result.promoted:
            return None
        return Ranker(RankerConfig(registry=registry.uri, champion=champion))


def _all(run: PolicyRun) -> pa.Table:
    """Every decision of the run so far."""
    return pa.concat_tables(run.decisions) if run.decisions else DECISION_SCHEMA.empty_table()


def _empty_raw() -> pa.Table:
    return RAW_SCHEMA.empty_table()


def _split_due(pending: pa.Table, until_ms: int, floor_ms: int) -> tuple[pa.Table, pa.Table]:
    """(responses due before ``until_ms``, clamped to at least ``floor_ms``; the rest)."""
    if pending.num_rows == 0:
        return pending, pending
    ts = pending.column("ts").cast(pa.int64()).to_numpy()
    due = ts < until_ms
    now = pending.filter(pa.array(due))
    later = pending.filter(pa.array(~due))
    clamped = np.maximum(now.column("ts").cast(pa.int64()).to_numpy(), floor_ms)
    field = now.schema.field("ts")
    now = now.set_column(
        now.schema.get_field_index("ts"), field, pa.array(clamped).cast(field.type)
    )
    return now, later


def _flatten(run: PolicyRun) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """All decisions of a run with the simulator's outcome per decision."""
    flags = ("accepted", "opted_out", "organic", "converted")
    if not run.decisions:
        empty = {k: np.zeros(0, dtype=bool) for k in flags}
        return DECISION_SCHEMA.empty_table(), {**empty, "incremental": np.zeros(0)}
    table = pa.concat_tables(run.decisions)
    out = {k: np.zeros(table.num_rows, dtype=bool) for k in flags}
    out["incremental"] = np.zeros(table.num_rows)
    offset = 0
    for chunk, outcome in zip(run.decisions, run.outcomes, strict=True):
        rows = offset + outcome["row"]
        for k, column in out.items():
            column[rows] = outcome[k]
        offset += chunk.num_rows
    return table, out


def report(run: PolicyRun, customers: int, warmup_end_ms: int, t0_ms: int) -> dict[str, Any]:
    """The policy's results over the decisions after the warm-up."""
    table, out = _flatten(run)
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    action = np.asarray(table.column("action").to_numpy(zero_copy_only=False), dtype=object)
    delivered = np.asarray(table.column("delivered").to_numpy(zero_copy_only=False), bool)
    control = np.asarray(table.column("control").to_numpy(zero_copy_only=False), bool)
    value = table.column("value").to_numpy()
    cost = table.column("cost").to_numpy()
    after = ts >= warmup_end_ms
    offer = action != NO_ACTION
    sent = delivered & after
    accepted = out["accepted"] & sent
    n_acc = int(accepted.sum())
    # uplift: conversions (accepted, or bought on their own) per would-be offer, vs control
    would = offer & after
    treated, held = would & ~control, would & control
    pt = float(out["converted"][treated].mean()) if treated.any() else float("nan")
    pc = float(out["organic"][held].mean()) if held.any() else float("nan")
    nt, nc = int(treated.sum()), int(held.sum())
    half = 1.96 * float(np.sqrt(pt * (1 - pt) / max(nt, 1) + pc * (1 - pc) / max(nc, 1)))
    days = ((ts - t0_ms) // DAY_MS).astype(np.int64)
    daily = []
    for d in range(int(days.max()) + 1 if days.size else 0):
        on_day = (
            sent & (days == d) if d * DAY_MS + t0_ms >= warmup_end_ms else delivered & (days == d)
        )
        k = int(on_day.sum())
        daily.append(float((out["accepted"] & on_day).sum() / k) if k else float("nan"))

    def totals(on: np.ndarray) -> dict[str, Any]:
        """Offers sent, accepted, acceptance, net value, opt-outs and decisions within ``on``."""
        k_sent, k_acc = int((sent & on).sum()), int((accepted & on).sum())
        return {
            "offers_sent": k_sent,
            "accepted": k_acc,
            "acceptance_rate": k_acc / k_sent if k_sent else 0.0,
            "net_value": float((value * (accepted & on)).sum() - cost[sent & on].sum()),
            # against the same customers without the offers (the simulator's counterfactual)
            "incremental_net_value": float(out["incremental"][sent & on].sum()),
            "opt_outs": int((out["opted_out"] & sent & on).sum()),
            "decisions": int((after & on).sum()),
        }

    reason = np.asarray(table.column("reason").to_numpy(zero_copy_only=False), dtype=object)
    held = (reason == "no_action_arm") & after
    explored = np.asarray(table.column("explored").to_numpy(zero_copy_only=False), bool)
    rule = np.asarray(table.column("rule_id").to_numpy(zero_copy_only=False), dtype=object)
    by_trigger = {str(t): totals(rule == t) for t in sorted(set(rule[after].tolist()))}
    return {
        **totals(np.ones(ts.size, dtype=bool)),
        "accepted_per_1000_customers": 1000.0 * n_acc / customers,
        "offers_by_action": {
            str(a): int(((action == a) & sent).sum()) for a in sorted(set(action[sent].tolist()))
        },
        "uplift": {
            "conversion_treated": pt,
            "conversion_control": pc,
            "uplift": pt - pc,
            # the same treated customers with and without the offer (the simulator's truth)
            "true_uplift": float(
                (out["converted"][treated].astype(float) - out["organic"][treated]).mean()
            )
            if treated.any()
            else float("nan"),
            "low": pt - pc - half,
            "high": pt - pc + half,
            "treated": nt,
            "control": nc,
        },
        "by_trigger": by_trigger,
        # what exploration cost: offers drawn at random, against the policy's own choices
        "explored": totals(explored & ~held),
        "chosen": totals(~explored),
        # the randomized no-action arm and what the policy expected to earn on those decisions
        "no_action_arm": randomization_cost(table.filter(pa.array(held)))["no_action_arm"],
        "daily_acceptance_rate": daily,
        "models": run.models,
        "seconds": round(run.seconds, 1),
    }
