"""Reference data: tables validated whole, read from every format alike, the nearest store with
stock equal to a brute-force reference, and rules that read them in the engine."""

from __future__ import annotations

import io
import json
import pickle
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import EngineSettings
from engine.errors import RuleError
from engine.local import LocalEngine
from engine.reference import (
    EMPTY,
    Pooled,
    ReferenceData,
    ReferenceDataError,
    UnreadableTableError,
    load_reference,
    read_table,
    validate_table,
)
from engine.rules import expr
from engine.rules.expr import compile_expression, haversine_km
from engine.rules.spec import parse_rules_text
from engine.shard import ShardLogic
from engine.state.store import StringPool
from engine.synthetic.telco import reference_tables
from tests.conftest import ROOT
from tests.pure import examples

T0 = 1_772_323_200_000  # 2026-03-01
STORES = [
    {"store_id": "BER", "lat": 52.52, "lon": 13.40},
    {"store_id": "MUC", "lat": 48.14, "lon": 11.58},
    {"store_id": "POT", "lat": 52.39, "lon": 13.06},
]
STOCK = [
    {"store_id": "BER", "product": "X3", "quantity": 0},
    {"store_id": "MUC", "product": "X3", "quantity": 4},
    {"store_id": "POT", "product": "charger", "quantity": 2},
]
RECALLS = [{"device_model": "Nimbus X2", "replacement": "X3"}]


def data(**tables: list[dict[str, Any]]) -> ReferenceData:
    given_ = {"stores": STORES, "stock": STOCK, "recalls": RECALLS, **tables}
    return ReferenceData({name: pa.Table.from_pylist(rows) for name, rows in given_.items()})


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "rows", "words"),
    [
        ("stores", [{"store_id": "A", "lat": 95.0, "lon": 0.0}], "row 1: 95 is outside [-90, 90]"),
        ("stores", [{"store_id": "A", "lat": 1.0}], "missing column 'lon'"),
        ("stores", [{"store_id": "A", "lat": 1.0, "lon": 2.0, "city": "x"}],
         "unknown column 'city'"),
        ("stores", [{"store_id": None, "lat": 1.0, "lon": 2.0}], "1 missing value"),
        ("stores", [{"store_id": "A", "lat": 1.0, "lon": 2.0}] * 2, "duplicate key"),
        ("stock", [{"store_id": "A", "product": "x", "quantity": -1}], "outside [0, 1e+09]"),
        ("recalls", [{"device_model": "x" * 300, "replacement": "y"}], "over 256 characters"),
    ],
)  # fmt: skip
def test_an_invalid_table_is_refused_naming_table_column_and_row(
    name: str, rows: list[dict[str, Any]], words: str
) -> None:
    with pytest.raises(ReferenceDataError) as caught:
        validate_table(name, pa.Table.from_pylist(rows))
    assert f"reference table '{name}'" in str(caught.value)
    assert words in str(caught.value)


def test_every_problem_is_listed_and_the_whole_set_is_checked_together() -> None:
    rows = [{"store_id": "A", "lat": 95.0, "lon": 200.0, "city": "x"}]
    with pytest.raises(ReferenceDataError) as caught:
        validate_table("stores", pa.Table.from_pylist(rows))
    assert len(caught.value.problems) == 3  # lat, lon and the unknown column
    with pytest.raises(ReferenceDataError, match=r"1 store\(s\) not in table 'stores': 'NOPE'"):
        data(stock=[{"store_id": "NOPE", "product": "X3", "quantity": 1}])
    with pytest.raises(ReferenceDataError, match="unknown reference table 'shops'"):
        ReferenceData({"shops": pa.table({"x": [1]})})
    running = data()
    with pytest.raises(ReferenceDataError):  # a store with stock cannot go
        running.replaced("stores", pa.Table.from_pylist(STORES[:1]))
    assert running.tables["stores"].num_rows == 3  # immutable: the running data stays


