"""The response log: what it keeps of the events (outcomes of every arm, by key), and that
attribution reads it as it reads raw events."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.decision.catalog import parse_catalog_text
from engine.decision.response import offer_responses, response_table
from engine.events.schema import ROUTED_SCHEMA, EventKind
from models.attribution import conversion_mask

CATALOG = parse_catalog_text("""
offers:
  - {id: swap, answers: [r], channels: [sms], value: 5, cooldown: 1d,
     conversion: {kind: profile_update, field: device_model}}
  - {id: pass, answers: [r], channels: [sms], value: 5, cooldown: 1d,
     conversion: {kind: purchase, item: pass}}
""")


def _routed() -> pa.Table:
    kinds = [EventKind.PROFILE_UPDATE, EventKind.PURCHASE, EventKind.USAGE,
             EventKind.PROFILE_UPDATE, EventKind.CONSENT, EventKind.OFFER_RESPONSE,
             EventKind.PAGE_VIEW, EventKind.CHECKOUT]  # fmt: skip
    n = len(kinds)
    rows: dict[str, list[object]] = {f.name: [None] * n for f in ROUTED_SCHEMA}
    rows.update(event_id=list(range(n)), customer_key=[11] * n, key_group=[0] * n,
                seq=list(range(n)), kind=[int(k) for k in kinds], ts=list(range(n)))  # fmt: skip
    rows["device_model"][0] = "Pixel 9"
    rows["home_lat"][0], rows["home_lon"][0] = 52.5, 13.4
    rows["item"][1], rows["amount"][1] = "pass", 9.0
    rows["mb"][2] = 100.0
    rows["tz"][3] = "Europe/Berlin"
    rows["channel"][4], rows["granted"][4] = "all", False
    rows["decision_id"][5], rows["offer_id"][5], rows["response"][5] = "ab", "pass", "accepted"
    rows["page"][6] = "/cart"
    return pa.Table.from_pydict(rows, schema=ROUTED_SCHEMA)


def test_the_response_log_keeps_outcome_events_and_the_names_of_fields_not_values() -> None:
    out = response_table(_routed())
    assert out.column("kind").to_pylist() == [
        "profile_update", "purchase", "profile_update", "consent", "offer_response", "checkout"
    ]  # fmt: skip
    assert out.column("event_id").to_pylist() == [0, 1, 3, 4, 5, 7]
    assert out.column("fields").to_pylist() == [
        ["home_lat", "home_lon", "device_model"], None, ["tz"], None, None, None
    ]  # fmt: skip
    assert out.column("item").to_pylist()[1] == "pass"
    assert out.column("granted").to_pylist()[3] is False
    assert offer_responses(out) == 1
    # nothing else of the events: no values of the profile, no amounts, no pages
    assert not {"device_model", "home_lat", "amount", "page", "mb"} & set(out.schema.names)


def test_attribution_finds_the_same_conversions_in_the_log_as_in_raw_events() -> None:
    routed = _routed()
    raw = routed.set_column(
        routed.schema.get_field_index("kind"), "kind",
        pa.array(np.array([k.wire_name for k in EventKind])[routed.column("kind").to_numpy()]),
    )  # fmt: skip
    logged = response_table(routed)
    from_raw = conversion_mask(raw.take(pa.array(logged.column("event_id").to_numpy())), CATALOG)
    from_log = conversion_mask(logged, CATALOG)
    for offer in ("swap", "pass"):
        np.testing.assert_array_equal(from_log[offer], from_raw[offer])
    assert from_log["swap"].tolist() == [True, False, False, False, False, False]
    assert from_log["pass"].tolist() == [False, True, False, False, False, False]
