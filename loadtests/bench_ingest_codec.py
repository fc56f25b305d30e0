"""What an API replica spends on one `POST /v1/events` batch, step by step, in one process.

    python loadtests/bench_ingest_codec.py                    # 10,000-event batches
    python loadtests/bench_ingest_codec.py --batch 1000 --repeat 7

The batches are Locust's (`locustfile.device_batch`: usage, locations, page views and a few
profile updates with channel lists), packed as msgpack. Each step runs as `deploy.api` runs it:
decode, rows to a raw batch, validate, pseudonymize, encode the log message. The row-by-row
conversion (``_rows_to_batch``, the path of a batch with a bad row) is timed beside the column
path in the same invocation, so their ratio holds when the machine's speed wanders. Prints one
JSON line: the median milliseconds per batch of each step, and of every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from engine.events.codec import _rows_to_batch, decode_msgpack, rows_to_batch
from engine.events.validation import conform, validate
from engine.governance.pseudonym import Pseudonymizer
from engine.ingest import keyed
from engine.logformat import encode_message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from locustfile import device_batch  # Locust's batches, beside this file


def steps(body: bytes, pseudonymizer: Pseudonymizer) -> dict[str, float]:
    """Milliseconds of each step of one request, as ``KairosApi._events`` and ``_publish``."""
    out: dict[str, float] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        out[name] = (time.perf_counter() - started) * 1000
        return result

    timed("batch_id", lambda: hashlib.sha256(body).hexdigest())
    rows = timed("decode", lambda: decode_msgpack(body))
    batch, positions, _ = timed("rows_to_batch", lambda: rows_to_batch(rows))
    timed("rows_to_batch_row_by_row", lambda: _rows_to_batch(rows))
    checked = timed("validate", lambda: validate(conform(batch), positions))
    valid = checked.valid()
    events = timed("pseudonymize", lambda: keyed(valid, pseudonymizer))
    timed("encode", lambda: encode_message(events, checked.positions[checked.keep], []))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=10_000, help="events per request")
    p.add_argument("--repeat", type=int, default=5, help="runs; each times 5 batches")
    args = p.parse_args()
    rng = random.Random(7)
    bodies = [msgpack.packb(device_batch(rng, args.batch)) for _ in range(5)]
    pseudonymizer = Pseudonymizer("bench-key-" + "x" * 22)
    steps(bodies[0], pseudonymizer)  # imports and first-call costs
    runs = []
    for _ in range(args.repeat):
        per_batch = [steps(body, pseudonymizer) for body in bodies]
        runs.append({k: round(statistics.mean(b[k] for b in per_batch), 2) for k in per_batch[0]})
    median = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    path = sum(v for k, v in median.items() if k != "rows_to_batch_row_by_row")
    print(json.dumps({
        "events_per_batch": args.batch,
        "ms_per_batch_median": median,
        "request_path_ms": round(path, 2),
        "column_path_speedup": round(
            median["rows_to_batch_row_by_row"] / median["rows_to_batch"], 2),
        "runs": runs,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
