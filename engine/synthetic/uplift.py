"""The uplift world: customers who buy anyway, who buy only when asked, who never buy, and who
react badly to being asked.

The classic world (``engine.synthetic.response``) answers an offer with one probability, and
lets a fixed fifth of it convert on its own: there, the customers most likely to say yes are
also the ones an offer moves most, so a response model and an uplift model rank alike. Real
customers differ in kind (Radcliffe & Surry's four response types), per offer:

* **sure things** convert with or without the offer (a discount on them is margin given away);
* **persuadables** convert mostly because of the offer;
* **lost causes** hardly convert either way;
* **sleeping dogs** would convert on their own, but a contact puts them off (they buy less
  and opt out more).

A seed draws each offer's mix of types (a Dirichlet around ``TYPE_MIX``) and how loosely the
type follows what the engine can see (``TIE``: the correlation of a latent score with one
observable per offer, e.g. data use for the data pass; the order along the score is sure
things, then persuadables, then lost causes; sleeping dogs are drawn apart, unobservable).

Per decision, the context response of the classic world (``base_propensity``: cycle day,
distance from home, cart size, stock, affinity) scales both arms of the customer's type:
``p_offer`` (convert when the offer is delivered, contact fatigue included) and ``p_base``
(convert without it). One uniform draw per (customer, offer, day) decides both arms
(monotone coupling), so the counterfactual of every decision is known: what the same customer
would have done that day without the offer. Conversions without the offer are emitted as the
ordinary events the catalog names (``CONVERSION``: a purchase of the item, or a checkout), at
the offer's list value (``LIST_VALUE``); accepted offers as ``offer_response`` events, as in
the classic world; opt-outs as consent withdrawals, each costing the customer's value
(``customer_value``).

The engine never reads any of this; it sees only the events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine.decision.catalog import NO_ACTION
from engine.decision.log import decision_id_text
from engine.decision.policy import stable_uniform
from engine.decision.scorer import ScoreRequest, ScoreResponse
from engine.synthetic.response import (
    DECLINE_SALT,
    DELAY_SALT,
    FATIGUE,
    OPTOUT_SALT,
    RECALLED,
    ResponseSimulator,
    _events,
    _offer_salt,
    truth_arguments,
)
from engine.units import DAY_MS, HOUR_MS, MINUTE_MS

SURE, PERSUADABLE, LOST, DOG = range(4)
TYPE_NAMES = ("sure_thing", "persuadable", "lost_cause", "sleeping_dog")
#: Dirichlet concentration of an offer's type mix (means: 29 %, 18 %, 43 %, 11 %)
TYPE_MIX = np.array([4.0, 2.5, 6.0, 1.5])
#: range of the correlation between an offer's observable signal and the latent type score
TIE = (0.2, 0.5)
#: what a conversion earns when bought without the offer (its price's margin)
LIST_VALUE = {
    "data_pass_1gb": 8.0,
    "plan_upgrade": 12.0,
    "roaming_pass": 12.0,
    "device_swap": 30.0,
    "cart_incentive": 10.5,
}
#: the ordinary event that shows a conversion: (kind, item)
CONVERSION = {
    "data_pass_1gb": ("purchase", "data_pass_1gb"),
    "plan_upgrade": ("purchase", "plan_upgrade"),
    "roaming_pass": ("purchase", "roaming_pass"),
    "device_swap": ("purchase", "device_swap"),
    "cart_incentive": ("checkout", None),
}
#: sleeping dogs opt out this many times as often when contacted
DOG_OPT_OUT = 4.0
CONVERT_SALT = 21


def _standard(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


@dataclass
class UpliftSimulator(ResponseSimulator):
    """Ground truth with response types; ``propensity`` is P(convert | offer delivered)."""

    types: dict[str, np.ndarray] = field(init=False)
    mix: dict[str, np.ndarray] = field(init=False)
    tie: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        rng = np.random.default_rng(self.seed + 202)
        pop, n = self.pop, self.pop.size
        signals = {
            "data_pass_1gb": pop.use_ratio,
            "plan_upgrade": pop.use_ratio * (1.0 - self.price_sensitivity),
            "roaming_pass": pop.traveller.astype(np.float64) + 0.3 * np.log(pop.activity),
            "device_swap": np.isin(pop.device, RECALLED).astype(np.float64),
            "cart_incentive": np.log(pop.activity),
        }
        self.types, self.mix, self.tie = {}, {}, {}
        for offer, signal in signals.items():
            mix = rng.dirichlet(TYPE_MIX)
            rho = float(rng.uniform(*TIE))
            score = rho * _standard(signal) + np.sqrt(1 - rho**2) * rng.standard_normal(n)
            kind = np.full(n, LOST, dtype=np.int8)
            dog = rng.random(n) < mix[DOG]
            rest = np.flatnonzero(~dog)
            order = rest[np.argsort(-score[rest], kind="stable")]
            share = mix[:DOG] / mix[:DOG].sum()
            n_sure = round(share[SURE] * order.size)
            n_pers = round(share[PERSUADABLE] * order.size)
            kind[order[:n_sure]] = SURE
            kind[order[n_sure : n_sure + n_pers]] = PERSUADABLE
            kind[dog] = DOG
            self.types[offer], self.mix[offer], self.tie[offer] = kind, mix, rho
        self._converted: set[tuple[int, str, int]] = set()

    # -- the truth ---------------------------------------------------------------------------
    def type_of(self, idx: np.ndarray, offers: np.ndarray) -> np.ndarray:
        """Each (customer, offer) row's response type (LOST for an offer not in the world)."""
        out = np.full(idx.size, LOST, dtype=np.int8)
        for offer in set(offers.tolist()):
            if offer in self.types:
                rows = offers == offer
                out[rows] = self.types[offer][idx[rows]]
        return out

    def arms(
        self,
        idx: np.ndarray,
        offers: np.ndarray,
        days_left: np.ndarray,
        km_from_home: np.ndarray,
        cart_items: np.ndarray,
        recent_contacts: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(P(convert | offer delivered), P(convert | no offer), P(opt-out | contact))."""
        c = self.base_propensity(idx, offers, days_left, km_from_home, cart_items)
        kind = self.type_of(idx, offers)
        fatigue = FATIGUE ** np.asarray(recent_contacts, dtype=np.float64)
        p_base = np.select(
            [kind == SURE, kind == PERSUADABLE, kind == LOST],
            [np.minimum(0.9, 2.5 * c), 0.1 * c, 0.05 * c],
            np.minimum(0.8, 1.5 * c),
        )
        p_offer = np.select(
            [kind == SURE, kind == PERSUADABLE, kind == LOST],
            [np.minimum(0.95, 2.6 * c), np.minimum(0.9, 2.0 * c), 0.15 * c],
            0.3 * np.minimum(0.8, 1.5 * c),
        )
        p_offer = p_offer * fatigue
        recent = np.asarray(recent_contacts, dtype=np.float64)
        p_out = (0.002 + 0.012 * recent + 0.01 * (p_offer < 0.05)) * np.where(
            kind == DOG, DOG_OPT_OUT, 1.0
        )
        return p_offer, p_base, p_out

    def propensity(
        self,
        idx: np.ndarray,
        offers: np.ndarray,
        days_left: np.ndarray,
        km_from_home: np.ndarray,
        cart_items: np.ndarray,
        recent_contacts: np.ndarray,
    ) -> np.ndarray:
        """P(convert | offer delivered), contact fatigue included (what a response model
        estimates; the ``oracle`` policy ranks by it)."""
        return self.arms(idx, offers, days_left, km_from_home, cart_items, recent_contacts)[0]

    # -- answering ---------------------------------------------------------------------------
    def respond(self, decisions: pa.Table) -> tuple[pa.Table, dict[str, np.ndarray]]:
        """The events answering ``decisions``: accepted and declined offers, opt-outs, and
        conversions without an offer for every answering offer of every decision (deduplicated
        per customer, offer and day); and per would-be offer (rows whose action is an offer)
        the outcome arrays of the classic world plus ``converted`` (with the offer when it was
        delivered) and ``incremental`` (true value against the same customer without it)."""
        n = decisions.num_rows
        if n == 0:
            return _events([]), _no_outcome()
        keys = decisions.column("customer_key").to_numpy()
        idx = self.index_of(keys)
        action = np.asarray(decisions.column("action").to_numpy(zero_copy_only=False), object)
        delivered = np.asarray(decisions.column("delivered").to_numpy(zero_copy_only=False), bool)
        at = decisions.column("deliver_after").cast(pa.int64()).to_numpy()
        value = decisions.column("value").to_numpy(zero_copy_only=False)
        cost = decisions.column("cost").to_numpy(zero_copy_only=False)
        ids = decision_id_text(decisions.column("decision_id").to_numpy())

        def ctx(name: str) -> np.ndarray:
            column = decisions.column("ctx_" + name).to_numpy(zero_copy_only=False)
            return np.asarray(column, dtype=np.float64)

        days_left, km, cart = ctx("days_left"), ctx("km_from_home"), ctx("cart_items")
        recent = self.recent_contacts(idx, at)
        # every answering offer of every decision: its two arms
        candidates = decisions.column("candidates").combine_chunks()
        counts = np.diff(candidates.offsets.to_numpy())
        row = np.repeat(np.arange(n), counts)
        offer = np.asarray(
            candidates.flatten().field("offer_id").to_numpy(zero_copy_only=False), dtype=object
        )
        p_offer, p_base, p_out = self.arms(
            idx[row], offer, days_left[row], km[row], cart[row], recent[row]
        )
        kind = self.type_of(idx[row], offer)
        day = (at[row] // DAY_MS).astype(np.uint64)
        salt = np.array([_offer_salt(o) for o in offer.tolist()], dtype=np.uint64)
        stream = keys[row] ^ salt ^ (day * np.uint64(0x100000001B3))
        u = stable_uniform(stream, CONVERT_SALT + self.seed)
        chosen = offer == action[row]
        sent = chosen & delivered[row]
        accepted = sent & (u < p_offer)
        anyway = u < p_base  # the counterfactual: converts without the offer
        # delivered and not taken: bought at list price anyway, unless contact put them off
        bought = np.where(sent, ~accepted & anyway & (kind != DOG), anyway)
        declined = sent & ~accepted & (stable_uniform(stream, DECLINE_SALT + self.seed) < 0.3)
        opted_out = sent & (stable_uniform(stream, OPTOUT_SALT + self.seed) < p_out)
        delay = (
            5 * MINUTE_MS + stable_uniform(stream, DELAY_SALT + self.seed) * 12 * HOUR_MS
        ).astype(np.int64)
        listed = np.array([LIST_VALUE.get(o, 0.0) for o in offer.tolist()])
        cv = self.customer_value[idx[row]]
        earned = np.where(accepted, value[row], 0.0) + np.where(bought & sent, listed, 0.0)
        incremental = np.where(sent, earned - anyway * listed - cost[row] - opted_out * cv, 0.0)
        for c, a, s in zip(idx.tolist(), at.tolist(), delivered.tolist(), strict=True):
            if s:
                self._contacts[c].append(a)
        events = self._answer_events(
            idx[row], offer, at[row], delay, row, ids, accepted, declined, bought, opted_out
        )
        # per would-be offer (the rows the classic outcome has), from its chosen pair
        would = np.flatnonzero(action != NO_ACTION)
        pair = np.full(n, -1, dtype=np.int64)
        pair[row[chosen]] = np.flatnonzero(chosen)
        k = pair[would]
        if (k < 0).any():
            raise ValueError("a decision's action is not among its candidates")
        outcome = {
            "row": would,
            "accepted": accepted[k],
            "opted_out": opted_out[k],
            "organic": anyway[k],
            "converted": accepted[k] | (sent[k] & bought[k]),
            "incremental": incremental[k],
            "type": kind[k],
        }
        return events, outcome

    def _answer_events(
        self,
        idx: np.ndarray,
        offer: np.ndarray,
        at: np.ndarray,
        delay: np.ndarray,
        row: np.ndarray,
        ids: list[str],
        accepted: np.ndarray,
        declined: np.ndarray,
        bought: np.ndarray,
        opted_out: np.ndarray,
    ) -> pa.Table:
        """Responses at ``at + delay``, conversions without the offer (once per customer,
        offer and day) likewise, opt-outs a minute after the contact."""
        ts, day = at + delay, at // DAY_MS
        events: list[dict[str, object]] = []
        for i in np.flatnonzero(accepted | declined).tolist():
            events.append(
                self._event(
                    int(idx[i]),
                    int(ts[i]),
                    kind="offer_response",
                    decision_id=ids[row[i]],
                    offer_id=offer[i],
                    response="accepted" if accepted[i] else "declined",
                )
            )
        # an accepted offer is a conversion too: its event follows the response (a checkout
        # empties the cart, whoever paid for the shipping)
        for i in np.flatnonzero(bought | accepted).tolist():
            once = (int(idx[i]), str(offer[i]), int(day[i]))
            if once in self._converted or offer[i] not in CONVERSION:
                continue  # one conversion per customer, offer and day
            self._converted.add(once)
            kind, item = CONVERSION[offer[i]]
            fields: dict[str, object] = {"amount": LIST_VALUE[offer[i]]}
            if item is not None:
                fields["item"] = item
            after = MINUTE_MS if accepted[i] else 0  # after the response
            events.append(self._event(int(idx[i]), int(ts[i]) + after, kind=kind, **fields))
        for i in np.flatnonzero(opted_out).tolist():
            events.append(self._event(int(idx[i]), int(at[i] + MINUTE_MS), kind="consent",
                                      channel="all", granted=False))  # fmt: skip
        return _events(events)

    def reset_contacts(self) -> None:
        super().reset_contacts()
        self._converted = set()


class UpliftOracleScorer:
    """An OfferScorer that knows the uplift world's truth: P(convert | offer), P(convert | no
    action) and P(opt-out | contact) of every candidate. The ``uplift`` yardstick policy: the
    best the engine's objective can do with perfect probabilities (the catalog's values and
    customer value stay the catalog's). Never used by Kairos."""

    def __init__(self, simulator: UpliftSimulator) -> None:
        self.sim = simulator

    def score(self, request: ScoreRequest) -> ScoreResponse:
        p_offer, p_base, p_out = self.sim.arms(*truth_arguments(self.sim, request))
        return ScoreResponse(
            np.clip(p_offer, 0, 1).astype(np.float32),
            ("uplift-oracle",),
            np.zeros(request.rows, np.int8),
            baseline=np.clip(p_base, 0, 1).astype(np.float32),
            opt_out=np.clip(p_out, 0, 1).astype(np.float32),
        )


def _no_outcome() -> dict[str, np.ndarray]:
    empty = np.zeros(0, dtype=bool)
    return {
        "row": np.zeros(0, dtype=np.int64),
        "accepted": empty,
        "opted_out": empty,
        "organic": empty,
        "converted": empty,
        "incremental": np.zeros(0),
        "type": np.zeros(0, dtype=np.int8),
    }
