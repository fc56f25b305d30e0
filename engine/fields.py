"""The one vocabulary: every field an event carries, a profile holds or an aggregate counts.

One row per name: its role, its type on the wire (Arrow), how rule expressions see it, the
range a value must fall in, and its golden-record column (numpy dtype and default). The event
schemas (``events.schema``), validation (``events.validation``), the customer store
(``state.store``), the batch view (``state.view``) and the rule language (``rules.spec``) all
derive their lists from this table, so a field is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

#: ``event``: carried by some event kinds only; ``profile``: set by profile updates, kept in the
#: golden record; ``aggregate``: computed from events, kept in the golden record
Role = Literal["event", "profile", "aggregate"]
#: how a rule expression sees a field (None: it cannot name it)
ExprType = Literal["num", "str"] | None


@dataclass(frozen=True)
class Field:
    name: str
    role: Role
    wire: pa.DataType | None  #: its type on events (None: never on an event)
    expr: ExprType  #: its type in rule expressions
    range: tuple[float, float] | None = None  #: accepted values on the wire, inclusive
    store: np.dtype | None = None  #: its golden-record column (None: not stored)
    default: float | int = 0  #: the column's value before any event set it
    doc: str = ""
    #: a profile update may carry it (billing history seeds an aggregate this way)
    on_profile_update: bool = False
    #: characters of a text value (of each item of a list); items of a list value
    max_chars: int | None = None
    max_items: int | None = None


def _f64() -> np.dtype:
    return np.dtype(np.float64)


FIELDS: tuple[Field, ...] = (
    # -- on events --------------------------------------------------------------------------
    Field("mb", "event", pa.float64(), "num", (0.0, 1e7), doc="mobile data used, MB"),
    Field("lat", "event", pa.float64(), "num", (-90.0, 90.0), doc="latitude of a ping"),
    Field("lon", "event", pa.float64(), "num", (-180.0, 180.0), doc="longitude of a ping"),
    Field("amount", "event", pa.float64(), "num", (0.0, 1e9), doc="money spent"),
    Field("item", "event", pa.string(), "str", doc="product or SKU", max_chars=256),
    Field("page", "event", pa.string(), "str", doc="page or screen viewed", max_chars=2048),
    Field("decision_id", "event", pa.string(), None, doc="the decision a response answers",
          max_chars=64),
    Field("offer_id", "event", pa.string(), "str", doc="the offer responded to", max_chars=64),
    Field("response", "event", pa.string(), "str", doc="accepted or declined", max_chars=32),
    Field("channel", "event", pa.string(), "str", doc="consent: a channel, or all", max_chars=32),
    Field("purpose", "event", pa.string(), "str", doc="consent: the purpose", max_chars=64),
    Field("granted", "event", pa.bool_(), None, doc="consent: granted or withdrawn"),
    # -- profile (profile updates) --------------------------------------------------------------
    Field("plan_data_cap_mb", "profile", pa.float64(), "num", (0.0, 1e9), _f64(), np.nan,
          "monthly data cap in MB", True),
    Field("cycle_day", "profile", pa.int8(), "num", (1, 31), np.dtype(np.int8), 1,
          "day of month the billing cycle starts", True),
    Field("home_lat", "profile", pa.float64(), "num", (-90.0, 90.0), _f64(), np.nan,
          "home latitude", True),
    Field("home_lon", "profile", pa.float64(), "num", (-180.0, 180.0), _f64(), np.nan,
          "home longitude", True),
    Field("tz", "profile", pa.string(), "str", None, np.dtype(np.int16), 0,
          "time zone, id into the string pool (0 = UTC)", True, max_chars=64),
    Field("device_model", "profile", pa.string(), "str", None, np.dtype(np.int16), 1,
          "device model, id into the string pool", True, max_chars=128),
    Field("tenure_months", "profile", pa.int32(), "num", (0, 2400), np.dtype(np.float32), np.nan,
          "months as a customer", True),
    Field("channels", "profile", pa.list_(pa.string()), None, None, np.dtype(np.uint8), 0,
          "bitmask of reachable channels", True, max_chars=32, max_items=16),
    Field("customer_value", "profile", pa.float64(), "num", (0.0, 1e9), _f64(), np.nan,
          "what losing the customer (an opt-out) costs; unset: the catalog's", True),
    # -- aggregates ---------------------------------------------------------------------------
    Field("cycle_usage_mb", "aggregate", None, "num", None, _f64(), 0.0,
          "data used in the current billing cycle"),
    Field("overage_cycles", "aggregate", pa.int16(), "num", (0, 1200), np.dtype(np.int16), 0,
          "past cycles whose usage exceeded the cap (a profile update may seed it)", True),
    Field("purchase_count", "aggregate", None, "num", None, np.dtype(np.int32), 0,
          "purchases made"),
    Field("cart_items", "aggregate", None, "num", None, np.dtype(np.int16), 0,
          "items added to the cart since the last checkout"),
    Field("offers_accepted", "aggregate", None, "num", None, np.dtype(np.int16), 0,
          "offers the customer accepted"),
    Field("offers_declined", "aggregate", None, "num", None, np.dtype(np.int16), 0,
          "offers the customer declined"),
)  # fmt: skip

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}


def names(role: Role | None = None, *, wire: bool | None = None) -> tuple[str, ...]:
    """Field names in table order, by role and/or whether they travel on events."""
    return tuple(
        f.name
        for f in FIELDS
        if (role is None or f.role == role) and (wire is None or (f.wire is not None) == wire)
    )


def expression_names(role: Role) -> dict[str, Literal["num", "str"]]:
    """The names of ``role`` rule expressions can use, with their expression type."""
    return {f.name: f.expr for f in FIELDS if f.role == role and f.expr is not None}


#: payload fields on events (event-only fields, then what a profile update may carry)
PAYLOAD_TYPES: dict[str, pa.DataType] = {
    **{f.name: f.wire for f in FIELDS if f.role == "event" and f.wire is not None},
    **{f.name: f.wire for f in FIELDS if f.on_profile_update and f.wire is not None},
}
#: what a profile update may carry
PROFILE_UPDATE_TYPES: dict[str, pa.DataType] = {
    f.name: f.wire for f in FIELDS if f.on_profile_update and f.wire is not None
}
#: longest text value of each text wire field (of each item, for a list), and most list items
MAX_CHARS: dict[str, int] = {f.name: f.max_chars for f in FIELDS if f.max_chars is not None}
MAX_ITEMS: dict[str, int] = {f.name: f.max_items for f in FIELDS if f.max_items is not None}
#: accepted ranges of numeric wire fields
RANGES: dict[str, tuple[float, float]] = {
    f.name: f.range for f in FIELDS if f.range is not None and f.wire is not None
}
