"""Representative events that every rule and eligibility expression is evaluated on when a
document is validated, so an expression that passes validation cannot fail inside a shard.

Two customers: one with a full profile and one event of every kind at the edges of the
accepted ranges, and one never profiled (every profile value missing). The view is built once.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from engine.errors import RuleError
from engine.events.schema import ROUTED_SCHEMA, EventKind
from engine.rules.expr import Expression
from engine.state.store import CustomerStore
from engine.state.view import BatchView

_T0 = 1_772_323_200_000  # 2026-03-01 UTC
_PROFILE = {
    "plan_data_cap_mb": 1e9,
    "cycle_day": 31,
    "home_lat": -90.0,
    "home_lon": 180.0,
    "tz": "Pacific/Kiritimati",
    "device_model": "x",
    "tenure_months": 2400,
    "channels": ["sms", "push"],
    "customer_value": 1e9,
    "overage_cycles": 1200,
}
_EVENTS: list[tuple[EventKind, dict[str, Any]]] = [
    (EventKind.PROFILE_UPDATE, _PROFILE),
    (EventKind.USAGE, {"mb": 1e7}),
    (EventKind.USAGE, {"mb": 0.0}),
    (EventKind.LOCATION, {"lat": 90.0, "lon": -180.0}),
    (EventKind.PURCHASE, {"amount": 1e9, "item": "x" * 256}),
    (EventKind.PAGE_VIEW, {"page": ""}),
    (EventKind.CART_ADD, {"item": "sku", "amount": 0.0}),
    (EventKind.CHECKOUT, {}),
    (EventKind.OFFER_RESPONSE, {"decision_id": "0" * 16, "response": "declined"}),
    (EventKind.OFFER_RESPONSE, {"decision_id": "0" * 16, "response": "accepted"}),
    (EventKind.CONSENT, {"channel": "all", "granted": False}),
]


@lru_cache(maxsize=1)
def probe_view() -> BatchView:
    """The representative events as a view over a fresh store (never written back)."""
    rows: list[dict[str, Any]] = []
    for customer, events in ((1, _EVENTS), (2, [(EventKind.USAGE, {"mb": 1.0})])):
        for i, (kind, fields) in enumerate(events):
            rows.append(
                {
                    "event_id": customer * 1000 + i,
                    "customer_key": customer,
                    "key_group": 0,
                    "seq": len(rows),
                    "kind": int(kind),
                    "ts": _T0 + i * 3_600_000,
                    **fields,
                }
            )
    table = pa.Table.from_pylist(rows, schema=ROUTED_SCHEMA)
    store = CustomerStore()
    keys = table.column("customer_key").to_numpy()
    slots = store.slots_for(keys)
    order = np.lexsort(
        (np.arange(len(rows)), table.column("ts").cast(pa.int64()).to_numpy(), slots)
    )
    return BatchView(table, order, slots[order], store)


def probe(expression: Expression, windows: Mapping[str, Any] | None = None) -> None:
    """Evaluate ``expression`` on the representative events; RuleError if it cannot run.
    ``windows``: the window rules it may read (computed over the same events)."""
    view = probe_view()
    if windows:
        store = CustomerStore()
        store.ensure_rules([key for w in windows.values() for key in w.keys])
        store.slots_for(np.asarray(view.store.keys[: view.store.size]))
        view = BatchView(view.table, view.order, view.slot, store, windows)
    try:
        with np.errstate(all="ignore"):
            out = expression.evaluate(view)
    except Exception as exc:  # anything an expression can raise is a validation error here
        raise RuleError(f"fails on representative events: {type(exc).__name__}: {exc}") from exc
    if np.shape(out) != (view.size,):
        raise RuleError(f"gives {np.shape(out)} values for {view.size} events")
