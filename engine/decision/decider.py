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

A scoring request costs milliseconds however few its rows (a hop to the ranker), so a step of
several rounds does not ask once per round: before its first round it asks once for every
candidate pair of every round, with the context as of the step's start (``_Ahead``). A later
round takes those answers for the decisions whose context is still exactly that (no contact in
an earlier round changed it: the model answers each row alone, so the answer is the one the
round would get) and asks again only for the others, in one request. The decisions are those
of round-by-round scoring, to the bit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

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
    ScoreResponse,
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


class _Scores(Protocol):
    """(decisions x offers) answers of the scorer and each decision's model version: a
    ``DecisionBatch``, or a step's scores asked for ahead (``_Ahead``)."""

    propensity: np.ndarray
    baseline: np.ndarray
    opt_out: np.ndarray
    versions: np.ndarray


def _fill(target: _Scores, ti: np.ndarray, oj: np.ndarray, response: ScoreResponse) -> None:
    """Put ``response``'s answers for the pairs (ti, oj) into ``target``."""
    target.propensity[ti, oj] = response.propensity
    if response.baseline is not None:
        target.baseline[ti, oj] = response.baseline
    if response.opt_out is not None:
        target.opt_out[ti, oj] = response.opt_out
    target.versions[ti] = response.version_of_rows()


class _Ahead:
    """A step's scores asked for before its first round: every candidate pair of every round,
    with ``context`` as of the step's start (see the module doc)."""

    def __init__(self, context: dict[str, np.ndarray], shape: tuple[int, int]) -> None:
        self.context = context
        self.propensity = np.full(shape, np.nan)
        self.baseline = np.full(shape, np.nan)
        self.opt_out = np.full(shape, np.nan)
        self.versions = np.full(shape[0], None, dtype=object)
        self.failed = False  # the scorer did not answer: every round is without a model

    def reuse(self, batch: DecisionBatch, sel: np.ndarray) -> np.ndarray:
        """Give the decisions ``sel`` whose context in ``batch`` is still this one their
        answers (for the pairs still candidates); returns the others, to be asked again."""
        same = np.ones(sel.size, dtype=bool)
        for name, early in self.context.items():
            now, then = batch.context[name][sel], early[sel]
            same &= (now == then) | (np.isnan(now) & np.isnan(then))
        kept = sel[same]
        ti, oj = np.nonzero(batch.candidates[kept])
        ti = kept[ti]
        for name in ("propensity", "baseline", "opt_out"):
            getattr(batch, name)[ti, oj] = getattr(self, name)[ti, oj]
        batch.versions[ti] = self.versions[ti]
        return sel[~same]


class Decider:
    """Decisions for one shard's store under one catalog and one scorer."""

    #: ask once per step for the scores of all its rounds (off: once per round, the reference
    #: the tests compare it with)
    score_ahead = True

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
        self.unavailable = 0  # scoring requests (a step's ahead, or a round's) not answered
        self.last_unavailable: str | None = None
        #: scoring requests answered, their rows, and the time spent waiting for them (ms):
        #: how much of a decision step is the model's (a benchmark reads them in shard stats)
        self.scoring = {"score_requests": 0, "scored_rows": 0, "score_ms": 0.0}

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
        rounds = int(rank.max()) + 1 if rank.size else 0
        ahead = self._score_ahead(view, batch) if rounds > 1 and self.score_ahead else None
        for r in range(rounds):
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
            if ahead is None:
                self._score(batch, sel)
            elif ahead.failed:
                batch.exclude(Reason.MODEL_UNAVAILABLE, np.ones((1, 1), dtype=bool), where=sel)
            else:
                self._score(batch, ahead.reuse(batch, sel))
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
        response = self._request(batch, ti, oj, batch.context)
        if response is None:
            batch.exclude(Reason.MODEL_UNAVAILABLE, np.ones((1, 1), dtype=bool), where=sel)
            return
        _fill(batch, ti, oj, response)

    def _score_ahead(self, view: BatchView, batch: DecisionBatch) -> _Ahead:
        """One request for the candidate pairs of every round of a step, with the context as
        of its start (see the module doc)."""
        context = context_features(view, batch.rows, batch.ts, self._contacts(batch.slots))
        ahead = _Ahead(context, batch.answered.shape)
        ti, oj = np.nonzero(batch.candidates)
        if ti.size:
            response = self._request(batch, ti, oj, context)
            if response is None:
                ahead.failed = True
            else:
                _fill(ahead, ti, oj, response)
        return ahead

    def _request(
        self,
        batch: DecisionBatch,
        ti: np.ndarray,
        oj: np.ndarray,
        context: dict[str, np.ndarray],
    ) -> ScoreResponse | None:
        """The scorer's answer for the pairs (decision ``ti``, offer ``oj``) with the context
        ``context`` (per decision of the batch); None, counted, when it did not answer."""
        offer_ids = np.array(self.catalog.offer_ids, dtype=object)
        features = build_features(
            {k: v[ti] for k, v in context.items()},
            batch.rule_ids[ti],
            offer_ids[oj],
            self.spec,
        )
        request = ScoreRequest(features, self.spec.names, batch.keys[ti])
        started = time.perf_counter()
        try:
            response = self.scorer.score(request)
        except ScorerUnavailableError as exc:
            self.unavailable += 1
            self.last_unavailable = str(exc)
            return None
        check_response(request, response)
        self.scoring["score_requests"] += 1
        self.scoring["scored_rows"] += request.rows
        self.scoring["score_ms"] += (time.perf_counter() - started) * 1000
        return response

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
