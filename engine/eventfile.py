"""Event files: write and read Parquet (and NDJSON) event files for replay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import EventError
from engine.events.codec import rows_to_batch
from engine.events.deadletter import DeadLetter
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


@dataclass(frozen=True)
class EventFile:
    """A file's events as a raw table, and dead letters for lines that could not be read."""

    table: pa.Table
    dead_letters: list[DeadLetter]
    #: the line of each row (NDJSON), so later dead letters name the line too; None: row index
    positions: np.ndarray | None = None


def _read_ndjson(text: str) -> EventFile:
    rows: list[Any] = []
    lines: list[int] = []
    letters: list[DeadLetter] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            lines.append(number)
        except json.JSONDecodeError as exc:
            letters.append(DeadLetter(number, f"line {number}: not valid JSON: {exc.msg}"))
    batch, kept, bad = rows_to_batch(rows)
    letters += [
        DeadLetter(
            lines[d.index],
            f"line {lines[d.index]}: {d.reason}",
            d.field,
            d.value,
            d.event_id,
            d.kind,
        )
        for d in bad
    ]
    line_of = np.array(lines, dtype=np.int64)[np.asarray(kept, dtype=np.int64)]
    return EventFile(
        pa.Table.from_batches([batch]), sorted(letters, key=lambda d: d.index), line_of
    )


def read_events(uri: str) -> EventFile:
    """A Parquet or NDJSON (.ndjson/.jsonl) event file as one raw table plus its unreadable rows."""
    fs, path = resolve(uri)
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".ndjson", ".jsonl"):
            with fs.open_input_stream(path) as src:
                return _read_ndjson(src.read().decode("utf-8", errors="replace"))
        with fs.open_input_file(path) as src:
            return EventFile(pq.read_table(src, read_dictionary=["customer_id"]), [])
    except FileNotFoundError as exc:
        raise EventError(f"{uri}: no such event file") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise EventError(f"{uri}: cannot read events: {exc}") from exc


def batches(table: pa.Table, size: int) -> Iterator[pa.Table]:
    """Consecutive slices of ``size`` rows (zero-copy)."""
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)
