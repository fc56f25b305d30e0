"""A deliberately simple per-event engine: the specification the vectorized shards must match.

Plain Python, one event at a time, dict state per customer, calendar math with datetime and
zoneinfo. Rules' expressions are evaluated one row at a time through the same compiled
Expression objects (the expression compiler has its own unit tests).
"""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from engine.events.schema import CHANNELS
from engine.rules.spec import RuleSet

DAY_MS = 86_400_000


def _cycle_start(year: int, month: int, cycle_day: int) -> date:
    return date(year, month, min(cycle_day, calendar.monthrange(year, month)[1]))


def cycle_of(local: datetime, cycle_day: int) -> tuple[int, datetime]:
    """(cycle id = months since 1970 of the cycle's start month, next cycle start, local)."""
    d = local.date()
    y, m = d.year, d.month
    if d < _cycle_start(y, m, cycle_day):
        y, m = (y, m - 1) if m > 1 else (y - 1, 12)
    ny, nm = (y, m + 1) if m < 12 else (y + 1, 1)
    return (y - 1970) * 12 + (m - 1), datetime.combine(_cycle_start(ny, nm, cycle_day), time())


@dataclass
class Customer:
    profile: dict[str, Any] = field(
        default_factory=lambda: {
            "plan_data_cap_mb": math.nan,
            "cycle_day": 1,
            "home_lat": math.nan,
            "home_lon": math.nan,
            "tz": "UTC",
            "device_model": "",
            "tenure_months": math.nan,
        }
    )
    cycle_id: int = -1
    cycle_usage_mb: float = 0.0
    overage_cycles: int = 0
    purchase_count: int = 0
    cart_items: int = 0
    offers_accepted: int = 0
    offers_declined: int = 0
    last_lat: float = math.nan
    last_lon: float = math.nan
    channels: frozenset[str] = frozenset()
    consent_granted: frozenset[str] = frozenset()
    consent_withdrawn: frozenset[str] = frozenset()
    rule_last: dict[str, int] = field(default_factory=dict)


class _Row:
    """A one-row expression Context."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.size = 1

    def column(self, name: str) -> np.ndarray:
        v = self.values[name]
        return np.array([v], dtype=object if isinstance(v, str) or v is None else np.float64)


NUMERIC = ("mb", "lat", "lon", "amount")
STRINGS = ("item", "page", "offer_id", "response", "channel", "purpose")


class ReferenceEngine:
    def __init__(self, rules: RuleSet, allowed_lateness_ms: int) -> None:
        self.rules = rules
        self.lateness = allowed_lateness_ms
        self.customers: dict[str, Customer] = {}

    def run(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events in arrival order (valid ones); returns triggers."""
        accepted = []
        seen_ids: set[int] = set()
        newest = None
        for seq, e in enumerate(events):
            late = newest is not None and e["ts"] < newest - self.lateness
            newest = e["ts"] if newest is None else max(newest, e["ts"])
            if late or e["event_id"] in seen_ids:
                continue
            seen_ids.add(e["event_id"])
            accepted.append((e["ts"], seq, e))
        accepted.sort(key=lambda t: (t[0], t[1]))
        triggers = []
        for _, _, e in accepted:
            triggers.extend(self._apply(e))
        return triggers

    def _apply(self, e: dict[str, Any]) -> list[dict[str, Any]]:
        c = self.customers.setdefault(e["customer_id"], Customer())
        kind = e["kind"]
        if kind == "profile_update":
            for k in c.profile:
                if e.get(k) is not None:
                    c.profile[k] = e[k]
            if e.get("channels") is not None:
                c.channels = frozenset(e["channels"])
            if e.get("overage_cycles") is not None:  # billing history replaces the count
                c.overage_cycles = int(e["overage_cycles"])
        elif kind == "location":
            c.last_lat, c.last_lon = e["lat"], e["lon"]
        elif kind == "consent":
            bits = frozenset(CHANNELS) if e["channel"] == "all" else frozenset([e["channel"]])
            if e["granted"]:
                c.consent_granted, c.consent_withdrawn = (
                    c.consent_granted | bits,
                    (c.consent_withdrawn - bits),
                )
            else:
                c.consent_granted, c.consent_withdrawn = (
                    c.consent_granted - bits,
                    (c.consent_withdrawn | bits),
                )
        local = datetime.fromtimestamp(e["ts"] / 1000, UTC).astimezone(ZoneInfo(c.profile["tz"]))
        local = local.replace(tzinfo=None)
        cycle, next_start = cycle_of(local, int(c.profile["cycle_day"]))
        if cycle != c.cycle_id:
            cap = c.profile["plan_data_cap_mb"]
            if c.cycle_id != -1 and not math.isnan(cap) and c.cycle_usage_mb > cap:
                c.overage_cycles += 1
            c.cycle_id, c.cycle_usage_mb = cycle, 0.0
        if kind == "usage":
            c.cycle_usage_mb += e["mb"]
        elif kind == "purchase":
            c.purchase_count += 1
        elif kind == "cart_add":
            c.cart_items += 1
        elif kind == "checkout":
            c.cart_items = 0
        elif kind == "offer_response":
            if e.get("response") == "accepted":
                c.offers_accepted += 1
            elif e.get("response") == "declined":
                c.offers_declined += 1
        values: dict[str, Any] = {
            k: float(e[k]) if e.get(k) is not None else math.nan for k in NUMERIC
        }
        values.update({k: e.get(k) for k in STRINGS})
        values.update(
            {k: (float(v) if not isinstance(v, str) else v) for k, v in c.profile.items()}
        )
        values.update(
            cycle_usage_mb=c.cycle_usage_mb,
            overage_cycles=float(c.overage_cycles),
            purchase_count=float(c.purchase_count),
            cart_items=float(c.cart_items),
            offers_accepted=float(c.offers_accepted),
            offers_declined=float(c.offers_declined),
        )
        values["@days_left"] = (next_start - local).total_seconds() / 86400
        values["@local_hour"] = float(local.hour)
        ctx = _Row(values)
        out = []
        for rule in self.rules.rules:
            if kind not in [k.wire_name for k in rule.kinds]:
                continue
            if rule.when is not None and not bool(rule.when.evaluate(ctx)[0]):
                continue
            if rule.value is not None and rule.threshold is not None:
                v, t = rule.value.evaluate(ctx)[0], rule.threshold.evaluate(ctx)[0]
                if not v >= t:
                    continue
                once = getattr(rule.spec, "once_per", "billing_cycle")
                period = (
                    cycle if once == "billing_cycle" else (local.date() - date(1970, 1, 1)).days
                )
                if c.rule_last.get(rule.state_key) == period:
                    continue
                c.rule_last[rule.state_key] = period
            else:
                last = c.rule_last.get(rule.state_key)
                if last is not None and e["ts"] - last < rule.cooldown_ms:
                    continue
                c.rule_last[rule.state_key] = e["ts"]
            out.append(
                {
                    "rule_id": rule.id,
                    "customer_id": e["customer_id"],
                    "event_id": e["event_id"],
                    "values": {k: float(x.evaluate(ctx)[0]) for k, x in rule.emit.items()},
                }
            )
        return out


__all__ = ["CHANNELS", "ReferenceEngine"]
