"""The decision log: one row per decision, as an Arrow table (written to Parquet by a sink).

A row holds what was decided and everything needed to learn from it and to audit it: the
trigger, every candidate offer with its propensity or the policy reason it was excluded, the chosen
action and the probability with which it was chosen (for off-policy evaluation), the model
version, the control-group flag, and the context the features were built from.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.decision.batch import DecisionBatch
from engine.decision.catalog import NO_ACTION, Catalog
from engine.decision.features import CONTEXT_FIELDS, CONTEXT_PREFIX
from engine.decision.policy import REASON_LABELS, Reason
from engine.events.schema import CHANNELS, TS_TYPE

CANDIDATE_TYPE = pa.struct(
    [
        pa.field("offer_id", pa.string()),
        pa.field("propensity", pa.float32()),  # null when excluded
        # the objective (engine.decision.catalog.Catalog.expected_values); null when excluded
        pa.field("expected_value", pa.float64()),
        pa.field("excluded", pa.string()),  # policy reason; null when it was a candidate
    ]
)

DECISION_SCHEMA = pa.schema(
    [
        pa.field("decision_id", pa.uint64()),
        pa.field("customer_key", pa.uint64()),
        pa.field("ts", TS_TYPE),
        pa.field("rule_id", pa.string()),
        pa.field("event_id", pa.uint64()),
        pa.field("action", pa.string()),  # an offer id or NO_ACTION
        pa.field("channel", pa.string()),  # null for NO_ACTION
        pa.field("value", pa.float64()),  # the action's value if accepted (0 for NO_ACTION)
        pa.field("cost", pa.float64()),  # its contact cost
        pa.field("propensity", pa.float32()),  # the action's (null for NO_ACTION)
        pa.field("probability", pa.float64()),  # probability the policy chose this action
        pa.field("explored", pa.bool_()),
        pa.field("control", pa.bool_()),
        pa.field("delivered", pa.bool_()),
        pa.field("deliver_after", TS_TYPE),  # the end of quiet hours, or ts
        pa.field("reason", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("candidates", pa.list_(CANDIDATE_TYPE)),
        *(pa.field(CONTEXT_PREFIX + name, pa.float32()) for name in CONTEXT_FIELDS),
        # what an opt-out of this customer costs, from the profile (null: the catalog's
        # policy customer_value); since issue 16, null in older logs
        pa.field("customer_value", pa.float64()),
    ]
)


def conform_decisions(table: pa.Table) -> pa.Table:
    """Decision-log rows in ``DECISION_SCHEMA``: columns added since they were written (by
    an older version, in a log or a checkpoint) are null."""
    names = table.schema.names
    columns = [
        table.column(f.name).cast(f.type) if f.name in names else pa.nulls(table.num_rows, f.type)
        for f in DECISION_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=DECISION_SCHEMA)


def empty_decisions() -> pa.Table:
    return DECISION_SCHEMA.empty_table()


def decision_id_text(decision_ids: np.ndarray) -> list[str]:
    """Decision ids as they travel on the wire (offer_response.decision_id): 16 hex digits."""
    return [f"{int(d):016x}" for d in decision_ids]


def parse_decision_id(text: str) -> int:
    """The inverse of ``decision_id_text``; ValueError names the bad text."""
    try:
        value = int(text, 16)
    except (TypeError, ValueError):
        raise ValueError(f"decision id {text!r} is not 16 hex digits") from None
    if len(text) != 16 or value < 0:
        raise ValueError(f"decision id {text!r} is not 16 hex digits")
    return value


def candidates_array(
    offer_ids: tuple[str, ...],
    answered: np.ndarray,
    propensity: np.ndarray,
    expected: np.ndarray,
    reason_labels: np.ndarray,
) -> pa.ListArray:
    """The candidate list per decision from dense (decisions x offers) matrices."""
    rows, cols = np.nonzero(answered)  # row-major: grouped by decision, offers in catalog order
    counts = answered.sum(axis=1)
    offsets = np.zeros(answered.shape[0] + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    excluded = reason_labels[rows, cols]
    kept = np.array([e is None for e in excluded.tolist()], dtype=bool)
    items = pa.StructArray.from_arrays(
        [
            pa.array(np.array(offer_ids, dtype=object)[cols], type=pa.string()),
            pa.array(propensity[rows, cols].astype(np.float32), mask=~kept),
            pa.array(expected[rows, cols], mask=~kept),
            pa.array(excluded, type=pa.string()),
        ],
        fields=list(CANDIDATE_TYPE),
    )
    return pa.ListArray.from_arrays(pa.array(offsets), items)


def _reason(batch: DecisionBatch, has: np.ndarray) -> np.ndarray:
    """Why each decision came out as it did: offer, no_candidate, explored (NO_ACTION drawn),
    no_action_arm (the randomized no-action arm), no_positive_value, model_unavailable, or
    control_group (which overrides the rest)."""
    any_candidate = batch.candidates.any(axis=1)
    reason = np.where(
        has,
        "offer",
        np.where(
            ~any_candidate,
            "no_candidate",
            np.where(batch.explored, "explored", "no_positive_value"),
        ),
    ).astype(object)
    reason[batch.held] = "no_action_arm"
    unavailable = (batch.reasons == Reason.MODEL_UNAVAILABLE).any(axis=1) & ~has
    reason[unavailable] = "model_unavailable"
    reason[batch.control] = "control_group"
    return reason


def decision_table(batch: DecisionBatch, catalog: Catalog) -> pa.Table:
    """The decision-log rows of a decided batch, in its order."""
    t = batch.size
    values = np.array([o.spec.value for o in catalog.offers])
    costs = np.array([o.spec.cost for o in catalog.offers])
    expected = batch.expected
    has = batch.chosen >= 0
    pick = np.maximum(batch.chosen, 0)
    names = np.array([*catalog.offer_ids, NO_ACTION], dtype=object)
    action = names[np.where(has, batch.chosen, len(catalog.offers))]
    channel_names = np.array([*CHANNELS, None], dtype=object)
    chosen_channel = np.where(has, batch.via[np.arange(t), pick], -1)
    columns: dict[str, pa.Array] = {
        "decision_id": pa.array(batch.ids, type=pa.uint64()),
        "customer_key": pa.array(batch.keys, type=pa.uint64()),
        "ts": pa.array(batch.ts, type=pa.int64()).cast(TS_TYPE),
        "rule_id": pa.array(batch.rule_ids, type=pa.string()),
        "event_id": pa.array(batch.event_ids, type=pa.uint64()),
        "action": pa.array(action, type=pa.string()),
        "channel": pa.array(channel_names[chosen_channel], type=pa.string()),
        "value": pa.array(np.where(has, values[pick], 0.0)),
        "cost": pa.array(np.where(has, costs[pick], 0.0)),
        "propensity": pa.array(
            batch.propensity[np.arange(t), pick].astype(np.float32), mask=~has, type=pa.float32()
        ),
        "probability": pa.array(batch.probability),
        "explored": pa.array(batch.explored),
        "control": pa.array(batch.control),
        "delivered": pa.array(has & ~batch.control),
        "deliver_after": pa.array(batch.after, type=pa.int64()).cast(TS_TYPE),
        "reason": pa.array(_reason(batch, has), type=pa.string()),
        "model_version": pa.array(batch.versions, type=pa.string()),
        "candidates": candidates_array(
            catalog.offer_ids,
            batch.answered,
            batch.propensity,
            expected,
            REASON_LABELS[batch.reasons],
        ),
    }
    for name in CONTEXT_FIELDS:
        columns[CONTEXT_PREFIX + name] = pa.array(batch.context[name], type=pa.float32())
    value = batch.customer_value
    columns["customer_value"] = pa.array(value, mask=np.isnan(value), type=pa.float64())
    return pa.Table.from_pydict(columns, schema=DECISION_SCHEMA)


def randomization_cost(decisions: pa.Table) -> dict[str, dict[str, float | int]]:
    """What the policy's randomization gave up on ``decisions`` (decision-log rows), by the
    serving model's own expected values (``candidates.expected_value``, against NO_ACTION at
    0): the randomized no-action arm (reason ``no_action_arm``: the best candidate's value,
    where positive) and exploration (the other explored decisions: the best candidate's value,
    where positive, minus the value of the action drawn). The control group is left out: it is
    the measurement of the whole policy, not a cost of learning."""
    n = decisions.num_rows
    action = np.asarray(decisions.column("action").to_numpy(zero_copy_only=False), dtype=object)
    best, taken = np.zeros(n), np.zeros(n)
    if n:
        candidates = decisions.column("candidates").combine_chunks()
        counts = np.diff(candidates.offsets.to_numpy())
        flat = candidates.flatten()
        ev = flat.field("expected_value").fill_null(-np.inf).to_numpy(zero_copy_only=False)
        offer = np.asarray(flat.field("offer_id").to_numpy(zero_copy_only=False), dtype=object)
        row = np.repeat(np.arange(n), counts)
        np.maximum.at(best, row, ev)
        drawn = offer == action[row]
        taken[row[drawn]] = ev[drawn]
    reason = np.asarray(decisions.column("reason").to_numpy(zero_copy_only=False), dtype=object)
    explored = np.asarray(decisions.column("explored").to_numpy(zero_copy_only=False), bool)
    control = np.asarray(decisions.column("control").to_numpy(zero_copy_only=False), bool)
    held = (reason == "no_action_arm") & ~control
    drew = explored & ~held & ~control
    return {
        "no_action_arm": {
            "decisions": int(held.sum()),
            "forgone_expected_value": float(best[held].sum()),
        },
        "exploration": {
            "decisions": int(drew.sum()),
            "offers": int((drew & (action != NO_ACTION)).sum()),
            "forgone_expected_value": float((best - taken)[drew].sum()),
        },
    }
