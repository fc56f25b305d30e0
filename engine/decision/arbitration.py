"""Arbitration: the choice among a decision's candidates and NO_ACTION, and its reproduction.

The offer with the highest expected value (the catalog's objective) is chosen when that value
is positive, else NO_ACTION; with probability ``exploration`` a uniform choice among the
candidates and NO_ACTION instead; and before both, with probability ``no_action_share``,
NO_ACTION whatever the values (a randomized no-action arm: the log then holds what customers
do without an offer at every kind of moment, which uplift models learn from). The probability
of the chosen action under all three is logged. Every draw comes from a stable hash of the
decision id, so ``reproduce_choices`` recomputes each logged choice from the log alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.decision.catalog import NO_ACTION
from engine.decision.policy import stable_uniform
from engine.partition import mix64, rule_salt

EXPLORE_SALT = 0x65787031
PICK_SALT = 0x7069636B
HOLD_SALT = 0x686F6C64


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
    #: NO_ACTION drawn for the randomized no-action arm
    held: np.ndarray


def arbitrate(
    expected: np.ndarray,
    available: np.ndarray,
    ids: np.ndarray,
    exploration: float,
    seed: int,
    no_action_share: float = 0.0,
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
    held = (stable_uniform(ids, HOLD_SALT + seed) < no_action_share) & (n_avail > 0)
    chosen = np.where(held, -1, np.where(explored, picked, greedy))
    otherwise = (1.0 - exploration) * (chosen == greedy) + exploration / actions
    share = np.where(n_avail > 0, no_action_share, 0.0)
    probability = (1.0 - share) * otherwise + share * (chosen == -1)
    return Arbitration(chosen.astype(np.int64), probability, explored | held, greedy, held)


def reproduce_choices(
    decisions: pa.Table, exploration: float, seed: int, no_action_share: float = 0.0
) -> np.ndarray:
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
    arb = arbitrate(ev, available, ids, exploration, seed, no_action_share)
    return np.where(
        arb.chosen >= 0, names[np.arange(n), np.maximum(arb.chosen, 0)], NO_ACTION
    ).astype(object)
