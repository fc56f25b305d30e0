"""The one feature builder, for serving (in the shard) and for training (from the decision log).

A decision's *context* is a handful of numbers about the customer and the moment, taken as of
the trigger event and logged with the decision (columns ``ctx_<name>``). The features of a
(decision, candidate offer) pair are that context plus one-hot identities of the trigger and
the offer. Training rebuilds its rows from the logged context with this same function, so the
model sees exactly what the ranker saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.decision.policy import contacts_within
from engine.errors import ConfigError
from engine.rules.expr import haversine_km
from engine.state.store import NEVER
from engine.state.view import BatchView
from engine.units import DAY_MS

#: context fields, each a float32 per decision
CONTEXT_FIELDS: tuple[str, ...] = (
    "plan_data_cap_mb",  # plan size
    "pct_of_cap",  # data used in the cycle so far, % of the cap
    "days_left",  # days to the end of the billing cycle
    "overage_cycles",  # past cycles over the cap
    "tenure_months",
    "km_from_home",  # distance of the last known location from home
    "local_hour",
    "contacts_7d",  # offers delivered in the 7 days before
    "days_since_contact",  # since the last delivered offer (capped at 365)
    "offers_accepted",
    "offers_declined",
    "purchase_count",
    "cart_items",
)
CONTEXT_PREFIX = "ctx_"
FEATURE_SET_VERSION = 1
#: days since the last contact when there was none, and its cap
NO_CONTACT_DAYS = 365.0


def context_features(
    view: BatchView, rows: np.ndarray, ts: np.ndarray, contacts: np.ndarray
) -> dict[str, np.ndarray]:
    """The CONTEXT_FIELDS of decisions at view ``rows`` (their trigger events, at ``ts``).

    ``contacts`` holds each decision's contact times, newest first (the decision state as of
    the start of the step). Every value is as of the trigger event; float32, NaN if unknown.
    """

    def col(name: str) -> np.ndarray:
        return np.asarray(view.column(name)[rows], dtype=np.float64)

    cap = col("plan_data_cap_mb")
    lat, lon = (a[rows] for a in view.last_location())
    newest = contacts[:, 0] if contacts.shape[1] else np.full(rows.size, NEVER)
    since = np.where(newest > NEVER, (ts - newest) / DAY_MS, NO_CONTACT_DAYS)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(cap > 0, 100.0 * col("cycle_usage_mb") / cap, np.nan)
    ctx = {
        "plan_data_cap_mb": cap,
        "pct_of_cap": pct,
        "days_left": col("@days_left"),
        "overage_cycles": col("overage_cycles"),
        "tenure_months": col("tenure_months"),
        "km_from_home": haversine_km(lat, lon, col("home_lat"), col("home_lon")),
        "local_hour": col("@local_hour"),
        "contacts_7d": contacts_within(contacts, ts, 7 * DAY_MS).astype(np.float64),
        "days_since_contact": np.clip(since, 0.0, NO_CONTACT_DAYS),
        "offers_accepted": col("offers_accepted"),
        "offers_declined": col("offers_declined"),
        "purchase_count": col("purchase_count"),
        "cart_items": col("cart_items"),
    }
    return {k: ctx[k].astype(np.float32) for k in CONTEXT_FIELDS}


@dataclass(frozen=True)
class FeatureSpec:
    """The ordered feature names a model is trained on and served with."""

    triggers: tuple[str, ...]
    offers: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return (
            *CONTEXT_FIELDS,
            *(f"trigger={t}" for t in self.triggers),
            *(f"offer={o}" for o in self.offers),
        )

    @classmethod
    def from_names(cls, names: Sequence[str]) -> FeatureSpec:
        """The spec a model artifact's feature names describe; refuses names it cannot build."""
        names = list(names)
        if tuple(names[: len(CONTEXT_FIELDS)]) != CONTEXT_FIELDS:
            raise ConfigError(
                "model features do not start with this engine's context fields "
                f"{list(CONTEXT_FIELDS)}: got {names[: len(CONTEXT_FIELDS)]}"
            )
        triggers, offers = [], []
        for name in names[len(CONTEXT_FIELDS) :]:
            kind, _, value = name.partition("=")
            if kind == "trigger" and value:
                triggers.append(value)
            elif kind == "offer" and value:
                offers.append(value)
            else:
                raise ConfigError(f"model feature '{name}' is not one this engine builds")
        spec = cls(tuple(triggers), tuple(offers))
        if spec.names != tuple(names):
            raise ConfigError("model feature names are not in the order this engine builds them")
        return spec


def feature_spec(trigger_ids: Sequence[str], offer_ids: Sequence[str]) -> FeatureSpec:
    """The spec for a catalog: its triggers and offers, sorted so file order does not matter."""
    return FeatureSpec(tuple(sorted(set(trigger_ids))), tuple(sorted(set(offer_ids))))


def build_features(
    context: Mapping[str, np.ndarray],
    trigger_ids: np.ndarray,
    offer_ids: np.ndarray,
    spec: FeatureSpec,
) -> np.ndarray:
    """One float32 row per (decision, offer) pair.

    ``context`` holds one array per CONTEXT_FIELDS name and ``trigger_ids`` / ``offer_ids`` one
    string per pair. Unknown trigger or offer ids get all-zero one-hots (a new offer is
    scored like an average one until the model is retrained with it). Missing numbers stay
    NaN, which XGBoost treats as missing.
    """
    n = len(offer_ids)
    names = spec.names
    out = np.zeros((n, len(names)), dtype=np.float32)
    for j, name in enumerate(CONTEXT_FIELDS):
        out[:, j] = np.asarray(context[name], dtype=np.float32)
    base = len(CONTEXT_FIELDS)
    _one_hot(out, base, np.asarray(trigger_ids, dtype=object), spec.triggers)
    _one_hot(out, base + len(spec.triggers), np.asarray(offer_ids, dtype=object), spec.offers)
    return out


def _one_hot(out: np.ndarray, start: int, values: np.ndarray, vocabulary: tuple[str, ...]) -> None:
    if not vocabulary or values.size == 0:
        return
    index = {v: i for i, v in enumerate(vocabulary)}
    distinct, inverse = np.unique(values.astype(str), return_inverse=True)
    column = np.array([index.get(v, -1) for v in distinct.tolist()], dtype=np.int64)[inverse]
    rows = np.flatnonzero(column >= 0)
    out[rows, start + column[rows]] = 1.0
