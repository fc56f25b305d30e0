"""The decider: turns a micro-batch's triggers into decisions, in the shard, vectorized.

For every trigger some offer answers, it considers each answering offer and NO_ACTION:

1. policy: eligibility, consent, cooldown and frequency caps exclude offers
   (``engine.decision.policy``), each with its reason; an outbound offer decided in the
   customer's quiet hours is held until they end (``deliver_after``);
2. scoring: one ``OfferScorer`` request for the whole micro-batch, with the feature rows of
   every (trigger, offer) pair still a candidate;
3. arbitration: the offer with the highest expected value (propensity x value - cost) when
   it is positive, else NO_ACTION; with probability ``exploration`` a uniform choice among
   the candidates and NO_ACTION instead. The probability of the chosen action is logged.
   Draws come from stable hashes of the decision id, so replaying the log reproduces every
   choice;
4. delivery: a chosen offer is delivered unless the customer is in the control group; either
   way it counts as a contact for caps and cooldowns, so the control group's logged
   would-be decisions follow the same policy. A customer with several triggers in one
   micro-batch is decided in time order, in rounds, so caps hold within the batch too.

The context (and so the features) of a decision is taken as of its trigger event, with the
customer's contact history as of the start of the micro-batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.decision.catalog import NO_ACTION, Catalog
from engine.decision.features import (
    CONTEXT_FIELDS,
    CONTEXT_PREFIX,
    FeatureSpec,
    build_features,
    feature_spec,
)
from engine.decision.log import DECISION_SCHEMA, candidates_array, empty_decisions
from engine.decision.policy import (
    ALL_CHANNELS,
    REASON_LABELS,
    Reason,
    allowed_channels,
    capped,
    contact_keys,
    contacts_within,
    deliver_after,
    first_channel,
    in_control_group,
    push_contact,
    stable_uniform,
)
from engine.decision.scorer import (
    OfferScorer,
    ScoreRequest,
    ScorerUnavailableError,
    check_response,
)
from engine.events.schema import CHANNELS
from engine.partition import mix64
from engine.rules.expr import haversine_km
from engine.state.store import NEVER, CustomerStore
from engine.state.view import BatchView, RowsView

DAY_MS = 86_400_000
EXPLORE_SALT = 0x65787031
PICK_SALT = 0x7069636B
#: the trigger id of inbound requests (``POST /v1/decide``); offers answer it like a rule's
INBOUND = "inbound"


def rule_salt(rule_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(rule_id.encode(), digest_size=8).digest(), "little")


def decision_ids(event_ids: np.ndarray, rule_ids: np.ndarray) -> np.ndarray:
    """Stable decision id of each (trigger event, rule): the same on every replay."""
    salts = {r: rule_salt(r) for r in set(rule_ids.tolist())}
    salt = np.array([salts[r] for r in rule_ids.tolist()], dtype=np.uint64)
    return mix64(np.asarray(event_ids, dtype=np.uint64) ^ salt)


@dataclass
class Arbitration:
    """Per decision: chosen offer index (-1 = NO_ACTION), its probability, explored flag."""

    chosen: np.ndarray
    probability: np.ndarray
    explored: np.ndarray
    greedy: np.ndarray


def arbitrate(
    expected: np.ndarray, available: np.ndarray, ids: np.ndarray, exploration: float, seed: int
) -> Arbitration:
    """Choose per row of the (decisions x offers) expected-value matrix; see the module doc."""
    t = expected.shape[0]
    ev = np.where(available, expected, -np.inf)
    best = np.argmax(ev, axis=1) if ev.shape[1] else np.zeros(t, dtype=np.int64)
    best_ev = ev[np.arange(t), best] if ev.shape[1] else np.full(t, -np.inf)
    greedy = np.where(best_ev > 0, best, -1)
    n_avail = available.sum(axis=1)
    actions = n_avail + 1
    explored = (stable_uniform(ids, EXPLORE_SALT + seed) < exploration) & (n_avail > 0)
    k = np.minimum((stable_uniform(ids, PICK_SALT + seed) * actions).astype(np.int64), n_avail)
    # the k-th action among (NO_ACTION, available offers in catalog order)
    rank = np.cumsum(available, axis=1)
    picked = np.where(k == 0, -1, np.argmax(available & (rank == k[:, None]), axis=1))
    chosen = np.where(explored, picked, greedy)
    probability = (1.0 - exploration) * (chosen == greedy) + exploration / actions
    return Arbitration(chosen.astype(np.int64), probability, explored, greedy)


class Decider:
    """Decisions for one shard's store under one catalog and one scorer."""

    def __init__(
        self,
        catalog: Catalog,
        scorer: OfferScorer,
        store: CustomerStore,
        spec: FeatureSpec | None = None,
        outbound: bool = True,
    ) -> None:
        self.catalog = catalog
        self.scorer = scorer
        self.store = store
        self.spec = spec or feature_spec(catalog.trigger_ids, catalog.offer_ids)
        self.outbound = outbound
        self._contact_keys = contact_keys(catalog.policy)
        self._offer_keys = [f"offer:{o.id}" for o in catalog.offers]
        store.ensure_decision_state(self._contact_keys + self._offer_keys)
        self.unavailable = 0  # micro-batches decided without the model (NO_ACTION)
        self.last_unavailable: str | None = None

    def warm_up(self) -> None:
        """Score one all-missing row of this catalog's features: the model's first real answer
        (feature alignment, booster caches) is paid here rather than by a customer."""
        width = len(self.spec.names)
        row = np.full((1, width), np.nan, dtype=np.float32)
        self.scorer.score(ScoreRequest(row, self.spec.names, np.zeros(1, dtype=np.uint64)))

    # -- the parts of state decisions read and write ------------------------------------------
    def _contacts(self, slots: np.ndarray) -> np.ndarray:
        state = self.store.decision_state
        if not self._contact_keys:
            return np.zeros((slots.size, 0), dtype=np.int64)
        return np.stack([state[k][slots] for k in self._contact_keys], axis=1)

    def _last_offered(self, slots: np.ndarray) -> np.ndarray:
        state = self.store.decision_state
        if not self._offer_keys:
            return np.zeros((slots.size, 0), dtype=np.int64)
        return np.stack([state[k][slots] for k in self._offer_keys], axis=1)

    def _deliver(self, slots: np.ndarray, ts: np.ndarray, offer: np.ndarray) -> None:
        """Record deliveries (one per customer: callers pass one round at a time)."""
        if slots.size == 0:
            return
        state = self.store.decision_state
        ring = push_contact(self._contacts(slots), ts)
        for i, key in enumerate(self._contact_keys):
            state[key][slots] = ring[:, i]
        for j, key in enumerate(self._offer_keys):
            mine = offer == j
            state[key][slots[mine]] = ts[mine]

    def _dynamic_reasons(
        self, slots: np.ndarray, ts: np.ndarray, answered: np.ndarray
    ) -> np.ndarray:
        """COOLDOWN / FREQUENCY_CAP per pair against the current contact state."""
        reasons = np.zeros(answered.shape, dtype=np.int8)
        cooldowns = np.array([o.cooldown_ms for o in self.catalog.offers], dtype=np.int64)
        last = self._last_offered(slots)
        cooling = (last > NEVER) & (ts[:, None] - last < cooldowns[None, :]) & (last <= ts[:, None])
        reasons[cooling] = Reason.COOLDOWN
        cap = capped(self._contacts(slots), ts, self.catalog.policy)
        reasons[(reasons == 0) & cap[:, None]] = Reason.FREQUENCY_CAP
        reasons[~answered] = 0
        return reasons

    # -- one micro-batch -------------------------------------------------------------------------
    def decide(self, view: BatchView, fired: list[tuple[str, np.ndarray]]) -> pa.Table:
        """Decisions for the triggers ``fired`` (rule id, view rows); call before write_back."""
        parts = [(rule, rows) for rule, rows in fired if rows.size and self.catalog.answering(rule)]
        if not parts or not self.catalog.offers:
            return empty_decisions()
        rows = np.concatenate([r for _, r in parts])
        rule_ids = np.concatenate([np.full(r.size, rule, dtype=object) for rule, r in parts])
        rule_pos = np.concatenate([np.full(r.size, i) for i, (_, r) in enumerate(parts)])
        order = np.lexsort((rule_pos, rows))  # customer, then time, then rule order
        return self._decide(view, rows[order], rule_ids[order], inbound=None)

    def decide_inbound(self, view: BatchView, channels: np.ndarray) -> pa.Table:
        """Inbound decisions: row i of ``view`` is a customer asking now on ``channels[i]``
        (an index into CHANNELS); the log's rows are in view order.

        The candidates are the offers that answer the ``inbound`` trigger and can be shown on
        that channel; the policy is the outbound one (eligibility, consent for the channel,
        cooldowns, caps, control group) except quiet hours: the customer is here. A customer
        asking several times in one call is decided in time order, in rounds, as triggers are.
        """
        rows = np.arange(view.size)
        rule_ids = np.full(rows.size, INBOUND, dtype=object)
        return self._decide(view, rows, rule_ids, inbound=np.asarray(channels, dtype=np.int8))

    def _decide(
        self,
        view: BatchView,
        rows: np.ndarray,
        rule_ids: np.ndarray,
        inbound: np.ndarray | None,
    ) -> pa.Table:
        offers = self.catalog.offers
        t = rows.size
        slots = view.slot[rows]
        ts = view.ts[rows].astype(np.int64)
        keys = view.gather("customer_key")[rows]
        ids = decision_ids(view.gather("event_id")[rows], rule_ids)
        policy = self.catalog.policy

        answered = np.zeros((t, len(offers)), dtype=bool)
        for j, offer in enumerate(offers):
            answered[:, j] = np.isin(rule_ids, offer.spec.answers)
            if inbound is not None:  # only offers that can be shown where the customer is
                shown = [CHANNELS.index(c) for c in offer.spec.channels]
                answered[:, j] &= np.isin(inbound, shown)
        reasons = np.zeros(answered.shape, dtype=np.int8)
        ctx_rows = RowsView(view, rows)
        for j, offer in enumerate(offers):
            if offer.eligible is None:
                continue
            mine = np.flatnonzero(answered[:, j])
            ok = np.asarray(offer.eligible.evaluate(RowsView(view, rows[mine])), dtype=bool)
            reasons[mine[~ok], j] = Reason.NOT_ELIGIBLE
        granted, withdrawn = (m[rows] for m in view.consent())
        # an inbound customer is reachable on the channel they came in on; consent still rules
        reachable = view.profile("channels")[rows]
        if inbound is not None:
            reachable = np.full(rows.size, ALL_CHANNELS, dtype=reachable.dtype)
        allowed = allowed_channels(reachable, granted, withdrawn, policy)
        if inbound is None:
            via = np.stack([first_channel(allowed, o.spec.channels) for o in offers], axis=1)
        else:  # the channel asked on, if consent allows it
            usable = (allowed >> inbound.astype(np.uint8)) & 1 == 1
            via = np.repeat(np.where(usable, inbound, -1)[:, None], len(offers), axis=1)
        opted_out = (withdrawn & ALL_CHANNELS) == ALL_CHANNELS
        local = ctx_rows.column("@local_ms").astype(np.int64)
        after = deliver_after(ts, local, policy) if self.outbound and inbound is None else ts
        for mask, reason in (
            (opted_out[:, None], Reason.OPTED_OUT),
            (via < 0, Reason.NO_CONSENT),
        ):
            reasons[(reasons == 0) & answered & mask] = reason
        contacts = self._contacts(slots)
        dynamic = self._dynamic_reasons(slots, ts, answered)
        reasons = np.where(reasons == 0, dynamic, reasons)

        context = self._context(view, rows, ts, contacts)
        try:
            score, versions = self._score(context, rule_ids, keys, answered & (reasons == 0))
        except ScorerUnavailableError as exc:
            self.unavailable += 1
            self.last_unavailable = str(exc)
            reasons[(reasons == 0) & answered] = Reason.MODEL_UNAVAILABLE
            score = np.full(answered.shape, np.nan)
            versions = np.full(t, None, dtype=object)
        control = in_control_group(keys, policy)

        # rounds: each customer's k-th trigger of the batch in round k
        first = np.ones(t, dtype=bool)
        first[1:] = slots[1:] != slots[:-1]
        rank = np.arange(t) - np.maximum.accumulate(np.where(first, np.arange(t), 0))
        values = np.array([o.spec.value for o in offers])
        costs = np.array([o.spec.cost for o in offers])
        chosen = np.full(t, -1, dtype=np.int64)
        probability = np.ones(t)
        explored = np.zeros(t, dtype=bool)
        greedy = np.full(t, -1, dtype=np.int64)
        for r in range(int(rank.max()) + 1):
            sel = np.flatnonzero(rank == r)
            if r > 0:  # earlier rounds may have delivered: re-check caps and cooldowns
                again = self._dynamic_reasons(slots[sel], ts[sel], answered[sel])
                reasons[sel] = np.where(reasons[sel] == 0, again, reasons[sel])
            available = answered[sel] & (reasons[sel] == 0)
            expected = score[sel] * values - costs
            arb = arbitrate(expected, available, ids[sel], policy.exploration, policy.seed)
            chosen[sel], probability[sel] = arb.chosen, arb.probability
            explored[sel], greedy[sel] = arb.explored, arb.greedy
            # control customers count as contacted too, so their logged would-be decisions
            # follow the same caps and cooldowns as everyone else's
            contacted = sel[arb.chosen >= 0]
            self._deliver(slots[contacted], ts[contacted], chosen[contacted])

        expected_all = score * values - costs
        return self._log(
            ids, keys, ts, rule_ids, view.gather("event_id")[rows], answered, reasons, score,
            expected_all, via, chosen, probability, explored, control, versions, context,
            after,
        )  # fmt: skip

    def _context(
        self, view: BatchView, rows: np.ndarray, ts: np.ndarray, contacts: np.ndarray
    ) -> dict[str, np.ndarray]:
        def col(name: str) -> np.ndarray:
            return np.asarray(view.column(name)[rows], dtype=np.float64)

        cap = col("plan_data_cap_mb")
        lat, lon = (a[rows] for a in view.last_location())
        newest = contacts[:, 0] if contacts.shape[1] else np.full(rows.size, NEVER)
        since = np.where(newest > NEVER, (ts - newest) / DAY_MS, 365.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            pct = np.where(cap > 0, 100.0 * col("cycle_usage_mb") / cap, np.nan)
        ctx = {
            "plan_data_cap_mb": cap,
            "pct_of_cap": pct,
            "days_left": col("@days_left"),
            "overage_cycles": col("overage_cycles"),
            "tenure_months": col("tenure_months"),
            "km_from_home": haversine_km(lat, lon, col("home_lat"), col("home_lon")),
            "local_hour": col("@local_hour"),
            "contacts_7d": contacts_within(contacts, ts, 7 * DAY_MS).astype(np.float64),
            "days_since_contact": np.clip(since, 0.0, 365.0),
            "offers_accepted": col("offers_accepted"),
            "offers_declined": col("offers_declined"),
            "purchase_count": col("purchase_count"),
            "cart_items": col("cart_items"),
        }
        return {k: ctx[k].astype(np.float32) for k in CONTEXT_FIELDS}

    def _score(
        self,
        context: dict[str, np.ndarray],
        rule_ids: np.ndarray,
        keys: np.ndarray,
        candidate: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(propensity matrix, model version per decision); NaN where not scored."""
        score = np.full(candidate.shape, np.nan)
        versions = np.full(candidate.shape[0], None, dtype=object)
        ti, oj = np.nonzero(candidate)
        if ti.size == 0:
            return score, versions
        offer_ids = np.array(self.catalog.offer_ids, dtype=object)
        features = build_features(
            {k: v[ti] for k, v in context.items()}, rule_ids[ti], offer_ids[oj], self.spec
        )
        request = ScoreRequest(features, self.spec.names, keys[ti])
        response = self.scorer.score(request)
        check_response(request, response)
        score[ti, oj] = response.propensity
        versions[ti] = response.version_of_rows()
        return score, versions

    def _log(
        self,
        ids: np.ndarray,
        keys: np.ndarray,
        ts: np.ndarray,
        rule_ids: np.ndarray,
        event_ids: np.ndarray,
        answered: np.ndarray,
        reasons: np.ndarray,
        score: np.ndarray,
        expected: np.ndarray,
        channel: np.ndarray,
        chosen: np.ndarray,
        probability: np.ndarray,
        explored: np.ndarray,
        control: np.ndarray,
        versions: np.ndarray,
        context: dict[str, np.ndarray],
        after: np.ndarray,
    ) -> pa.Table:
        t = ids.size
        offers = self.catalog.offers
        has = chosen >= 0
        pick = np.maximum(chosen, 0)
        names = np.array([*self.catalog.offer_ids, NO_ACTION], dtype=object)
        action = names[np.where(has, chosen, len(offers))]
        channel_names = np.array([*CHANNELS, None], dtype=object)
        chosen_channel = np.where(has, channel[np.arange(t), pick], -1)
        values = np.array([o.spec.value for o in offers])
        costs = np.array([o.spec.cost for o in offers])
        any_candidate = (answered & (reasons == 0)).any(axis=1)
        reason = np.where(
            has,
            "offer",
            np.where(
                ~any_candidate,
                "no_candidate",
                np.where(explored, "explored", "no_positive_value"),
            ),
        ).astype(object)
        unavailable = (reasons == Reason.MODEL_UNAVAILABLE).any(axis=1) & ~has
        reason[unavailable] = "model_unavailable"
        reason[control] = "control_group"
        columns: dict[str, pa.Array] = {
            "decision_id": pa.array(ids, type=pa.uint64()),
            "customer_key": pa.array(keys, type=pa.uint64()),
            "ts": pa.array(ts, type=pa.int64()).cast(DECISION_SCHEMA.field("ts").type),
            "rule_id": pa.array(rule_ids, type=pa.string()),
            "event_id": pa.array(event_ids, type=pa.uint64()),
            "action": pa.array(action, type=pa.string()),
            "channel": pa.array(channel_names[chosen_channel], type=pa.string()),
            "value": pa.array(np.where(has, values[pick], 0.0)),
            "cost": pa.array(np.where(has, costs[pick], 0.0)),
            "score": pa.array(
                score[np.arange(t), pick].astype(np.float32), mask=~has, type=pa.float32()
            ),
            "probability": pa.array(probability),
            "explored": pa.array(explored),
            "control": pa.array(control),
            "delivered": pa.array(has & ~control),
            "deliver_after": pa.array(after, type=pa.int64()).cast(
                DECISION_SCHEMA.field("deliver_after").type
            ),
            "reason": pa.array(reason, type=pa.string()),
            "model_version": pa.array(versions, type=pa.string()),
            "candidates": candidates_array(
                self.catalog.offer_ids, answered, score, expected, REASON_LABELS[reasons]
            ),
        }
        for name in CONTEXT_FIELDS:
            columns[CONTEXT_PREFIX + name] = pa.array(context[name], type=pa.float32())
        return pa.Table.from_pydict(columns, schema=DECISION_SCHEMA)


def replay_choices(decisions: pa.Table, exploration: float, seed: int) -> np.ndarray:
    """Recompute every logged choice from the log alone: its candidates, expected values and
    decision id. Equal to the logged ``action`` column when the log is faithful."""
    n = decisions.num_rows
    candidates = decisions.column("candidates").combine_chunks()
    counts = np.diff(candidates.offsets.to_numpy())
    width = int(counts.max()) if n else 0
    flat = candidates.flatten()
    offer = np.asarray(flat.field("offer_id").to_numpy(zero_copy_only=False), dtype=object)
    excluded = flat.field("excluded").is_null().to_numpy(zero_copy_only=False)
    expected = flat.field("expected_value").fill_null(np.nan).to_numpy(zero_copy_only=False)
    row = np.repeat(np.arange(n), counts)
    col = np.arange(row.size) - np.repeat(candidates.offsets.to_numpy()[:-1], counts)
    available = np.zeros((n, width), dtype=bool)
    ev = np.zeros((n, width))
    names = np.full((n, width), NO_ACTION, dtype=object)
    available[row, col] = excluded
    ev[row, col] = expected
    names[row, col] = offer
    ids = decisions.column("decision_id").to_numpy()
    arb = arbitrate(ev, available, ids, exploration, seed)
    return np.where(
        arb.chosen >= 0, names[np.arange(n), np.maximum(arb.chosen, 0)], NO_ACTION
    ).astype(object)
