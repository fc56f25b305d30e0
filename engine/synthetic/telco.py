"""A seeded telco population and a month of its events, generated with numpy.

Activity is skewed (a few customers make most events), monthly data use is a per-customer
fraction of the plan cap (some go over), a share of customers travel far from home, and the
stream arrives slightly out of order, with a few events too late and a few sent twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from engine.events.schema import RAW_SCHEMA, TS_TYPE
from engine.units import DAY_MS, HOUR_MS

#: name, lat, lon, time zone, weight
CITIES = [
    ("Berlin", 52.520, 13.405, "Europe/Berlin", 0.22),
    ("Hamburg", 53.551, 9.994, "Europe/Berlin", 0.12),
    ("Munich", 48.137, 11.575, "Europe/Berlin", 0.11),
    ("Cologne", 50.938, 6.960, "Europe/Berlin", 0.09),
    ("Frankfurt", 50.110, 8.682, "Europe/Berlin", 0.08),
    ("Stuttgart", 48.776, 9.183, "Europe/Berlin", 0.06),
    ("Leipzig", 51.340, 12.375, "Europe/Berlin", 0.05),
    ("Vienna", 48.208, 16.373, "Europe/Vienna", 0.12),
    ("Zurich", 47.377, 8.542, "Europe/Zurich", 0.08),
    ("London", 51.507, -0.128, "Europe/London", 0.07),
]
PLANS_MB = np.array([2_000.0, 5_000.0, 10_000.0, 20_000.0, 50_000.0])
PLAN_WEIGHTS = np.array([0.25, 0.30, 0.25, 0.15, 0.05])
DEVICES = [
    "Nimbus X2",
    "Nimbus X3",
    "Orchard 14",
    "Orchard 15",
    "Pixelite 8",
    "Galaxis S23",
    "Galaxis A54",
    "Fairfone 5",
]
DEVICE_WEIGHTS = np.array([0.06, 0.10, 0.18, 0.16, 0.10, 0.16, 0.16, 0.08])
PAGES = ["home", "plans", "roaming", "devices", "support", "checkout"]
#: recalled models and the model each is swapped for (reference table ``recalls``)
RECALLS = {"Nimbus X2": "Nimbus X3"}
#: the travel charger of each model's maker (reference table ``accessories``)
ACCESSORIES = {model: f"{model.split()[0]} travel charger" for model in DEVICES}
#: stores per city (fewer than its weight would say in the small ones), and the share of stores
#: holding a phone model or a travel charger in stock
STORES_PER_CITY = (2, 6)
PHONE_STOCK_SHARE = 0.35
ACCESSORY_STOCK_SHARE = 0.3
#: web events come in visits: a share of them start one, the others follow the one before after
#: a gap of about 90 s (``_in_visits``)
WEB_KINDS = ("page_view", "cart_add", "checkout")
VISIT_START_SHARE = 0.3
VISIT_GAP_MS = 90_000
CHANNEL_SETS = [["sms"], ["sms", "email"], ["sms", "email", "push"], ["sms", "push", "app"]]


@dataclass(frozen=True)
class Population:
    """Customers as columns; index i is one customer."""

    customer_id: np.ndarray  # object (str)
    plan_mb: np.ndarray
    cycle_day: np.ndarray
    city: np.ndarray
    home_lat: np.ndarray
    home_lon: np.ndarray
    tz: np.ndarray  # object (str)
    device: np.ndarray  # object (str)
    tenure_months: np.ndarray
    channels: list[list[str]]
    activity: np.ndarray  # relative event rate
    use_ratio: np.ndarray  # monthly data use / cap
    traveller: np.ndarray  # bool

    @property
    def size(self) -> int:
        return int(self.customer_id.size)


def population(customers: int, seed: int = 7) -> Population:
    rng = np.random.default_rng(seed)
    numbers = rng.choice(90_000_000, size=customers, replace=False) + 10_000_000
    ids = np.array([f"+49151{n:08d}" for n in numbers], dtype=object)
    weights = np.array([c[4] for c in CITIES])
    city = rng.choice(len(CITIES), size=customers, p=weights / weights.sum())
    lat = np.array([c[1] for c in CITIES])[city] + rng.normal(0, 0.05, customers)
    lon = np.array([c[2] for c in CITIES])[city] + rng.normal(0, 0.05, customers)
    tz = np.array([c[3] for c in CITIES], dtype=object)[city]
    cycle_day = np.where(
        rng.random(customers) < 0.9, rng.integers(1, 29, customers), rng.integers(29, 32, customers)
    )
    channel_idx = rng.integers(0, len(CHANNEL_SETS), customers)
    return Population(
        customer_id=ids,
        plan_mb=PLANS_MB[rng.choice(len(PLANS_MB), size=customers, p=PLAN_WEIGHTS)],
        cycle_day=cycle_day.astype(np.int8),
        city=city,
        home_lat=np.round(lat, 5),
        home_lon=np.round(lon, 5),
        tz=tz,
        device=np.array(DEVICES, dtype=object)[
            rng.choice(len(DEVICES), size=customers, p=DEVICE_WEIGHTS / DEVICE_WEIGHTS.sum())
        ],
        tenure_months=np.minimum(rng.exponential(30, customers), 300).astype(np.int32),
        channels=[CHANNEL_SETS[i] for i in channel_idx],
        activity=rng.lognormal(0.0, 1.0, customers),
        use_ratio=rng.lognormal(np.log(0.6), 0.45, customers),
        traveller=rng.random(customers) < 0.06,
    )


def reference_tables(seed: int = 7) -> dict[str, pa.Table]:
    """Stores around the cities, their stock of every phone model and travel charger, the
    recall list and each model's accessory: the reference tables (``engine.reference``) of the
    synthetic world. A small city has two stores, a large one up to six, each within about
    10 km of the centre; a store holds a product with the shares above (1 to 20 units)."""
    rng = np.random.default_rng(seed + 505)
    weights = np.array([c[4] for c in CITIES])
    low, high = STORES_PER_CITY
    per_city = np.round(low + (high - low) * weights / weights.max()).astype(int)
    ids, names, lats, lons = [], [], [], []
    for (city, lat, lon, _, _), count in zip(CITIES, per_city, strict=True):
        for i in range(count):
            ids.append(f"{city[:3].upper()}-{i + 1:02d}")
            names.append(f"Kairos Mobile {city} {i + 1}")
            lats.append(round(lat + rng.normal(0, 0.06), 5))
            lons.append(round(lon + rng.normal(0, 0.08), 5))
    products = [*DEVICES, *dict.fromkeys(ACCESSORIES.values())]
    share = np.array([PHONE_STOCK_SHARE] * len(DEVICES)
                     + [ACCESSORY_STOCK_SHARE] * (len(products) - len(DEVICES)))  # fmt: skip
    held = rng.random((len(ids), len(products))) < share[None, :]
    store_ix, product_ix = np.nonzero(held)
    return {
        "stores": pa.table({"store_id": ids, "lat": lats, "lon": lons, "name": names}),
        "stock": pa.table(
            {
                "store_id": pa.array(np.array(ids, dtype=object)[store_ix], pa.string()),
                "product": pa.array(np.array(products, dtype=object)[product_ix], pa.string()),
                "quantity": pa.array(rng.integers(1, 21, store_ix.size), pa.int64()),
            }
        ),
        "recalls": pa.table({"device_model": list(RECALLS), "replacement": list(RECALLS.values())}),
        "accessories": pa.table(
            {"device_model": list(ACCESSORIES), "product": list(ACCESSORIES.values())}
        ),
    }


def billing_history(pop: Population, months: int, seed: int = 7) -> np.ndarray:
    """Per customer, how many of the last ``months`` cycles used more than the cap.

    A month's use is the customer's usual share of the cap (``use_ratio``) times lognormal
    month-to-month noise (sigma 0.3): a customer at 120 % of the cap went over in ~3 of 4
    months, one at 60 % in ~1 of 20. Drawn from its own random stream, so the events of the
    month are the same with or without the history.
    """
    rng = np.random.default_rng(seed + 404)
    noise = rng.lognormal(0.0, 0.3, (pop.size, months))
    return (pop.use_ratio[:, None] * noise > 1.0).sum(axis=1).astype(np.int16)


def events(
    pop: Population,
    total: int,
    days: int = 30,
    seed: int = 7,
    start: datetime = datetime(2026, 10, 1, tzinfo=UTC),
    late_share: float = 0.0005,
    duplicate_share: float = 0.001,
    lateness_ms: int = 10_000,
    billing_months: int = 12,
    visits: bool = True,
) -> pa.Table:
    """About ``total`` raw events (one profile_update per customer first) in arrival order.

    The first profile update of each customer carries what a billing system knows on the day
    the customer is loaded: ``overage_cycles``, how many of the last ``billing_months`` cycles
    went over the cap (0 months: the field is left out).
    """
    rng = np.random.default_rng(seed + 1)
    n_cust = pop.size
    t0 = int(start.timestamp() * 1000)
    rest = max(total - n_cust, 0)
    n_dup = int(rest * duplicate_share)
    rest -= n_dup
    who = rng.choice(n_cust, size=rest, p=pop.activity / pop.activity.sum())
    # time of day: busier in the evening (two-peak mixture), uniform over the days
    day = rng.integers(0, days, rest)
    hour = np.where(rng.random(rest) < 0.6, rng.normal(19, 3, rest), rng.uniform(0, 24, rest)) % 24
    ts = t0 + day * DAY_MS + (hour * HOUR_MS).astype(np.int64) + 1000
    kind = rng.choice(
        np.array(
            ["usage", "location", "page_view", "purchase", "cart_add", "checkout", "consent"],
            dtype=object,
        ),
        size=rest,
        p=[0.62, 0.25, 0.07, 0.01, 0.025, 0.01, 0.015],
    )
    n = rest
    if visits:  # page views, cart additions and checkouts in visits (else each on its own)
        ts = _in_visits(ts, who, kind, seed)
    mb = np.full(n, np.nan)
    is_usage = kind == "usage"
    usage_per_cust = np.bincount(who[is_usage], minlength=n_cust)
    monthly = pop.use_ratio * pop.plan_mb * days / 30
    per_event = monthly / np.maximum(usage_per_cust, 1)
    mb[is_usage] = np.round(per_event[who[is_usage]] * rng.uniform(0.5, 1.5, is_usage.sum()), 1)
    lat = np.full(n, np.nan)
    lon = np.full(n, np.nan)
    is_loc = kind == "location"
    lat[is_loc] = pop.home_lat[who[is_loc]] + rng.normal(0, 0.08, is_loc.sum())
    lon[is_loc] = pop.home_lon[who[is_loc]] + rng.normal(0, 0.08, is_loc.sum())
    # travellers: pings in the second half of their trip window are in another city
    away = is_loc & pop.traveller[who] & ((day + who) % 10 < 3)
    dest = (pop.city[who[away]] + 1 + rng.integers(0, len(CITIES) - 1, away.sum())) % len(CITIES)
    lat[away] = np.array([c[1] for c in CITIES])[dest] + rng.normal(0, 0.05, away.sum())
    lon[away] = np.array([c[2] for c in CITIES])[dest] + rng.normal(0, 0.05, away.sum())
    amount = np.full(n, np.nan)
    is_amt = np.isin(kind, ["purchase", "checkout"])
    amount[is_amt] = np.round(rng.lognormal(3.5, 0.8, is_amt.sum()), 2)
    page = np.full(n, None, dtype=object)
    is_page = kind == "page_view"
    page[is_page] = np.array(PAGES, dtype=object)[rng.integers(0, len(PAGES), is_page.sum())]
    item = np.full(n, None, dtype=object)
    is_cart = kind == "cart_add"
    item[is_cart] = np.array([f"sku-{i}" for i in range(50)], dtype=object)[
        rng.integers(0, 50, is_cart.sum())
    ]
    channel = np.full(n, None, dtype=object)
    granted = np.full(n, None, dtype=object)
    is_consent = kind == "consent"
    channel[is_consent] = np.array(["sms", "email", "push", "all"], dtype=object)[
        rng.integers(0, 4, is_consent.sum())
    ]
    granted[is_consent] = rng.random(is_consent.sum()) < 0.8

    # arrival: most events on time, some a few seconds late, a few beyond the allowed lateness
    delay = np.where(rng.random(n) < 0.05, rng.integers(0, lateness_ms, n), 0)
    too_late = rng.random(n) < late_share
    # too late for any sensible allowed lateness: 5 to 15 minutes behind
    delay[too_late] = 300_000 + rng.integers(0, 600_000, too_late.sum())
    order = np.argsort(ts + delay, kind="stable")

    ids = rng.integers(1, 2**63, size=n_cust + n, dtype=np.int64).astype(np.uint64)
    profile = pa.table(
        {
            "event_id": pa.array(ids[:n_cust]),
            "customer_id": pa.array(pop.customer_id, type=pa.string()),
            "kind": pa.array(np.full(n_cust, "profile_update", dtype=object), type=pa.string()),
            "ts": pa.array(np.full(n_cust, t0, dtype=np.int64)).cast(TS_TYPE),
            "plan_data_cap_mb": pa.array(pop.plan_mb),
            "cycle_day": pa.array(pop.cycle_day),
            "home_lat": pa.array(pop.home_lat),
            "home_lon": pa.array(pop.home_lon),
            "tz": pa.array(pop.tz, type=pa.string()),
            "device_model": pa.array(pop.device, type=pa.string()),
            "tenure_months": pa.array(pop.tenure_months),
            "channels": pa.array(pop.channels, type=pa.list_(pa.string())),
        }
    )
    if billing_months > 0:
        profile = profile.append_column(
            "overage_cycles", pa.array(billing_history(pop, billing_months, seed))
        )
    body = pa.table(
        {
            "event_id": pa.array(ids[n_cust : n_cust + n][order]),
            "customer_id": pa.array(pop.customer_id[who[order]], type=pa.string()),
            "kind": pa.array(kind[order], type=pa.string()),
            "ts": pa.array(ts[order]).cast(TS_TYPE),
            "mb": pa.array(mb[order], from_pandas=True),
            "lat": pa.array(lat[order], from_pandas=True),
            "lon": pa.array(lon[order], from_pandas=True),
            "amount": pa.array(amount[order], from_pandas=True),
            "item": pa.array(item[order], type=pa.string()),
            "page": pa.array(page[order], type=pa.string()),
            "channel": pa.array(channel[order], type=pa.string()),
            "granted": pa.array(granted[order], type=pa.bool_()),
        }
    )
    if n_dup:
        # a re-sent event arrives right after its original
        picks = np.sort(rng.choice(n, size=n_dup, replace=False))
        body = _with_duplicates(body, picks)
    return _conform_table(pa.concat_tables([_conform_table(profile), _conform_table(body)]))


def _in_visits(ts: np.ndarray, who: np.ndarray, kind: np.ndarray, seed: int) -> np.ndarray:
    """Web events (page views, cart additions, checkouts) re-timed into visits: taken per
    customer in time order, each starts a visit with probability ``VISIT_START_SHARE`` (and
    every customer's first does), else it comes a gap of ``VISIT_GAP_MS`` on average (at least
    5 s) after the one before. Counts per kind and customer are unchanged; only web times move.
    Drawn from a random stream of its own, so every other column is as without visits."""
    rng = np.random.default_rng(seed + 606)
    web = np.flatnonzero(np.isin(kind, WEB_KINDS))
    if web.size == 0:
        return ts
    web = web[np.lexsort((ts[web], who[web]))]
    starts = rng.random(web.size) < VISIT_START_SHARE
    starts[0] = True
    starts[1:] |= who[web[1:]] != who[web[:-1]]
    gaps = np.where(starts, 0, 5_000 + rng.exponential(VISIT_GAP_MS - 5_000, web.size)).astype(
        np.int64
    )
    anchor = np.maximum.accumulate(np.where(starts, np.arange(web.size), 0))
    total = np.cumsum(gaps)
    out = ts.copy()
    out[web] = ts[web[anchor]] + total - total[anchor]
    return out


def _with_duplicates(body: pa.Table, picks: np.ndarray) -> pa.Table:
    positions = np.concatenate([np.arange(body.num_rows), picks])
    return body.take(pa.array(positions[np.argsort(positions, kind="stable")]))


def _conform_table(table: pa.Table) -> pa.Table:
    columns = []
    for field in RAW_SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=RAW_SCHEMA)
