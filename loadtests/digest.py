"""Digest of a run's outputs: the same stream must give the same triggers and decisions.

    python loadtests/digest.py kairos-data            # after `kairos replay ... --out kairos-data`

Reads the trigger and decision logs under a data folder (the layout `kairos replay` and
`kairos serve` write), puts their rows in a canonical order and prints, per log, the row
count, counts per rule / action and a SHA-256 of the rows. Two runs of the same stream (before
and after a refactoring, on 1 or 4 shards, with or without a crash and recovery) must print
the same digests. Wall-clock columns are left out; everything else counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

#: per log: the folder, the columns that order its rows, the column counted by value
LOGS = {
    "triggers": ("triggers", ["ts", "event_id", "rule_id", "customer_key", "seq"], "rule_id"),
    "decisions": ("decisions", ["ts", "decision_id"], "action"),
}


def _read(folder: Path) -> pa.Table | None:
    """Every committed file under ``folder`` (pending ones, ``_pending-*``, are not output)."""
    files = sorted(str(p) for p in folder.rglob("*.parquet") if not p.name.startswith("_"))
    if not files:
        return None
    return ds.dataset(files, format="parquet", partitioning="hive").to_table()


def digest(table: pa.Table, order: list[str], count_by: str) -> dict[str, Any]:
    """Row count, counts by ``count_by`` and a SHA-256 of the rows in ``order``."""
    table = table.sort_by([(c, "ascending") for c in order])
    sha = hashlib.sha256()
    for name in sorted(table.column_names):
        if name == "day":  # the hive partition column repeats ``ts``
            continue
        sha.update(name.encode())
        sha.update(repr(table.column(name).to_pylist()).encode())
    counts = Counter(table.column(count_by).to_pylist())
    return {"rows": table.num_rows, "by": dict(sorted(counts.items())), "sha256": sha.hexdigest()}


def digests(data_dir: Path, run: str | None = None) -> dict[str, Any]:
    """The digest of each log under ``data_dir`` (of one run's folders when ``run`` is named)."""
    out: dict[str, Any] = {}
    for name, (folder, order, count_by) in LOGS.items():
        table = _read(data_dir / folder / run if run else data_dir / folder)
        out[name] = None if table is None else digest(table, order, count_by)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    args = parser.parse_args()
    print(json.dumps(digests(args.data_dir), indent=1))


if __name__ == "__main__":
    main()
