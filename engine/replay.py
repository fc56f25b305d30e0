"""Event files: write and read Parquet (and NDJSON) event files for replay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import EventError
from engine.events.codec import rows_to_batch
from engine.sink import resolve


def write_events(table: pa.Table, uri: str, row_group_size: int = 1_000_000) -> None:
    """Write raw events as Parquet; customer ids stay dictionary-encoded for cheap pseudonyms."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        pq.write_table(
            table,
            out,
            row_group_size=row_group_size,
            use_dictionary=["customer_id", "kind"],
            dictionary_pagesize_limit=64 << 20,
            compression="zstd",
        )


def read_events(uri: str) -> pa.Table:
    """A Parquet or NDJSON (.ndjson/.jsonl) event file as one raw table."""
    fs, path = resolve(uri)
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".ndjson", ".jsonl"):
            with fs.open_input_stream(path) as src:
                lines = src.read().decode().splitlines()
            rows = []
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        rows.append({"_line": number, "_error": str(exc)})
            batch, _, _ = rows_to_batch(rows)
            return pa.Table.from_batches([batch])
        with fs.open_input_file(path) as src:
            return pq.read_table(src, read_dictionary=["customer_id"])
    except FileNotFoundError as exc:
        raise EventError(f"{uri}: no such event file") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise EventError(f"{uri}: cannot read events: {exc}") from exc


def batches(table: pa.Table, size: int) -> Iterator[pa.Table]:
    """Consecutive slices of ``size`` rows (zero-copy)."""
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)
