"""Contact policy, vectorized: which (trigger, offer) pairs may be delivered, and why not.

Checks, in the order their reason is reported:

1. ``not_eligible``: the offer's eligibility condition is false;
2. ``opted_out``: the customer withdrew consent on every channel;
3. ``no_consent``: none of the offer's channels is reachable with consent;
4. ``cooldown``: the offer went to this customer less than its cooldown ago;
5. ``frequency_cap``: a cap (say 3 per 7 days) is used up.

The first three depend only on the event; the last two on contact state, which changes as
decisions are delivered. Contacts are kept per customer as the ``contacts_kept`` newest
delivery times, newest first.

Quiet hours do not exclude: an outbound offer decided at night in the customer's time zone
is held until they end (``deliver_after``), so a moment at 23:00 is not lost.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from engine.decision.catalog import PolicySpec
from engine.events.schema import ALL_CHANNELS, CHANNEL_BITS, CHANNELS
from engine.partition import mix64
from engine.state.store import NEVER
from engine.units import DAY_MS, HOUR_MS


class Reason(IntEnum):
    """Why a candidate offer was excluded (0: it was not)."""

    NONE = 0
    NOT_ELIGIBLE = 1
    OPTED_OUT = 2
    NO_CONSENT = 3
    COOLDOWN = 4
    FREQUENCY_CAP = 5
    MODEL_UNAVAILABLE = 6

    @property
    def label(self) -> str:
        return self.name.lower()


REASON_LABELS = np.array([None, *(r.label for r in list(Reason)[1:])], dtype=object)


def contact_keys(policy: PolicySpec) -> list[str]:
    return [f"contact:{i}" for i in range(policy.contacts_kept)]


def allowed_channels(
    reachable: np.ndarray, granted: np.ndarray, withdrawn: np.ndarray, policy: PolicySpec
) -> np.ndarray:
    """Bitmask of channels each customer may be contacted on for marketing."""
    base = reachable & granted if policy.consent == "opt_in" else reachable
    return (base & ~withdrawn & ALL_CHANNELS).astype(np.uint8)


def first_channel(allowed: np.ndarray, offer_channels: list[str]) -> np.ndarray:
    """Index into CHANNELS of the offer's first allowed channel per row, or -1."""
    out = np.full(allowed.shape, -1, dtype=np.int8)
    for name in reversed(offer_channels):  # earlier channels override later ones
        index = CHANNELS.index(name)
        out = np.where(allowed & CHANNEL_BITS[name], np.int8(index), out)
    return out


def in_quiet_hours(local_hour: np.ndarray, policy: PolicySpec) -> np.ndarray:
    quiet = policy.quiet_hours
    if quiet is None or quiet.start == quiet.end:
        return np.zeros(local_hour.shape, dtype=bool)
    if quiet.start < quiet.end:
        return (local_hour >= quiet.start) & (local_hour < quiet.end)
    return (local_hour >= quiet.start) | (local_hour < quiet.end)


def deliver_after(ts: np.ndarray, local: np.ndarray, policy: PolicySpec) -> np.ndarray:
    """Earliest delivery time (UTC ms) per decision: ``ts``, or the end of quiet hours.

    ``local`` is ``ts`` as local wall-clock ms. A DST change inside the quiet hours shifts
    the delivery by that hour; it is never earlier than the quiet hours' end.
    """
    quiet = policy.quiet_hours
    if quiet is None:
        return ts.copy()
    hour = (local // HOUR_MS) % 24
    inside = in_quiet_hours(hour, policy)
    day_start = local - local % DAY_MS
    end = day_start + quiet.end * HOUR_MS
    end = np.where(end <= local, end + DAY_MS, end)  # the next time the clock shows `end`
    return np.where(inside, ts + (end - local), ts)


def contacts_within(contacts: np.ndarray, ts: np.ndarray, window_ms: int) -> np.ndarray:
    """How many of each row's past contacts (rows x kept, newest first) fall in the window."""
    if contacts.shape[1] == 0:
        return np.zeros(ts.shape, dtype=np.int64)
    recent = (contacts > NEVER) & (contacts <= ts[:, None]) & (ts[:, None] - contacts < window_ms)
    return recent.sum(axis=1)


def capped(contacts: np.ndarray, ts: np.ndarray, policy: PolicySpec) -> np.ndarray:
    """True where some frequency cap is used up at ``ts``."""
    out = np.zeros(ts.shape, dtype=bool)
    for cap in policy.frequency_caps:
        out |= contacts_within(contacts, ts, cap.per_ms) >= cap.max
    return out


def push_contact(contacts: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Rows' contact lists with ``ts`` inserted, newest first, oldest dropped."""
    if contacts.shape[1] == 0:
        return contacts
    merged = np.concatenate([ts[:, None], contacts], axis=1)
    merged = -np.sort(-merged, axis=1)
    return merged[:, : contacts.shape[1]]


def stable_uniform(keys: np.ndarray, salt: int) -> np.ndarray:
    """A uniform [0, 1) draw per key, the same in every process and every replay."""
    salted = np.asarray(keys, dtype=np.uint64) ^ mix64(np.array([salt], dtype=np.uint64))[0]
    return (mix64(salted) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


CONTROL_SALT = 0x6B616972  # "kair"


def in_control_group(customer_keys: np.ndarray, policy: PolicySpec) -> np.ndarray:
    """The stable share of customers that receives nothing (their decisions are logged)."""
    return stable_uniform(customer_keys, CONTROL_SALT + policy.seed) < policy.control_share
