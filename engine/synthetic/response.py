"""The customer-response simulator: a hidden ground truth that answers delivered offers.

The engine never reads this module's truth; it only sees the events it emits
(``offer_response`` accepted or declined, and ``consent`` withdrawals). The truth encodes the
stories of DESIGN.md:

* heavy users (monthly use above their cap) take plan upgrades unless price-sensitive, and
  the price-sensitive ones take one-off passes; a light user near the end of the cycle
  ignores an upgrade and only sometimes takes a pass, early in the cycle more often;
* travellers away from home take roaming passes; others rarely do;
* owners of a recalled phone take the swap, much more often when a store within 20 km of
  home has the replacement in stock (the world's reference tables: stores and their stock);
* a browsing customer with a cart takes a cart incentive, more often with a fuller cart;

multiplied by a per-customer affinity (noise) and by contact fatigue (each offer in the
previous 7 days lowers the response), and opt-outs grow with contacts and with irrelevant
offers. Draws come from stable hashes of (customer, offer, day), so two policies that make
the same offer to the same customer on the same day see the same answer (common random
numbers: policy differences are not luck).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine.decision.log import decision_id_text
from engine.decision.policy import stable_uniform
from engine.decision.scorer import ScoreRequest, ScoreResponse
from engine.events.schema import RAW_SCHEMA, TS_TYPE
from engine.governance.pseudonym import Pseudonymizer
from engine.reference import ReferenceData
from engine.synthetic.telco import Population, reference_tables
from engine.units import DAY_MS, HOUR_MS, MINUTE_MS

RECALLED = ("Nimbus X2",)
#: a recall owner with the replacement in stock this close to home takes the swap more often
SWAP_STORE_KM = 20.0
FATIGUE = 0.6
ACCEPT_SALT, DECLINE_SALT, OPTOUT_SALT, DELAY_SALT, ORGANIC_SALT = 11, 12, 13, 14, 15
#: share of the (uncontacted) propensity that converts on its own: the control group's baseline
ORGANIC_SHARE = 0.2


def _offer_salt(offer: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(offer)) * 0x9E37


@dataclass
class ResponseSimulator:
    """Ground truth for one population; tracks the contacts it has received."""

    pop: Population
    pseudonym_key: str
    seed: int = 0
    price_sensitivity: np.ndarray = field(init=False)
    affinity: np.ndarray = field(init=False)
    #: the world's stores, stock and recall list (``telco.reference_tables``)
    reference: ReferenceData = field(default_factory=lambda: ReferenceData(reference_tables()))
    #: per customer: a store within ``SWAP_STORE_KM`` of home has the replacement in stock
    swap_store_near: np.ndarray = field(init=False)
    #: the value at stake when a customer opts out of contact (future offers' margin)
    customer_value: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed + 101)
        n = self.pop.size
        self.price_sensitivity = rng.random(n)
        self.affinity = np.clip(rng.lognormal(-0.045, 0.3, n), 0.3, 2.5)
        replacement = self.reference.replacement_of(self.pop.device)
        km = self.reference.nearest_store_km(replacement, self.pop.home_lat, self.pop.home_lon)
        self.swap_store_near = np.nan_to_num(km, nan=np.inf) <= SWAP_STORE_KM
        plan = self.pop.plan_mb.astype(np.float64)
        self.customer_value = np.clip(30.0 * np.sqrt(plan / np.median(plan)), 15.0, 80.0)
        keys = Pseudonymizer(self.pseudonym_key).keys_of(
            pa.array(self.pop.customer_id, type=pa.string())
        )
        order = np.argsort(keys)
        self._sorted_keys = keys[order]
        self._index_of_sorted = order
        self.keys = keys
        self._contacts: list[list[int]] = [[] for _ in range(n)]
        self._next_event_id = (self.seed + 7) << 40

    # -- who is who --------------------------------------------------------------------------
    def index_of(self, customer_keys: np.ndarray) -> np.ndarray:
        """Population index of each customer key (every key must belong to the population)."""
        pos = np.searchsorted(self._sorted_keys, customer_keys)
        return self._index_of_sorted[np.minimum(pos, self._sorted_keys.size - 1)]

    @property
    def heavy(self) -> np.ndarray:
        """Frequent over-users: monthly use at least 20 % above the cap."""
        return self.pop.use_ratio > 1.2

    # -- the truth -------------------------------------------------------------------------------
    def base_propensity(
        self,
        idx: np.ndarray,
        offers: np.ndarray,
        days_left: np.ndarray,
        km_from_home: np.ndarray,
        cart_items: np.ndarray,
    ) -> np.ndarray:
        """Probability of acceptance before fatigue, per (customer index, offer)."""
        heavy = self.heavy[idx]
        ps = self.price_sensitivity[idx]
        p = np.full(idx.size, 0.01)
        up = offers == "plan_upgrade"
        p[up] = np.where(heavy[up], 0.03 + 0.32 * (1 - ps[up]), 0.02)
        dp = offers == "data_pass_1gb"
        light_pass = np.where(np.nan_to_num(days_left[dp], nan=0.0) >= 7, 0.25, 0.08)
        p[dp] = np.where(heavy[dp], 0.08 + 0.30 * ps[dp], light_pass)
        rp = offers == "roaming_pass"
        away = np.nan_to_num(km_from_home[rp], nan=0.0) > 100
        p[rp] = np.where(self.pop.traveller[idx[rp]] & away, 0.40, 0.04)
        sw = offers == "device_swap"
        owner = np.isin(self.pop.device[idx[sw]], RECALLED)
        stock = self.swap_store_near[idx[sw]]
        p[sw] = np.where(owner, np.where(stock, 0.50, 0.12), 0.0)
        ct = offers == "cart_incentive"
        p[ct] = 0.12 + 0.05 * np.minimum(np.nan_to_num(cart_items[ct]), 4)
        return np.clip(p * self.affinity[idx], 0.0, 0.95)

    def propensity(
        self,
        idx: np.ndarray,
        offers: np.ndarray,
        days_left: np.ndarray,
        km_from_home: np.ndarray,
        cart_items: np.ndarray,
        recent_contacts: np.ndarray,
    ) -> np.ndarray:
        """The true acceptance probability, contact fatigue included."""
        base = self.base_propensity(idx, offers, days_left, km_from_home, cart_items)
        return base * FATIGUE ** np.asarray(recent_contacts, dtype=np.float64)

    def recent_contacts(self, idx: np.ndarray, at_ms: np.ndarray) -> np.ndarray:
        out = np.zeros(idx.size)
        for i, (c, t) in enumerate(zip(idx.tolist(), at_ms.tolist(), strict=True)):
            out[i] = sum(1 for s in self._contacts[c] if t - 7 * DAY_MS <= s < t)
        return out

    # -- answering ---------------------------------------------------------------------------------
    def respond(self, decisions: pa.Table) -> tuple[pa.Table, dict[str, np.ndarray]]:
        """The raw events (responses, opt-outs) answering the delivered offers in ``decisions``,
        and per-decision outcomes (index into ``decisions``, accepted, opted_out, organic)."""
        delivered = np.asarray(decisions.column("delivered").to_numpy(zero_copy_only=False), bool)
        would = np.asarray(decisions.column("action").to_numpy(zero_copy_only=False)) != "NO_ACTION"
        rows = np.flatnonzero(would)
        empty = {
            k: np.zeros(0, dtype=bool) for k in ("accepted", "opted_out", "organic", "converted")
        }
        empty["incremental"] = np.zeros(0)
        if rows.size == 0:
            return _events([]), {"row": np.zeros(0, dtype=np.int64), **empty}
        t = decisions.take(pa.array(rows))
        keys = t.column("customer_key").to_numpy()
        idx = self.index_of(keys)
        offers = np.asarray(t.column("action").to_numpy(zero_copy_only=False), dtype=object)
        at = t.column("deliver_after").cast(pa.int64()).to_numpy()
        sent = delivered[rows]

        def ctx(name: str) -> np.ndarray:
            return np.asarray(t.column("ctx_" + name).to_numpy(zero_copy_only=False), float)

        recent = self.recent_contacts(idx, at)
        p = self.propensity(
            idx, offers, ctx("days_left"), ctx("km_from_home"), ctx("cart_items"), recent
        )
        day = (at // DAY_MS).astype(np.uint64)
        salt = np.array([_offer_salt(o) for o in offers.tolist()], dtype=np.uint64)
        stream = keys ^ salt ^ (day * np.uint64(0x100000001B3))
        accepted = sent & (stable_uniform(stream, ACCEPT_SALT + self.seed) < p)
        declined = sent & ~accepted & (stable_uniform(stream, DECLINE_SALT + self.seed) < 0.3)
        p_out = 0.002 + 0.012 * recent + 0.01 * (p < 0.05)
        opted_out = sent & (stable_uniform(stream, OPTOUT_SALT + self.seed) < p_out)
        base = self.base_propensity(
            idx, offers, ctx("days_left"), ctx("km_from_home"), ctx("cart_items")
        )
        organic = stable_uniform(stream, ORGANIC_SALT + self.seed) < ORGANIC_SHARE * base
        delay = (
            5 * MINUTE_MS + stable_uniform(stream, DELAY_SALT + self.seed) * 12 * HOUR_MS
        ).astype(np.int64)
        for c, a, s in zip(idx.tolist(), at.tolist(), sent.tolist(), strict=True):
            if s:
                self._contacts[c].append(a)
        ids = decision_id_text(t.column("decision_id").to_numpy())
        events: list[dict[str, object]] = []
        for i in np.flatnonzero(accepted | declined):
            events.append(
                self._event(
                    idx[i],
                    int(at[i] + delay[i]),
                    kind="offer_response",
                    decision_id=ids[i],
                    offer_id=offers[i],
                    response="accepted" if accepted[i] else "declined",
                )
            )
        for i in np.flatnonzero(opted_out):
            events.append(
                self._event(
                    idx[i], int(at[i] + MINUTE_MS), kind="consent", channel="all", granted=False
                )
            )
        value = t.column("value").to_numpy(zero_copy_only=False)
        cost = t.column("cost").to_numpy(zero_copy_only=False)
        # this world's counterfactual: without the offer, ``organic`` at the same value
        incremental = np.where(
            sent,
            value * (accepted.astype(float) - organic) - cost
            - opted_out * self.customer_value[idx],
            0.0,
        )  # fmt: skip
        outcome = {
            "row": rows,
            "accepted": accepted,
            "opted_out": opted_out,
            "organic": organic,
            "converted": accepted | organic,
            "incremental": incremental,
        }
        return _events(events), outcome

    def _event(self, index: int, ts: int, **fields: object) -> dict[str, object]:
        self._next_event_id += 1
        return {
            "event_id": self._next_event_id,
            "customer_id": self.pop.customer_id[index],
            "ts": ts,
            **fields,
        }

    def reset_contacts(self) -> None:
        self._contacts = [[] for _ in range(self.pop.size)]


def _events(rows: list[dict[str, object]]) -> pa.Table:
    columns = {}
    for f in RAW_SCHEMA:
        values = [r.get(f.name) for r in rows]
        if f.name == "ts":
            columns[f.name] = pa.array(values, type=pa.int64()).cast(TS_TYPE)
        else:
            columns[f.name] = pa.array(values, type=f.type)
    return pa.Table.from_pydict(columns, schema=RAW_SCHEMA)


def truth_arguments(sim: ResponseSimulator, request: ScoreRequest) -> tuple[np.ndarray, ...]:
    """What the simulator's truth needs of a scoring request's rows: (population index,
    offer, days_left, km_from_home, cart_items, contacts_7d), read from the features."""
    names = list(request.feature_names)
    x = request.features

    def col(name: str) -> np.ndarray:
        return x[:, names.index(name)].astype(np.float64)

    offers = np.full(request.rows, "", dtype=object)
    for j, name in enumerate(names):
        if name.startswith("offer="):
            offers[x[:, j] == 1.0] = name[len("offer=") :]
    idx = sim.index_of(request.customer_keys)
    return idx, offers, col("days_left"), col("km_from_home"), col("cart_items"), col("contacts_7d")


class OracleScorer:
    """An OfferScorer that knows the truth: the yardstick policy (d), never used by Kairos."""

    def __init__(self, simulator: ResponseSimulator) -> None:
        self.sim = simulator

    def score(self, request: ScoreRequest) -> ScoreResponse:
        p = self.sim.propensity(*truth_arguments(self.sim, request))
        return ScoreResponse(p.astype(np.float32), ("oracle",), np.zeros(request.rows, np.int8))
