"""Reference data: small tables that rules read beside the events (stores and their stock, the
recall list, each device's accessory), validated whole and replaced whole.

Four tables, each with a fixed schema (``SCHEMAS``):

* ``stores``: ``store_id``, ``lat``, ``lon`` (and an optional ``name``);
* ``stock``: ``store_id`` (a store of ``stores``), ``product``, ``quantity`` (>= 0);
* ``recalls``: ``device_model``, ``replacement`` (the product a recalled phone is swapped for);
* ``accessories``: ``device_model``, ``product`` (the accessory a traveller of that phone needs).

A table comes from YAML, JSON, CSV or Parquet (``read_table``); a set of them from a YAML file
that names each (``load_reference``). Validation is whole: every column's type and range, no
missing value in a required column, unique keys, no stock of an unknown store; any problem
refuses the table with every problem named (table, column, row) and the running data stays.

Rule expressions read them through functions (``engine.rules.expr``): ``recalled(model)``,
``replacement_of(model)``, ``accessory_of(model)`` and ``nearest_store_km(product, lat, lon)``,
the great-circle distance to the nearest store with the product in stock (NaN if none), a
nearest-neighbour query on a k-d tree of each product's stores (built on first use, kept with
the data). ``version`` is a digest of the tables: shards record it in their snapshots.
"""

from __future__ import annotations

import hashlib
import io
import json
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from engine.errors import DocumentError
from engine.limits import (
    MAX_DOCUMENT_BYTES,
    MAX_REFERENCE_CHARS,
    MAX_REFERENCE_DECODED_BYTES,
    MAX_REFERENCE_ROWS,
)
from engine.preload import preload
from engine.yamlfile import DocumentLimitError, load_yaml

EARTH_RADIUS_KM = 6371.0088
#: problems listed in one refusal (the count is always the whole)
_MAX_LISTED = 20


class ReferenceDataError(DocumentError):
    """A reference table is invalid (``problems`` names each: table, column, row)."""


class UnreadableTableError(ReferenceDataError):
    """A reference table's data does not parse in its format (a 400, not a 422)."""


@dataclass(frozen=True)
class Column:
    type: pa.DataType
    required: bool = True
    range: tuple[float, float] | None = None


@dataclass(frozen=True)
class TableSchema:
    columns: dict[str, Column]
    key: tuple[str, ...]
    doc: str

    @property
    def arrow(self) -> pa.Schema:
        return pa.schema([pa.field(n, c.type) for n, c in self.columns.items()])


_TEXT = pa.string()
SCHEMAS: dict[str, TableSchema] = {
    "stores": TableSchema(
        {
            "store_id": Column(_TEXT),
            "lat": Column(pa.float64(), range=(-90.0, 90.0)),
            "lon": Column(pa.float64(), range=(-180.0, 180.0)),
            "name": Column(_TEXT, required=False),
        },
        ("store_id",),
        "shops with their coordinates",
    ),
    "stock": TableSchema(
        {
            "store_id": Column(_TEXT),
            "product": Column(_TEXT),
            "quantity": Column(pa.int64(), range=(0, 1e9)),
        },
        ("store_id", "product"),
        "units of each product in each store",
    ),
    "recalls": TableSchema(
        {"device_model": Column(_TEXT), "replacement": Column(_TEXT)},
        ("device_model",),
        "recalled phone models and the product each is swapped for",
    ),
    "accessories": TableSchema(
        {"device_model": Column(_TEXT), "product": Column(_TEXT)},
        ("device_model",),
        "the accessory a customer of each phone model needs when travelling",
    ),
}
TABLE_NAMES = tuple(SCHEMAS)


def empty_table(name: str) -> pa.Table:
    return SCHEMAS[name].arrow.empty_table()


