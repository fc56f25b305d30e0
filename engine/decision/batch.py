"""DecisionBatch: one decision step's triggers x offers, as the decider fills it in.

One row per decision (a trigger some offer answers, or an inbound request), one column per
offer of the catalog. The decider fills it in named steps: which offers answer
(``answered``), the exclusions in order (``exclude``: the first reason wins), the context and
the propensities, the choice; ``engine.decision.log.decision_table`` turns it into log rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.decision.policy import Reason


@dataclass
class DecisionBatch:
    """Per decision (length t) and per (decision, offer) pair (t x offers)."""

    rows: np.ndarray  #: view rows of the trigger events
    rule_ids: np.ndarray  #: object: the rule (or ``inbound``) each decision answers
    slots: np.ndarray
    ts: np.ndarray  #: int64 event time, ms
    keys: np.ndarray  #: uint64 customer keys
    event_ids: np.ndarray  #: uint64 trigger event ids
    ids: np.ndarray  #: uint64 decision ids
    answered: np.ndarray  #: bool (t x offers): the offer answers this trigger here
    via: np.ndarray  #: int (t x offers): the channel it would go out on, -1 if none
    after: np.ndarray  #: int64: deliver no earlier than this (quiet hours)
    control: np.ndarray  #: bool: the customer is in the control group
    #: float: what an opt-out costs, from the profile (NaN: the catalog's customer value)
    customer_value: np.ndarray
    #: int8 (t x offers): why an answering offer is not a candidate (0: it is one)
    reasons: np.ndarray = field(init=False)
    context: dict[str, np.ndarray] = field(default_factory=dict)
    propensity: np.ndarray = field(init=False)  #: (t x offers), NaN where not scored
    baseline: np.ndarray = field(init=False)  #: P(convert | no action), NaN where not given
    opt_out: np.ndarray = field(init=False)  #: P(opt-out | contact), NaN where not given
    expected: np.ndarray = field(init=False)  #: the objective (Catalog.expected_values)
    versions: np.ndarray = field(init=False)  #: object: the model version per decision
    chosen: np.ndarray = field(init=False)  #: offer index, -1 for NO_ACTION
    probability: np.ndarray = field(init=False)
    explored: np.ndarray = field(init=False)
    held: np.ndarray = field(init=False)  #: NO_ACTION by the randomized no-action arm

    def __post_init__(self) -> None:
        t = self.size
        self.reasons = np.zeros(self.answered.shape, dtype=np.int8)
        self.propensity = np.full(self.answered.shape, np.nan)
        self.baseline = np.full(self.answered.shape, np.nan)
        self.opt_out = np.full(self.answered.shape, np.nan)
        self.expected = np.full(self.answered.shape, np.nan)
        self.versions = np.full(t, None, dtype=object)
        self.chosen = np.full(t, -1, dtype=np.int64)
        self.probability = np.ones(t)
        self.explored = np.zeros(t, dtype=bool)
        self.held = np.zeros(t, dtype=bool)

    @property
    def size(self) -> int:
        return int(self.rows.size)

    @property
    def candidates(self) -> np.ndarray:
        """(t x offers): answering and not excluded."""
        return self.answered & (self.reasons == 0)

    def exclude(self, reason: Reason, mask: np.ndarray, where: np.ndarray | None = None) -> None:
        """Exclude the candidates ``mask`` marks (broadcast to t x offers) for ``reason``;
        an earlier exclusion stands. ``where`` limits it to some decisions (row indexes)."""
        if where is None:
            self.reasons[self.candidates & mask] = reason
            return
        reasons = self.reasons[where]
        reasons[(reasons == 0) & self.answered[where] & mask] = reason
        self.reasons[where] = reasons

    @property
    def rounds(self) -> np.ndarray:
        """Each decision's round: a customer's k-th decision of the batch is in round k
        (decisions are in customer, then time order)."""
        return rounds_of(self.slots)


def rounds_of(slots: np.ndarray) -> np.ndarray:
    """Each row's rank among the rows of its customer (``slots`` sorted, each customer's rows
    together): 0 for a customer's first row, 1 for the second, ..."""
    t = slots.size
    first = np.ones(t, dtype=bool)
    first[1:] = slots[1:] != slots[:-1]
    return np.arange(t) - np.maximum.accumulate(np.where(first, np.arange(t), 0))