def test_a_table_reads_the_same_from_yaml_json_csv_and_parquet() -> None:
    table = pa.Table.from_pylist(STOCK)
    csv, parquet = io.BytesIO(), io.BytesIO()
    pacsv.write_csv(table, csv)
    pq.write_table(table, parquet)
    bodies = {
        "yaml": "\n".join(
            f"- {{store_id: {r['store_id']}, product: {r['product']}, quantity: {r['quantity']}}}"
            for r in STOCK
        ),
        "json": json.dumps({"rows": STOCK}),
        "csv": csv.getvalue(),
        "parquet": parquet.getvalue(),
    }
    versions = {
        fmt: data(stock=validate_table("stock", read_table("stock", body, fmt)).to_pylist()).version
        for fmt, body in bodies.items()
    }
    assert len(set(versions.values())) == 1, versions
    with pytest.raises(UnreadableTableError, match="not valid csv"):
        read_table("stock", b"store_id,product,quantity\nA,x,many\n", "csv")
    with pytest.raises(ReferenceDataError, match="row 2: 'two' is not a whole number"):
        read_table("stock", json.dumps([STOCK[0], {**STOCK[1], "quantity": "two"}]), "json")


def test_a_parquet_body_over_the_row_limit_is_refused_before_it_is_decoded(monkeypatch) -> None:
    from engine import reference

    monkeypatch.setattr(reference, "MAX_REFERENCE_ROWS", 2)
    body = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(STOCK), body)
    with pytest.raises(ReferenceDataError, match="3 rows, over the limit of 2"):
        read_table("stock", body.getvalue(), "parquet")


def test_the_shipped_reference_file_is_the_synthetic_worlds_stores_and_stock() -> None:
    shipped = load_reference(ROOT / "deploy" / "config" / "reference.yaml")
    assert shipped.version == ReferenceData(reference_tables()).version
    summary = shipped.summary()["tables"]
    assert summary["stores"] > 20 and summary["stock"] > 100 and summary["recalls"] == 1


# -- the nearest store with stock ----------------------------------------------------------------
@st.composite
def worlds(draw: Any) -> tuple[ReferenceData, np.ndarray, np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 12))
    lat = st.floats(-80, 80, allow_nan=False)
    lon = st.floats(-179, 179, allow_nan=False)
    stores = [{"store_id": f"s{i}", "lat": draw(lat), "lon": draw(lon)} for i in range(n)]
    stock = [
        {"store_id": f"s{i}", "product": p, "quantity": draw(st.integers(0, 3))}
        for i in range(n)
        for p in ("a", "b")
        if draw(st.booleans())
    ]
    rows = draw(st.integers(1, 20))
    products = np.array([draw(st.sampled_from(["a", "b", "c"])) for _ in range(rows)], object)
    plat = np.array([draw(st.one_of(lat, st.just(float("nan")))) for _ in range(rows)])
    plon = np.array([draw(lon) for _ in range(rows)])
    tables = {"stores": pa.Table.from_pylist(stores)}
    if stock:
        tables["stock"] = pa.Table.from_pylist(stock)
    return ReferenceData(tables), products, plat, plon


@settings(max_examples=examples(300), deadline=None)
@given(world=worlds())
def test_the_nearest_store_with_stock_equals_a_brute_force_search(world) -> None:
    reference, products, lat, lon = world
    got = reference.nearest_store_km(products, lat, lon)
    stores = {r["store_id"]: r for r in reference.tables["stores"].to_pylist()}
    for i in range(products.size):
        held = [
            stores[s["store_id"]]
            for s in reference.tables["stock"].to_pylist()
            if s["product"] == products[i] and s["quantity"] > 0
        ]
        if not held or np.isnan(lat[i]):
            assert np.isnan(got[i])
            continue
        want = min(float(haversine_km(lat[i], lon[i], s["lat"], s["lon"])) for s in held)
        assert got[i] == pytest.approx(want, rel=1e-9, abs=1e-6)