# -- reading -----------------------------------------------------------------------------------
def read_table(name: str, data: bytes | str, fmt: str) -> pa.Table:
    """A table from ``data`` in format ``fmt`` (``yaml``, ``json``, ``csv`` or ``parquet``), not
    yet validated (``validate_table``). YAML and JSON hold a list of rows (maps), or a map with
    ``rows:``. Raises ReferenceDataError naming what does not parse."""
    _known(name)
    schema = SCHEMAS[name]
    raw = data if isinstance(data, bytes) else data.encode()
    if fmt == "yaml" and len(raw) > MAX_DOCUMENT_BYTES:
        raise ReferenceDataError(
            f"reference table '{name}': {len(raw):,} bytes of YAML, over the limit of "
            f"{MAX_DOCUMENT_BYTES:,} (max_document_bytes): send larger tables as CSV or Parquet"
        )
    try:
        if fmt == "parquet":
            return _read_parquet(name, raw)
        if fmt == "csv":
            types = {n: c.type for n, c in schema.columns.items()}
            options = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
            return pacsv.read_csv(io.BytesIO(raw), convert_options=options)
        document = json.loads(raw) if fmt == "json" else load_yaml(raw)
    except DocumentLimitError as exc:
        raise ReferenceDataError(f"reference table '{name}': {exc}") from exc
    except (pa.ArrowException, ValueError, OSError, yaml.YAMLError, RecursionError) as exc:
        raise UnreadableTableError(f"reference table '{name}': not valid {fmt}: {exc}") from exc
    return table_of_rows(name, document)


def _read_parquet(name: str, raw: bytes) -> pa.Table:
    """A Parquet body, refused before it is decoded when its footer says it holds more rows,
    or decodes to more bytes, than the limits allow (no body costs more than a bounded multiple
    of the limits)."""
    meta = pq.ParquetFile(io.BytesIO(raw)).metadata
    if meta.num_rows > MAX_REFERENCE_ROWS:
        raise ReferenceDataError(_too_many(name, meta.num_rows))
    decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if decoded > MAX_REFERENCE_DECODED_BYTES:
        raise ReferenceDataError(
            f"reference table '{name}': Parquet that decodes to {decoded:,} bytes, over the "
            f"limit of {MAX_REFERENCE_DECODED_BYTES:,} (max_reference_decoded_bytes)"
        )
    return pq.read_table(io.BytesIO(raw))


def table_of_rows(name: str, document: Any) -> pa.Table:
    """A table from a list of rows (maps), or a map holding ``rows:``, or columns (a map of
    lists); not yet validated."""
    _known(name)
    if isinstance(document, Mapping) and "rows" in document:
        document = document["rows"]
    if isinstance(document, Mapping):  # columns
        if not all(isinstance(v, list) for v in document.values()):
            raise ReferenceDataError(
                f"reference table '{name}': expected a list of rows or a map of columns"
            )
        lengths = {len(v) for v in document.values()}
        if len(lengths) > 1:
            raise ReferenceDataError(f"reference table '{name}': columns of different lengths")
        size = lengths.pop() if lengths else 0
        document = [{k: v[i] for k, v in document.items()} for i in range(size)]
    if not isinstance(document, list) or not all(isinstance(r, Mapping) for r in document):
        raise ReferenceDataError(f"reference table '{name}': expected a list of rows (maps)")
    if len(document) > MAX_REFERENCE_ROWS:
        raise ReferenceDataError(_too_many(name, len(document)))
    names = list(dict.fromkeys(k for row in document for k in row))
    columns: dict[str, list[Any]] = {n: [row.get(n) for row in document] for n in names}
    problems: list[str] = []
    arrays: dict[str, pa.Array] = {}
    for column, values in columns.items():
        spec = SCHEMAS[name].columns.get(column)
        try:
            arrays[column] = pa.array(values, type=spec.type if spec else None)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            bad = _first_bad(values, spec.type if spec else None)
            problems.append(
                f"reference table '{name}': column '{column}': row {bad + 1}: "
                f"{values[bad]!r} is not a {_noun(spec.type) if spec else 'value'}"
            )
    if problems:
        raise ReferenceDataError(problems[0], problems)
    return pa.table(arrays) if arrays else pa.table({})


