"""The decider: turns a micro-batch's triggers into decisions, in the shard, vectorized.

For every trigger some offer answers, it considers each answering offer and NO_ACTION:

1. the batch (``DecisionBatch``): which offers answer each trigger, on which channel;
2. exclusions, in order, each a ``(reason, mask)`` step (``exclusions``): eligibility,
   opt-out, consent for a channel, cooldown, frequency cap; the first reason wins. An
   outbound offer decided in the customer's quiet hours is held until they end
   (``deliver_after``);
3. scoring: the context (``features.context_features``) and one ``OfferScorer`` request for
   the whole step, with the feature rows of every (trigger, offer) pair still a candidate;
4. arbitration (``engine.decision.arbitration``): the offer with the highest expected value
   (propensity x value - cost) when it is positive, else NO_ACTION, with some exploration;
   the draws come from stable hashes of the decision id, so the log reproduces every choice;
5. delivery: a chosen offer is delivered unless the customer is in the control group; either
   way it counts as a contact for caps and cooldowns, so the control group's logged
   would-be decisions follow the same policy.

A customer with several triggers in one micro-batch is decided in time order, in rounds (a
customer's k-th trigger in round k): the contact limits, the context and the scores of a round
are taken after the contacts of the rounds before it. So every decision sees exactly the
contact history a decision-by-decision loop would, and a decision does not depend on how the
stream was cut into micro-batches (a replay after a recovery cuts it elsewhere). The rest of the
context is as of the trigger event.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from engine.decision.arbitration import arbitrate, decision_ids
from engine.decision.batch import DecisionBatch, rounds_of
from engine.decision.catalog import Catalog
from engine.decision.features import FeatureSpec, build_features, context_features, feature_spec
from engine.decision.log import decision_table, empty_decisions
from engine.decision.policy import (
    Reason,
    allowed_channels,
    capped,
    contact_keys,
    deliver_after,
    first_channel,
    in_control_group,
    push_contact,
)
from engine.decision.scorer import (
    OfferScorer,
    ScoreRequest,
    ScorerUnavailableError,
    check_response,
)
from engine.events.schema import ALL_CHANNELS, CHANNELS
from engine.state.store import NEVER, CustomerStore
from engine.state.view import BatchView, RowsView

#: the trigger id of inbound requests (``POST /v1/decide``); offers answer it like a rule's
INBOUND = "inbound"

#: an exclusion step: a reason and the (decisions x offers, or decisions x 1) pairs it marks
Exclusion = tuple[Reason, np.ndarray]


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
        self._cooldowns = np.array([o.cooldown_ms for o in catalog.offers], dtype=np.int64)
        store.ensure_decision_state(self._contact_keys + self._offer_keys)
        self.unavailable = 0  # scoring requests (a round of a step) that got no answer
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

    def record_contacts(self, slots: np.ndarray, ts: np.ndarray, actions: Sequence[str]) -> None:
        """Record deliveries decided before (inbound decisions read back from the ingest log
        after a restore): each customer's in time order, as the decisions that made them did.
        An offer no longer in the catalog still counts toward the caps."""
        if slots.size == 0:
            return
        index = {offer_id: j for j, offer_id in enumerate(self.catalog.offer_ids)}
        offer = np.array([index.get(a, -1) for a in actions], dtype=np.int64)
        order = np.lexsort((ts, slots))
        slots, ts, offer = slots[order], np.asarray(ts, dtype=np.int64)[order], offer[order]
        rank = rounds_of(slots)
        for r in range(int(rank.max()) + 1):  # one delivery per customer per call of _deliver
            sel = rank == r
            self._deliver(slots[sel], ts[sel], offer[sel])

    # -- one step ------------------------------------------------------------------------------
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
        self, view: BatchView, rows: np.ndarray, rule_ids: np.ndarray, inbound: np.ndarray | None
    ) -> pa.Table:
        batch = self._batch(view, rows, rule_ids, inbound)
        for reason, mask in self.exclusions(view, batch, inbound):
            batch.exclude(reason, mask)
        rank = batch.rounds
        for r in range(int(rank.max()) + 1 if rank.size else 0):
            sel = np.flatnonzero(rank == r)
            for reason, mask in self._contact_limits(batch.slots[sel], batch.ts[sel]):
                batch.exclude(reason, mask, where=sel)
            context = context_features(
                view, rows[sel], batch.ts[sel], self._contacts(batch.slots[sel])
            )
            for name, values in context.items():
                batch.context.setdefault(name, np.zeros(batch.size, dtype=values.dtype))[sel] = (
                    values
                )
            self._score(batch, sel)
            self._choose(batch, sel)
        return decision_table(batch, self.catalog)

    def _batch(
        self, view: BatchView, rows: np.ndarray, rule_ids: np.ndarray, inbound: np.ndarray | None
    ) -> DecisionBatch:
        """Which offers answer each decision, and on which channel they would go out."""
        offers = self.catalog.offers
        policy = self.catalog.policy
        ts = view.ts[rows].astype(np.int64)
        keys = view.gather("customer_key")[rows]
        event_ids = view.gather("event_id")[rows]
        answered = np.zeros((rows.size, len(offers)), dtype=bool)
        for j, offer in enumerate(offers):
            answered[:, j] = np.isin(rule_ids, offer.spec.answers)
            if inbound is not None:  # only offers that can be shown where the customer is
                shown = [CHANNELS.index(c) for c in offer.spec.channels]
                answered[:, j] &= np.isin(inbound, shown)
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
        local = RowsView(view, rows).column("@local_ms").astype(np.int64)
        after = deliver_after(ts, local, policy) if self.outbound and inbound is None else ts
        return DecisionBatch(
            rows=rows,
            rule_ids=rule_ids,
            slots=view.slot[rows],
            ts=ts,
            keys=keys,
            event_ids=event_ids,
            ids=decision_ids(event_ids, rule_ids),
            answered=answered,
            via=via,
            after=after,
            control=in_control_group(keys, policy),
            customer_value=np.asarray(view.column("customer_value")[rows], dtype=np.float64),
        )

    def exclusions(
        self, view: BatchView, batch: DecisionBatch, inbound: np.ndarray | None
    ) -> list[Exclusion]:
        """Why an answering offer is not a candidate, as ordered ``(reason, mask)`` steps; the
        first that marks a pair is its reason. Consent by purpose and erasure go here. The
        contact limits (cooldown, frequency cap) come after these, round by round
        (``_contact_limits``)."""
        _, withdrawn = (m[batch.rows] for m in view.consent())
        opted_out = (withdrawn & ALL_CHANNELS) == ALL_CHANNELS
        return [
            (Reason.NOT_ELIGIBLE, self._ineligible(view, batch)),
            (Reason.OPTED_OUT, opted_out[:, None]),
            (Reason.NO_CONSENT, batch.via < 0),
        ]

    def _ineligible(self, view: BatchView, batch: DecisionBatch) -> np.ndarray:
        """(decisions x offers): the offer's ``eligible`` expression is false."""
        out = np.zeros(batch.answered.shape, dtype=bool)
        for j, offer in enumerate(self.catalog.offers):
            if offer.eligible is None:
                continue
            mine = np.flatnonzero(batch.answered[:, j])
            ok = np.asarray(offer.eligible.evaluate(RowsView(view, batch.rows[mine])), dtype=bool)
            out[mine[~ok], j] = True
        return out

    def _contact_limits(self, slots: np.ndarray, ts: np.ndarray) -> list[Exclusion]:
        """Cooldown per offer and frequency caps, against the current contact state."""
        last = self._last_offered(slots)
        since = ts[:, None] - last
        cooling = (last > NEVER) & (since < self._cooldowns[None, :]) & (last <= ts[:, None])
        cap = capped(self._contacts(slots), ts, self.catalog.policy)
        return [(Reason.COOLDOWN, cooling), (Reason.FREQUENCY_CAP, cap[:, None])]

    def _score(self, batch: DecisionBatch, sel: np.ndarray) -> None:
        """One scoring request for every candidate pair of the decisions ``sel`` (a round):
        ``batch.propensity`` (NaN where not scored) and ``batch.versions``. Without a model,
        the candidates are excluded."""
        ti, oj = np.nonzero(batch.candidates[sel])
        if ti.size == 0:
            return
        ti = sel[ti]
        offer_ids = np.array(self.catalog.offer_ids, dtype=object)
        features = build_features(
            {k: v[ti] for k, v in batch.context.items()},
            batch.rule_ids[ti],
            offer_ids[oj],
            self.spec,
        )
        request = ScoreRequest(features, self.spec.names, batch.keys[ti])
        try:
            response = self.scorer.score(request)
        except ScorerUnavailableError as exc:
            self.unavailable += 1
            self.last_unavailable = str(exc)
            batch.exclude(Reason.MODEL_UNAVAILABLE, np.ones((1, 1), dtype=bool), where=sel)
            return
        check_response(request, response)
        batch.propensity[ti, oj] = response.propensity
        if response.baseline is not None:
            batch.baseline[ti, oj] = response.baseline
        if response.opt_out is not None:
            batch.opt_out[ti, oj] = response.opt_out
        batch.versions[ti] = response.version_of_rows()

    def _choose(self, batch: DecisionBatch, sel: np.ndarray) -> None:
        """Arbitrate the decisions ``sel`` (one round: a customer at most once) and record
        their contacts before the next round."""
        policy = self.catalog.policy
        expected = self.catalog.expected_values(
            batch.propensity[sel], batch.baseline[sel], batch.opt_out[sel],
            batch.customer_value[sel],
        )  # fmt: skip
        batch.expected[sel] = expected
        available = batch.candidates[sel]
        arb = arbitrate(expected, available, batch.ids[sel], policy.exploration, policy.seed,
                        policy.no_action_share)  # fmt: skip
        batch.chosen[sel], batch.probability[sel] = arb.chosen, arb.probability
        batch.explored[sel], batch.held[sel] = arb.explored, arb.held
        # control customers count as contacted too, so their logged would-be decisions
        # follow the same caps and cooldowns as everyone else's
        contacted = sel[arb.chosen >= 0]
        self._deliver(batch.slots[contacted], batch.ts[contacted], batch.chosen[contacted])