def test_reference_functions_in_expressions_and_without_data() -> None:
    vocabulary = {"device_model": "str", "lat": "num", "lon": "num"}
    near = compile_expression(
        "recalled(device_model) and nearest_store_km(replacement_of(device_model), lat, lon) <= 20",
        vocabulary,
        "bool",
    )

    columns = {
        "device_model": np.array(["Nimbus X2", "Nimbus X2", "Orchard 14"], object),
        "lat": np.array([48.2, 52.52, 48.2]),
        "lon": np.array([11.6, 13.40, 11.6]),
    }

    class Rows:
        size = 3

        def __init__(self, reference: ReferenceData) -> None:
            self.reference = reference

        def column(self, name: str) -> np.ndarray:
            return columns[name]

    # only Munich has X3 in stock (Berlin's is 0); an Orchard is not recalled
    assert near.evaluate(Rows(data())).tolist() == [True, False, False]
    assert near.evaluate(Rows(EMPTY)).tolist() == [False, False, False]
    with pytest.raises(RuleError, match="needs a string"):
        compile_expression("nearest_store_km(lat, lat, lon) < 5", vocabulary)


@settings(max_examples=examples(200), deadline=None)
@given(
    a=st.lists(st.booleans(), min_size=64, max_size=200),
    seed=st.integers(0, 2**32 - 1),
    op=st.sampled_from(["and", "or"]),
)
def test_and_or_on_the_undecided_rows_only_equal_evaluating_every_row(
    a: list[bool], seed: int, op: str
) -> None:
    rng = np.random.default_rng(seed)
    n = len(a)
    columns = {"a": np.array(a, dtype=float), "b": rng.integers(0, 3, n).astype(float),
               "c": rng.normal(size=n)}  # fmt: skip
    source = f"a > 0 {op} (b == 1 {op} c > 0.5) {op} abs(c) < 1"
    compiled = compile_expression(source, dict.fromkeys(columns, "num"), "bool")

    class Rows:
        size = n
        reference = EMPTY

        def column(self, name: str) -> np.ndarray:
            return columns[name]

    want = {"and": np.logical_and, "or": np.logical_or}[op]
    expected = want(want(columns["a"] > 0, want(columns["b"] == 1, columns["c"] > 0.5)),
                    np.abs(columns["c"]) < 1)  # fmt: skip
    assert expr.SHORT_CIRCUIT_ROWS <= 64
    np.testing.assert_array_equal(compiled.evaluate(Rows()), expected)


MODELS = ["Nimbus X2", "Nimbus X3", "Orion 5", "", None, "nimbus x2", "Nimbus X2 "]


@settings(max_examples=examples(200), deadline=None)
@given(
    batches=st.lists(st.lists(st.sampled_from(MODELS), max_size=40), min_size=1, max_size=6),
    max_codes=st.sampled_from([2, 100_000]),
)
def test_model_lookups_equal_a_lookup_of_each_row_whatever_came_before(
    batches: list[list[str | None]], max_codes: int
) -> None:
    """Codes carried from call to call (and dropped past the limit) never change an answer;
    models given as codes into a growing string pool (``Pooled``, what the engine's view
    passes) give the same answers as the strings."""
    recalls = [{"device_model": "Nimbus X2", "replacement": "Nimbus X3"},
               {"device_model": "Orion 5", "replacement": "Orion 6"}]  # fmt: skip
    accessories = [{"device_model": "Nimbus X3", "product": "Charger N"}]
    ref = data(recalls=recalls, accessories=accessories)
    replacement = {r["device_model"]: r["replacement"] for r in recalls}
    accessory = {r["device_model"]: r["product"] for r in accessories}
    pools = [StringPool(), StringPool()]  # two shards' golden records in one process
    for i, batch in enumerate(batches):
        models = np.array(batch, dtype=object)
        pool = pools[i % 2]  # each grows as its batches intern new models
        as_codes = Pooled(pool.ids_of(batch), pool)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("engine.reference._MAX_CODES", max_codes)
            for given in (models, as_codes):
                assert ref.recalled(given).tolist() == [m in replacement for m in batch]
                want = [replacement.get(m, "") for m in batch]
                assert ref.replacement_of(given).tolist() == want
                assert ref.accessory_of(given).tolist() == [accessory.get(m, "") for m in batch]
    grid = np.array([["Orion 5", None], ["", "Nimbus X2"]], dtype=object)
    assert ref.recalled(grid).tolist() == [[True, False], [False, True]]
    # sent to an actor after use (the caches hold weak references): the same tables, fresh caches
    copy = pickle.loads(pickle.dumps(ref))
    assert copy.version == ref.version
    assert copy.recalled(grid).tolist() == [[True, False], [False, True]]
    assert copy.recalled(Pooled(pools[0].ids_of(["Orion 5", ""]), pools[0])).tolist() == [
        True,
        False,
    ]


