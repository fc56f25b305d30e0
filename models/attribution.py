"""Outcomes for every arm: what each customer did after each decision, offer or not.

A response model learns from delivered offers only: who said yes. To learn what an offer
changes, the log must also say what customers did when they got no offer. So every decision is
expanded into one row per answering offer (its candidates, excluded ones included), and each
row gets, within the attribution window that starts when the decision could have reached the
customer (``deliver_after``):

* ``treated``: this offer was delivered in this decision;
* ``converted``: the customer converted: for a treated row an accepted ``offer_response`` of
  the decision or the offer's conversion event (``conversion`` in the catalog: a purchase of
  its item, a checkout, a profile field set); for any other row the conversion event alone
  (what the customer did without this offer);
* ``opted_out``: a consent withdrawal of every channel (``channel: all``, not granted);
* ``known``: the window had closed by the cutoff (rows still open are not labelled: their
  late conversions and opt-outs are still to come);
* ``arm``: ``offer`` (treated), ``control`` (the control group's would-be decision),
  ``no_action_arm`` (the randomized no-action arm), ``no_action`` (NO_ACTION chosen or no
  candidate), ``other_offer`` (another offer was sent), ``suppressed`` (this offer was excluded
  by the policy: cooldown, cap, consent, eligibility);
* ``probability``: the logged probability of the decision's action (the randomized arms are
  what an unbiased estimate weighs by).

Only events at or before the cutoff are read: no leakage. Events name customers by identifier
(as files and the API take them) or by ``customer_key``; identifiers are pseudonymized with the
engine's key.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.decision.catalog import NO_ACTION, Catalog
from engine.governance.pseudonym import Pseudonymizer
from models.training import _ms, accepted_at

#: composite sort keys: group << SHIFT | time since the earliest event (ms; 2^40 ms: 34 years)
SHIFT = 40
ARMS = ("offer", "control", "no_action_arm", "no_action", "other_offer", "suppressed")


def _customer_keys(events: pa.Table, pseudonymizer: Pseudonymizer | None) -> np.ndarray:
    if "customer_key" in events.schema.names:
        return np.asarray(events.column("customer_key").to_numpy(), dtype=np.uint64)
    if pseudonymizer is None:
        raise ValueError("events name customers by identifier: a pseudonymizer is needed")
    return pseudonymizer.keys_of(events.column("customer_id"))


def _column(events: pa.Table, name: str) -> np.ndarray:
    if name not in events.schema.names:
        return np.full(events.num_rows, None, dtype=object)
    return np.asarray(events.column(name).to_numpy(zero_copy_only=False), dtype=object)


def _sets_field(events: pa.Table, name: str) -> np.ndarray:
    """Which events set profile field ``name``: raw events carry its column, the response log
    the names of the fields an update set (``engine.decision.response``)."""
    if name in events.schema.names:
        return np.asarray(events.column(name).is_valid().to_numpy(), dtype=bool)
    if "fields" not in events.schema.names:
        return np.zeros(events.num_rows, dtype=bool)
    sets = events.column("fields").combine_chunks()
    flat = np.asarray(sets.flatten().to_numpy(zero_copy_only=False), dtype=object) == name
    counts = np.diff(sets.offsets.to_numpy()) if len(sets) else np.zeros(0, dtype=np.int64)
    row = np.repeat(np.arange(len(sets)), counts)
    return np.bincount(row[flat], minlength=len(sets)) > 0


def conversion_mask(events: pa.Table, catalog: Catalog) -> dict[str, np.ndarray]:
    """Per offer with a ``conversion``: which events are one."""
    kind, item = _column(events, "kind"), _column(events, "item")
    out = {}
    for offer in catalog.offers:
        spec = offer.spec.conversion
        if spec is None:
            continue
        hit = kind == spec.kind
        if spec.item is not None:
            hit &= item == spec.item
        if spec.field is not None:
            hit &= _sets_field(events, spec.field)
        out[offer.id] = hit
    return out


def _first_in_window(
    groups: np.ndarray, times: np.ndarray, ask_group: np.ndarray, start: np.ndarray,
    end: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """Per ask: is there an event of ``ask_group`` with ``start <= time <= end``?"""
    if times.size == 0 or ask_group.size == 0:
        return np.zeros(ask_group.size, dtype=bool)
    origin = min(int(times.min()), int(start.min()))
    composite = np.sort((groups.astype(np.int64) << SHIFT) | (times - origin))
    low = (ask_group.astype(np.int64) << SHIFT) | (start - origin)
    high = (ask_group.astype(np.int64) << SHIFT) | np.maximum(end - origin, start - origin - 1)
    at = np.searchsorted(composite, low, side="left")
    return (at < composite.size) & (composite[np.minimum(at, composite.size - 1)] <= high)


def attribute(
    decisions: pa.Table,
    events: pa.Table,
    catalog: Catalog,
    cutoff_ms: int,
    pseudonymizer: Pseudonymizer | None = None,
) -> pa.Table:
    """One row per (decision, answering offer); see the module's docstring."""
    n = decisions.num_rows
    candidates = decisions.column("candidates").combine_chunks()
    counts = np.diff(candidates.offsets.to_numpy()) if n else np.zeros(0, dtype=np.int64)
    row = np.repeat(np.arange(n), counts)
    flat = candidates.flatten()
    offer = np.asarray(flat.field("offer_id").to_numpy(zero_copy_only=False), dtype=object)
    excluded = np.asarray(flat.field("excluded").to_numpy(zero_copy_only=False), dtype=object)
    keys = np.asarray(decisions.column("customer_key").to_numpy(), dtype=np.uint64)[row]
    action = np.asarray(decisions.column("action").to_numpy(zero_copy_only=False), object)[row]
    delivered = np.asarray(decisions.column("delivered").to_numpy(zero_copy_only=False), bool)
    control = np.asarray(decisions.column("control").to_numpy(zero_copy_only=False), bool)[row]
    reason = np.asarray(decisions.column("reason").to_numpy(zero_copy_only=False), object)[row]
    start = _ms(decisions.column("deliver_after"))[row]
    end = np.minimum(start + catalog.policy.attribution_window_ms, cutoff_ms)
    known = start + catalog.policy.attribution_window_ms <= cutoff_ms
    treated = delivered[row] & (action == offer)

    events = events.filter(pc.less_equal(events.column("ts").cast(pa.int64()), cutoff_ms))
    ev_keys = _customer_keys(events, pseudonymizer)
    ev_ts = _ms(events.column("ts"))
    # one group per (customer, offer): conversions of the offer by the customer
    offer_code = {o: i for i, o in enumerate(catalog.offer_ids)}
    code = np.array([offer_code.get(o, -1) for o in offer.tolist()], dtype=np.int64)
    converted = np.zeros(row.size, dtype=bool)
    masks = conversion_mask(events, catalog)
    if masks:
        hit = np.zeros(events.num_rows, dtype=bool)
        ev_code = np.full(events.num_rows, -1, dtype=np.int64)
        for oid, mask in masks.items():
            ev_code[mask & ~hit] = offer_code[oid]
            hit |= mask
        pairs = np.concatenate([
            np.stack([ev_keys[hit].astype(np.int64), ev_code[hit]], axis=1),
            np.stack([keys.astype(np.int64), code], axis=1),
        ])  # fmt: skip
        _, group = np.unique(pairs, axis=0, return_inverse=True)
        group = group.reshape(-1)
        converted = _first_in_window(group[: hit.sum()], ev_ts[hit], group[hit.sum() :],
                                     start, end)  # fmt: skip
        converted &= code >= 0
    # a treated row converts by an accepted response too
    if "response" in events.schema.names:
        accept_ts = accepted_at(decisions, events, cutoff_ms)[row]
    else:
        accept_ts = np.full(row.size, -1, dtype=np.int64)
    converted |= treated & (accept_ts >= start) & (accept_ts <= end)
    # opt-outs: a withdrawal of every channel
    withdrawn = (_column(events, "kind") == "consent") & (_column(events, "channel") == "all")
    withdrawn &= _column(events, "granted") == False  # noqa: E712  (object array: None stays out)
    both = np.concatenate([ev_keys[withdrawn].astype(np.int64), keys.astype(np.int64)])
    _, who = np.unique(both, return_inverse=True)
    who = who.reshape(-1)
    k = int(withdrawn.sum())
    opted_out = _first_in_window(who[:k], ev_ts[withdrawn], who[k:], start, end)

    arm = np.full(row.size, "no_action", dtype=object)
    arm[(action != NO_ACTION) & ~treated] = "other_offer"
    arm[np.array([e is not None for e in excluded.tolist()], dtype=bool)] = "suppressed"
    arm[reason == "no_action_arm"] = "no_action_arm"
    arm[control] = "control"
    arm[treated] = "offer"
    return pa.table({
        "decision_id": pa.array(decisions.column("decision_id").to_numpy()[row], pa.uint64()),
        "customer_key": pa.array(keys, pa.uint64()),
        "offer_id": pa.array(offer, pa.string()),
        "arm": pa.array(arm, pa.string()),
        "treated": pa.array(treated),
        "known": pa.array(known),
        "converted": pa.array(converted),
        "opted_out": pa.array(opted_out),
        "probability": pa.array(decisions.column("probability").to_numpy()[row]),
        "row": pa.array(row, pa.int64()),
    })  # fmt: skip
