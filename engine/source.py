"""Sources: offset-addressable, replayable streams of raw events.

A source is read in order from a *position* (an integer: a row of a file, a JetStream stream
sequence, a Kafka offset) and can be sent back to any position a kept checkpoint names. This is
all the engine asks of an input, so another broker is one more class with these four methods
(``seek``, ``read``, ``exhausted``, ``release``), and nothing else changes.

Positions are the source's own: a checkpoint stores the position to resume from (the position
after the last record applied) together with the source's ``name``, and ``kairos replay
--resume`` refuses to resume another source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa

from engine.errors import SourceError
from engine.events.deadletter import DeadLetter


@dataclass(frozen=True)
class SourceBatch:
    """A stretch of a source: its raw events and the positions around it."""

    events: pa.Table
    #: per event, the index its dead letter names (a file's line, an index in a request)
    positions: np.ndarray
    #: the source position of the stretch's first record
    start: int
    #: the position after its last record: where reading resumes
    end: int
    #: records of the stretch that could not be read (dead-lettered, not applied)
    letters: Sequence[DeadLetter] = field(default_factory=list)
    #: inbound decisions recorded in the stretch (a log holds them; see engine.logformat),
    #: handed to the engine after the stretch's events
    decisions: pa.Table | None = None
    #: the stretch ends with an idle mark: release the watermark after its events
    idle: bool = False


class Source(Protocol):
    """A replayable input of the engine (see the module's docstring)."""

    #: what the source is (a file and its size, a stream): a checkpoint records it
    name: str

    @property
    def position(self) -> int:
        """The position of the next record ``read`` returns."""
        ...

    def seek(self, position: int) -> None:
        """Read from ``position`` on (a checkpoint's); SourceError if it is gone."""
        ...

    def read(self, max_events: int) -> SourceBatch | None:
        """The next records, about ``max_events`` events; None when nothing is there now."""
        ...

    @property
    def exhausted(self) -> bool:
        """A bounded source read to its end (a live source never is)."""
        ...

    def release(self, position: int) -> None:
        """Records below ``position`` are behind every kept checkpoint: the source may drop
        them (a log trims them; a file keeps them)."""
        ...


class TableSource:
    """The events of a file (Parquet, NDJSON) or a table; the position is the row.

    ``lines`` are the rows' line numbers in the file (dead letters name them); ``letters``
    are the lines that could not be read, dead-lettered with the stretch that starts at 0.
    """

    def __init__(
        self,
        table: pa.Table,
        name: str,
        lines: np.ndarray | None = None,
        letters: Sequence[DeadLetter] = (),
    ) -> None:
        self.table = table
        self.name = f"{name} ({table.num_rows} rows)"
        self.lines = np.arange(table.num_rows) if lines is None else np.asarray(lines)
        self.letters = list(letters)
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    def seek(self, position: int) -> None:
        if not 0 <= position <= self.table.num_rows:
            raise SourceError(f"{self.name}: position {position} is outside the file")
        self._position = position

    def read(self, max_events: int) -> SourceBatch | None:
        start = self._position
        if start >= self.table.num_rows:
            return None
        end = min(start + max(max_events, 1), self.table.num_rows)
        self._position = end
        return SourceBatch(
            self.table.slice(start, end - start),
            self.lines[start:end],
            start,
            end,
            self.letters if start == 0 else [],
        )

    @property
    def exhausted(self) -> bool:
        return self._position >= self.table.num_rows

    def release(self, position: int) -> None:
        """A file keeps every row."""
