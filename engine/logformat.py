"""The ingest log's messages: a request's events as the API replica validated them, or the
inbound decisions the API answered.

An events message holds the request's valid events as an Arrow IPC stream (the raw schema, LZ4
compressed), each event's index in the request (dead letters name it), and the dead letters of
the events the replica refused (they are written to the dead-letter log when the gateway
consumes the message, so they are as durable as the events). msgpack around the three.
Decoding refuses anything else with ``EventError``: the log is read by the gateway only, but a
message someone else put on the subject must not stop it.

A decisions message holds decision-log rows (Arrow IPC, ``DECISION_SCHEMA``) of ``POST
/v1/decide`` answers: written before the answer, read back in order with the events, so the
contact history and the decision log after a restore hold every decision answered 200.

An idle mark says the stream went quiet at this place: the gateway writes one when it has had
nothing to read for ``idle_release_ms``, and releases the watermark only when it reads the mark
back. Which events are late then depends on the log alone, so a replay after a crash makes the
same events late as the run before it did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np
import pyarrow as pa
from pyarrow import ipc

from engine.errors import EventError
from engine.events.deadletter import DeadLetter

#: 2: events name customers by key (``engine.ingest.keyed``); 1 (by identifier) is still read
VERSION = 2
READABLE = (1, 2)
_OPTIONS = ipc.IpcWriteOptions(compression="lz4")


@dataclass(frozen=True)
class LogMessage:
    """A decoded message: events (with their request indexes and the request's dead letters),
    inbound decisions, or an idle mark (the stream went quiet here)."""

    events: pa.Table | None = None
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    letters: list[DeadLetter] = field(default_factory=list)
    decisions: pa.Table | None = None
    idle: bool = False


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=_OPTIONS) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def encode_message(
    events: pa.RecordBatch | pa.Table, positions: np.ndarray, letters: Sequence[DeadLetter]
) -> bytes:
    """The log message of one request's events (see the module's docstring)."""
    table = events if isinstance(events, pa.Table) else pa.Table.from_batches([events])
    return msgpack.packb(
        {
            "v": VERSION,
            "events": _ipc(table),
            "positions": np.asarray(positions, dtype="<i8").tobytes(),
            "letters": [[d.index, d.reason, d.field, d.value, d.event_id, d.kind] for d in letters],
        }
    )


def encode_decisions(decisions: pa.Table) -> bytes:
    """The log message of inbound decisions (decision-log rows)."""
    return msgpack.packb({"v": VERSION, "decisions": _ipc(decisions)})


def encode_idle() -> bytes:
    """The log message that marks a quiet spell: the engine releases its watermark when it
    reads it, at the same place in the stream on every replay (``Ingestor.close_idle``)."""
    return msgpack.packb({"v": VERSION, "idle": True})


def decode_message(data: bytes) -> LogMessage:
    """A log message, either kind; ``EventError`` if it is not one."""
    try:
        doc = msgpack.unpackb(data)
        if not isinstance(doc, dict) or doc.get("v") not in READABLE:
            version = doc.get("v") if isinstance(doc, dict) else None
            raise EventError(f"log message version {version!r} is not one of {READABLE}")
        if doc.get("idle") is True:
            return LogMessage(idle=True)
        if "decisions" in doc:
            return LogMessage(decisions=ipc.open_stream(pa.py_buffer(doc["decisions"])).read_all())
        table = ipc.open_stream(pa.py_buffer(doc["events"])).read_all()
        positions = np.frombuffer(doc["positions"], dtype="<i8").astype(np.int64)
        letters = [DeadLetter(*row) for row in doc["letters"]]
    except EventError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, pa.ArrowException) as exc:
        raise EventError(f"not a Kairos log message: {type(exc).__name__}: {exc}"[:300]) from exc
    if positions.size != table.num_rows:
        raise EventError("log message: positions and events differ in length")
    return LogMessage(table, positions, letters)