# -- in the engine ---------------------------------------------------------------------------------
RECALL = parse_rules_text("""
rules:
  - id: recall
    type: condition
    on: [usage, location]
    when: >
      recalled(device_model)
      and nearest_store_km(replacement_of(device_model), current_lat, current_lon) <= 20
    emit:
      km: nearest_store_km(replacement_of(device_model), current_lat, current_lon)
""")


def recall_rows() -> list[dict[str, Any]]:
    return [
        {"event_id": 1, "customer_id": "c", "kind": "profile_update", "ts": T0,
         "device_model": "Nimbus X2", "home_lat": 52.52, "home_lon": 13.40},
        {"event_id": 2, "customer_id": "c", "kind": "usage", "ts": T0 + 1_000, "mb": 1.0},
        {"event_id": 3, "customer_id": "c", "kind": "location", "ts": T0 + 2_000,
         "lat": 52.52, "lon": 13.40},  # home: Berlin has no X3
        {"event_id": 4, "customer_id": "c", "kind": "location", "ts": T0 + 3_000,
         "lat": 48.20, "lon": 11.60},  # Munich: 7 km from a store with X3
        {"event_id": 5, "customer_id": "c", "kind": "usage", "ts": T0 + 4_000, "mb": 1.0},
    ]  # fmt: skip


def test_the_recall_moment_looks_where_the_phone_is_now_not_at_home() -> None:
    engine = LocalEngine(EngineSettings(shards=2, allowed_lateness_s=60), RECALL, reference=data())
    assert engine.submit_rows(recall_rows()) == []
    engine.end_stream()
    triggers = engine.trigger_table().to_pylist()
    assert [t["event_id"] for t in triggers] == [4, 5]  # no location yet at 2; at home at 3
    assert dict(triggers[1]["values"])["km"] == pytest.approx(
        float(haversine_km(48.20, 11.60, 48.14, 11.58))
    )


def test_replaced_stock_is_read_from_the_next_step_and_its_version_is_in_the_snapshot() -> None:
    engine = LocalEngine(EngineSettings(shards=1, allowed_lateness_s=0), RECALL, reference=data())
    rows = recall_rows()
    assert engine.submit_rows(rows[:3]) == []
    sold_out = data(stock=[{**STOCK[1], "quantity": 0}])
    engine.set_reference(sold_out)
    assert engine.submit_rows(rows[3:]) == []
    engine.end_stream()
    assert engine.trigger_table().num_rows == 0  # Munich sold out before the phone got there
    shard = engine.shards[0]
    snapshot = shard.snapshot()
    assert snapshot.reference_version == sold_out.version
    # a restore takes the customers; the tables come with the engine (a checkpoint's manifest)
    fresh = ShardLogic(0, shard.settings, RECALL, shard.key_range)
    fresh.restore(snapshot)
    assert fresh.snapshot().reference_version == EMPTY.version