def _first_bad(values: list[Any], typ: pa.DataType | None) -> int:
    for i, value in enumerate(values):
        try:
            pa.array([value], type=typ)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return i
    return 0


def _noun(typ: pa.DataType) -> str:
    if pa.types.is_string(typ):
        return "text"
    if pa.types.is_integer(typ):
        return "whole number"
    return "number"


def _too_many(name: str, rows: int) -> str:
    return (
        f"reference table '{name}': {rows:,} rows, over the limit of {MAX_REFERENCE_ROWS:,} "
        "(max_reference_rows)"
    )


def _known(name: str) -> None:
    if name not in SCHEMAS:
        raise ReferenceDataError(
            f"unknown reference table '{name}'; known: {', '.join(TABLE_NAMES)}"
        )


# -- validation --------------------------------------------------------------------------------
def validate_table(name: str, table: pa.Table) -> pa.Table:
    """The table in its schema's types and column order, or ReferenceDataError naming every
    problem: an unknown or missing column, a value of the wrong type, a missing value in a
    required column, a value out of range or too long, a duplicate key."""
    _known(name)
    schema = SCHEMAS[name]
    where = f"reference table '{name}'"
    problems: list[str] = []
    if table.num_rows > MAX_REFERENCE_ROWS:
        raise ReferenceDataError(_too_many(name, table.num_rows))
    for column in table.column_names:
        if column not in schema.columns:
            problems.append(
                f"{where}: unknown column '{column}'; its columns: {', '.join(schema.columns)}"
            )
    arrays: list[pa.Array] = []
    for column, spec in schema.columns.items():
        if column not in table.column_names:
            if spec.required:
                problems.append(f"{where}: missing column '{column}'")
            arrays.append(pa.nulls(table.num_rows, spec.type))
            continue
        values = table.column(column).combine_chunks()
        try:
            values = values.cast(spec.type)
        except (pa.ArrowException, ValueError):
            problems.append(f"{where}: column '{column}' is not {_noun(spec.type)}")
            arrays.append(pa.nulls(table.num_rows, spec.type))
            continue
        problems.extend(_column_problems(where, column, spec, values))
        arrays.append(values)
    if problems:
        raise ReferenceDataError(problems[0], _listed(problems))
    out = pa.Table.from_arrays(arrays, schema=schema.arrow)
    duplicates = _duplicate_keys(out, schema.key)
    if duplicates:
        keys = "; ".join(str(d) for d in duplicates[:5])
        raise ReferenceDataError(
            f"{where}: {len(duplicates)} duplicate key(s) ({', '.join(schema.key)}): {keys}"
        )
    return out


def _column_problems(where: str, column: str, spec: Column, values: pa.Array) -> list[str]:
    problems: list[str] = []
    nulls = np.flatnonzero(np.asarray(values.is_null().to_numpy(zero_copy_only=False)))
    if spec.required and nulls.size:
        problems.append(
            f"{where}: column '{column}': {nulls.size} missing value(s), first at row "
            f"{nulls[0] + 1}"
        )
    if spec.range is not None and len(values):
        number = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        lo, hi = spec.range
        present = ~np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        with np.errstate(invalid="ignore"):
            # NaN is out of every range: a float column's missing value is a null, never NaN
            bad = np.flatnonzero(present & ~((number >= lo) & (number <= hi)))
        if bad.size:
            problems.append(
                f"{where}: column '{column}': row {bad[0] + 1}: {number[bad[0]]:g} is outside "
                f"[{lo:g}, {hi:g}] ({bad.size} such row(s))"
            )
    if pa.types.is_string(spec.type) and len(values):
        lengths = np.asarray(pc.utf8_length(values).to_numpy(zero_copy_only=False), dtype=float)
        long = np.flatnonzero(np.nan_to_num(lengths) > MAX_REFERENCE_CHARS)
        if long.size:
            problems.append(
                f"{where}: column '{column}': row {long[0] + 1}: text over "
                f"{MAX_REFERENCE_CHARS} characters (max_reference_chars)"
            )
    return problems


