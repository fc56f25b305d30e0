"""The ingest log's message: one request's events as the API replica validated them.

A message holds the request's valid events as an Arrow IPC stream (the raw schema, LZ4
compressed), each event's index in the request (dead letters name it), and the dead letters of
the events the replica refused (they are written to the dead-letter log when the gateway
consumes the message, so they are as durable as the events). msgpack around the three.
Decoding refuses anything else with ``EventError``: the log is read by the gateway only, but a
message someone else put on the subject must not stop it.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack
import numpy as np
import pyarrow as pa
from pyarrow import ipc

from engine.errors import EventError
from engine.events.deadletter import DeadLetter

VERSION = 1
_OPTIONS = ipc.IpcWriteOptions(compression="lz4")


def encode_message(
    events: pa.RecordBatch | pa.Table, positions: np.ndarray, letters: Sequence[DeadLetter]
) -> bytes:
    """The log message of one request (see the module's docstring)."""
    table = events if isinstance(events, pa.Table) else pa.Table.from_batches([events])
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=_OPTIONS) as writer:
        writer.write_table(table)
    return msgpack.packb(
        {
            "v": VERSION,
            "events": sink.getvalue().to_pybytes(),
            "positions": np.asarray(positions, dtype="<i8").tobytes(),
            "letters": [[d.index, d.reason, d.field, d.value, d.event_id, d.kind] for d in letters],
        }
    )


def decode_message(data: bytes) -> tuple[pa.Table, np.ndarray, list[DeadLetter]]:
    """(events, their request indexes, dead letters) of a log message."""
    try:
        doc = msgpack.unpackb(data)
        if doc.get("v") != VERSION:
            raise EventError(f"log message version {doc.get('v')!r} is not {VERSION}")
        table = ipc.open_stream(pa.py_buffer(doc["events"])).read_all()
        positions = np.frombuffer(doc["positions"], dtype="<i8").astype(np.int64)
        letters = [DeadLetter(*row) for row in doc["letters"]]
    except EventError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, pa.ArrowException) as exc:
        raise EventError(f"not a Kairos log message: {type(exc).__name__}: {exc}"[:300]) from exc
    if positions.size != table.num_rows:
        raise EventError("log message: positions and events differ in length")
    return table, positions, letters