def _duplicate_keys(table: pa.Table, key: tuple[str, ...]) -> list[tuple[Any, ...]]:
    if table.num_rows < 2:
        return []
    counts = table.group_by(list(key)).aggregate([([], "count_all")])
    dupes = counts.filter(pc.greater(counts.column("count_all"), 1))
    return [tuple(row[k] for k in key) for row in dupes.to_pylist()]


def _listed(problems: list[str]) -> list[str]:
    if len(problems) <= _MAX_LISTED:
        return problems
    return [*problems[:_MAX_LISTED], f"... and {len(problems) - _MAX_LISTED} more"]


# -- the data ----------------------------------------------------------------------------------
#: distinct device models coded before the codes start again (memory stays bounded)
_MAX_CODES = 100_000


class _Codes(dict[Any, int]):
    """Value -> code, a new code for a value not seen before (``names[code]`` is the value)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[Any] = []

    def __missing__(self, value: Any) -> int:
        code = self[value] = len(self.names)
        self.names.append(value)
        return code


@dataclass(frozen=True)
class Pooled:
    """A string column given as codes into a pool of its distinct values: ``pool.values``, a
    list that only grows (the golden record's ``StringPool``). The lookups keyed by device
    model (``recalled``, ``replacement_of``, ``accessory_of``) then look each pool value up
    once and gather per row by code, instead of one dict lookup per row."""

    codes: np.ndarray
    pool: Any

    def take(self, rows: np.ndarray) -> Pooled:
        """The codes of rows ``rows`` only, into the same pool."""
        return Pooled(self.codes[rows], self.pool)


class ReferenceData:
    """The four tables, validated together; immutable (``replaced`` makes a new one)."""

    def __init__(self, tables: Mapping[str, pa.Table] | None = None) -> None:
        given = dict(tables or {})
        for name in given:
            _known(name)
        self.tables: dict[str, pa.Table] = {
            name: validate_table(name, given[name]) if name in given else empty_table(name)
            for name in TABLE_NAMES
        }
        self._check_stock()
        self.version = self._digest()
        self._new_caches()

    def _new_caches(self) -> None:
        """The lookup caches, built as expressions ask (not pickled: a copy sent to an actor
        starts them again)."""
        self._trees: dict[str, tuple[Any, int]] = {}
        self._codes = _Codes()  # device model -> a small int, as first seen
        self._rows_by_code: dict[str, np.ndarray] = {}  # table -> row per code, -1: not listed
        #: string pool -> table -> row per pool value (-1: not listed); pools only grow
        self._by_pool: weakref.WeakKeyDictionary[Any, dict[str, np.ndarray]] = (
            weakref.WeakKeyDictionary()
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"tables": self.tables, "version": self.version}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tables, self.version = state["tables"], state["version"]
        self._new_caches()

    def _check_stock(self) -> None:
        stores = self.tables["stores"].column("store_id")
        stocked = pc.unique(self.tables["stock"].column("store_id"))
        unknown = pc.filter(stocked, pc.invert(pc.is_in(stocked, value_set=stores)))
        if len(unknown):
            names = ", ".join(repr(s) for s in unknown.to_pylist()[:5])
            raise ReferenceDataError(
                f"reference table 'stock': {len(unknown)} store(s) not in table 'stores': "
                f"{names} (replace 'stores' first, then 'stock')"
            )

    def _digest(self) -> str:
        digest = hashlib.sha256()
        for name in TABLE_NAMES:
            sink = io.BytesIO()
            table = self.tables[name]
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            digest.update(name.encode() + b"\0" + sink.getvalue())
        return digest.hexdigest()[:16]

    def replaced(self, name: str, table: pa.Table) -> ReferenceData:
        """This data with table ``name`` replaced (validated whole, with the others)."""
        _known(name)
        return ReferenceData({**self.tables, name: table})

    # -- transport and checkpoints --------------------------------------------------------------
    def document(self) -> dict[str, dict[str, list[Any]]]:
        """The tables as columns of plain values (JSON, msgpack, a checkpoint's manifest)."""
        return {name: table.to_pydict() for name, table in self.tables.items() if table.num_rows}

    @classmethod
    def from_document(cls, document: Mapping[str, Any] | None) -> ReferenceData:
        if not document:
            return cls()
        if not isinstance(document, Mapping):
            raise ReferenceDataError("reference data: expected a map of table name to table")
        tables = {str(name): table_of_rows(str(name), rows) for name, rows in document.items()}
        return cls(tables)

    def summary(self) -> dict[str, Any]:
        """Version and rows of each table (``GET /v1/reference``)."""
        return {
            "version": self.version,
            "tables": {name: self.tables[name].num_rows for name in TABLE_NAMES},
        }

    # -- what expressions read ------------------------------------------------------------------
    def _index(self, table: str, models: Any) -> np.ndarray:
        """Per row: the row of ``table`` whose device_model it is, -1 if none. Each row's model
        is coded by one C-level dict lookup (a few distinct models, many rows: cheaper than
        turning the strings into Arrow to hash them there); each code is looked up in the table
        once. ``models`` may be ``Pooled``: each value of the pool is looked up once, then the
        rows are gathered by code."""
        if isinstance(models, Pooled):
            per_table = self._by_pool.setdefault(models.pool, {})
            known = per_table.get(table, np.zeros(0, dtype=np.int64))
            values = models.pool.values
            if known.size < len(values):  # values new to the pool since: look them up
                more = self._index(table, np.array(values[known.size :], dtype=object))
                known = per_table[table] = np.concatenate([known, more])
            return known[np.asarray(models.codes, dtype=np.intp)]
        flat = np.asarray(models, dtype=object).ravel()
        if len(self._codes) > _MAX_CODES:  # every model of a hostile stream: start again
            self._codes, self._rows_by_code = _Codes(), {}
        codes = np.fromiter(map(self._codes.__getitem__, flat), np.int64, flat.size)
        rows = self._rows_by_code.get(table, np.zeros(0, dtype=np.int64))
        if rows.size < len(self._codes):  # codes new since: look them up
            new = pa.array(
                [m if isinstance(m, str) else None for m in self._codes.names[rows.size :]],
                type=pa.string(),
            )
            found = pc.index_in(new, value_set=self.tables[table].column("device_model"))
            more = np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), np.int64)
            rows = self._rows_by_code[table] = np.concatenate([rows, more])
        return rows[codes].reshape(np.shape(models))

    def _lookup(self, table: str, column: str, models: Any) -> np.ndarray:
        index = self._index(table, models)
        values = np.array([*self.tables[table].column(column).to_pylist(), ""], dtype=object)
        return values[index]  # -1: the '' after the table's values

    def recalled(self, models: Any) -> np.ndarray:
        """Per row: the model is on the recall list."""
        return self._index("recalls", models) >= 0

    def replacement_of(self, models: Any) -> np.ndarray:
        """Per row: the product a recalled model is swapped for ('' if it is not recalled)."""
        return self._lookup("recalls", "replacement", models)

    def accessory_of(self, models: Any) -> np.ndarray:
        """Per row: the travel accessory of the model ('' if none is listed)."""
        return self._lookup("accessories", "product", models)

    def _tree(self, product: str) -> tuple[Any, int]:
        """(k-d tree of the unit vectors of the stores with ``product`` in stock, their count)."""
        cached = self._trees.get(product)
        if cached is None:
            stock = self.tables["stock"]
            held = stock.filter(
                pc.and_(pc.equal(stock.column("product"), product),
                        pc.greater(stock.column("quantity"), 0))
            ).column("store_id")  # fmt: skip
            stores = self.tables["stores"]
            chosen = stores.filter(pc.is_in(stores.column("store_id"), value_set=held))
            lat = chosen.column("lat").to_numpy()
            lon = chosen.column("lon").to_numpy()
            from scipy.spatial import cKDTree  # 0.6 s to import: only where stores are searched

            cached = (cKDTree(_unit(lat, lon)) if lat.size else None, int(lat.size))
            self._trees[product] = cached
        return cached

    def nearest_store_km(self, products: Any, lat: Any, lon: Any) -> np.ndarray:
        """Per row: km to the nearest store with ``product`` in stock from (lat, lon); NaN when
        no store has it or the position is unknown."""
        p, la, lo = np.broadcast_arrays(np.asarray(products, dtype=object), lat, lon)
        shape = p.shape
        p, la, lo = p.ravel(), la.astype(np.float64).ravel(), lo.astype(np.float64).ravel()
        out = np.full(p.size, np.nan)
        known = np.flatnonzero(np.isfinite(la) & np.isfinite(lo))
        if known.size == 0 or self.tables["stock"].num_rows == 0:
            return out.reshape(shape)
        names = pc.dictionary_encode(pa.array(p[known], type=pa.string(), from_pandas=True))
        codes = names.indices.to_numpy(zero_copy_only=False)
        for code, product in enumerate(names.dictionary.to_pylist()):
            tree, _ = self._tree(product)
            if tree is None:
                continue
            rows = known[codes == code]
            chord, _ = tree.query(_unit(la[rows], lo[rows]), k=1)
            out[rows] = 2 * EARTH_RADIUS_KM * np.arcsin(np.clip(np.asarray(chord) / 2, 0.0, 1.0))
        return out.reshape(shape)


def preload_search() -> None:
    """Start importing SciPy's k-d tree in the background (``engine.preload``)."""
    preload("store-search", lambda: __import__("scipy.spatial"))


def _unit(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Points on the unit sphere: the chord between two is monotone in their great-circle
    distance, so the Euclidean nearest neighbour is the nearest on the Earth."""
    phi, lmb = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(phi) * np.cos(lmb), np.cos(phi) * np.sin(lmb), np.sin(phi)], axis=-1)


EMPTY = ReferenceData()


def load_reference(path: str | Path) -> ReferenceData:
    """Reference data from a YAML file: ``tables:`` maps each table's name to its rows, or to
    ``{file: PATH}`` (YAML, JSON, CSV or Parquet, relative to the file)."""
    p = Path(path)
    try:
        document = load_yaml(p.read_text())
    except OSError as exc:
        raise ReferenceDataError(f"{p}: cannot read reference file: {exc.strerror}") from exc
    if not isinstance(document, Mapping) or set(document) != {"tables"}:
        raise ReferenceDataError(f"{p}: expected a mapping with one key, 'tables'")
    tables: dict[str, pa.Table] = {}
    problems: list[str] = []
    for name, entry in (document["tables"] or {}).items():
        try:
            if isinstance(entry, Mapping) and "file" in entry:
                source = p.parent / str(entry["file"])
                fmt = _format_of(source)
                tables[str(name)] = read_table(str(name), source.read_bytes(), fmt)
            else:
                tables[str(name)] = table_of_rows(str(name), entry)
        except OSError as exc:
            problems.append(f"{p}: reference table '{name}': cannot read: {exc.strerror}")
        except ReferenceDataError as exc:
            problems.extend(f"{p}: {problem}" for problem in exc.problems)
    if problems:
        raise ReferenceDataError(problems[0], problems)
    try:
        return ReferenceData(tables)
    except ReferenceDataError as exc:
        raise ReferenceDataError(
            f"{p}: {exc.problems[0]}", [f"{p}: {q}" for q in exc.problems]
        ) from exc


FORMATS = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def _format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ReferenceDataError(
            f"{path}: unknown file type '{path.suffix}'; use one of {', '.join(FORMATS)}"
        )
    return fmt
