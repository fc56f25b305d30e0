"""Pipeline: a source into an engine, with periodic checkpoints and recovery, without Ray.

The pipeline reads its ``Source`` in order and submits each stretch to the ``Engine``; every
``interval_s`` (and at the end of a bounded source) it takes a checkpoint: the engine drains its
calls (an aligned cut), snapshots every shard, pre-commits its sinks, writes the manifest with
the source position after the last record submitted, makes it CURRENT and commits the sinks.
The source may then drop what is behind the oldest kept checkpoint.

When a worker dies (``WorkerLostError``), or the engine raises anything else in the middle of a
stretch (``StretchFailedError``: it may hold part of it, and the source has moved past it), the
engine restores every shard from CURRENT, its sinks drop what they wrote after it, and the
source is sent back to CURRENT's position: the stretch since the checkpoint is applied again,
once, with the same results (the engine is deterministic given its input order).
``actors.supervisor.Supervisor`` on Ray and ``LocalEngine`` both implement ``Engine``; this class
is the same for both, so the recovery logic is tested without Ray
(``tests/property/test_recovery.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from engine.clock import Clock, SystemClock
from engine.errors import SourceError, StretchFailedError, WorkerLostError
from engine.events.deadletter import DeadLetter
from engine.source import Source

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What a pipeline drives: ``actors.supervisor.Supervisor`` on Ray, ``LocalEngine`` here."""

    def submit(self, batch: pa.Table, positions: np.ndarray) -> list[DeadLetter]: ...

    def reject(self, letters: list[DeadLetter]) -> None: ...

    def record_decisions(self, decisions: pa.Table) -> None:
        """Inbound decisions read from the source (see ``ShardLogic.record_inbound``): their
        contacts are recorded where a restore lost them, and they go to the decision log."""
        ...

    def release_watermark(self) -> Any:
        """The stream went quiet here (an idle mark read from the source): close the watermark
        up to the newest event and apply what it releases."""
        ...

    def poll(self, source_idle: bool | None = None) -> None:
        """Deadlines of open micro-batches, finished calls, and an idle release once the
        source has had nothing to read (``source_idle``) for a while."""
        ...

    def end_stream(self) -> None: ...

    def checkpoint(self, epoch: int, extra: Mapping[str, Any]) -> Mapping[str, Any]:
        """Take checkpoint ``epoch`` with ``extra`` in its manifest, make it CURRENT, commit
        the sinks; returns the ``extra`` of the oldest checkpoint kept."""
        ...

    def recover(self) -> Mapping[str, Any] | None:
        """Restore every shard and sink from CURRENT; its manifest (None: there is none and
        the engine is empty)."""
        ...


@dataclass
class Recovery:
    """One recovery: what failed, where the source went back to, how long it took."""

    error: str
    epoch: int
    position: int
    seconds: float


@dataclass
class Pipeline:
    """Drives ``engine`` from ``source`` with checkpoints every ``interval_s`` (None: only at
    the end of a bounded source) and recovery from lost workers."""

    source: Source
    engine: Engine
    interval_s: float | None = 10.0
    clock: Clock = field(default_factory=SystemClock)
    #: events per read
    chunk: int = 100_000
    #: recoveries in a row without progress before giving up
    max_attempts: int = 5
    #: more to record in every manifest (a service: the model version serving decisions)
    manifest_extra: Callable[[], Mapping[str, Any]] | None = None
    epoch: int = 0
    recoveries: list[Recovery] = field(default_factory=list)
    #: why the last periodic checkpoint failed (its storage), None once one succeeds
    checkpoint_error: str | None = None
    #: why recovery gave up (``max_attempts`` in a row), None once one succeeds: until then
    #: the engine may hold part of a stretch, and nothing more is read
    unrecovered: str | None = None
    _last_checkpoint: float = 0.0
    _failures_in_a_row: int = 0

    # -- start ------------------------------------------------------------------------------
    def start(self) -> Mapping[str, Any] | None:
        """Restore from CURRENT when there is one (and send the source to its position), else
        take checkpoint 0 of the empty engine, so a recovery always has one. Returns the
        manifest restored from."""
        document = self.engine.recover()
        if document is None:
            self.epoch = 0
            self.source.seek(0)
            self._checkpoint()
            return None
        self._resume_from(document)
        return document

    def _resume_from(self, document: Mapping[str, Any]) -> None:
        source = document.get("source", {})
        if source.get("name") not in (None, self.source.name):
            raise SourceError(
                f"the checkpoint was taken of {source.get('name')!r}, not of {self.source.name!r}"
            )
        self.epoch = int(document["epoch"])
        self.source.seek(int(source.get("position", 0)))
        self._last_checkpoint = self.clock.monotonic()

    # -- running ----------------------------------------------------------------------------
    def step(self) -> int:
        """Read and submit one stretch (or, with nothing to read, let the engine poll); take a
        checkpoint when one is due. Returns the events read. Recovers from a lost worker."""
        if self.unrecovered is not None:  # recovery gave up last time: nothing read on
            self.recover(WorkerLostError(self.unrecovered))
        try:
            read = self._step()
        except WorkerLostError as exc:
            self.recover(exc)
            return 0
        self._failures_in_a_row = 0
        return read

    def _step(self) -> int:
        batch = self.source.read(self.chunk)  # a failing read moved nothing: raised as is
        try:
            if batch is None:
                self.engine.poll(source_idle=True)
            else:
                if batch.letters:
                    self.engine.reject(list(batch.letters))
                if batch.events.num_rows:
                    self.engine.submit(batch.events, batch.positions)
                if batch.decisions is not None and batch.decisions.num_rows:
                    self.engine.record_decisions(batch.decisions)
                if batch.idle:  # an idle mark: the release at its place in the stream
                    self.engine.release_watermark()
                self.engine.poll(source_idle=False)  # deadlines, finished calls
        except WorkerLostError:
            raise
        except Exception as exc:
            # the source has moved past this stretch and the engine may hold part of it:
            # going on would skip the rest; recover from CURRENT and read it again
            where = self.source.position if batch is None else batch.start
            raise StretchFailedError(
                f"the engine failed on the stretch from position {where}: "
                f"{type(exc).__name__}: {exc}"[:500]
            ) from exc
        if self.interval_s is not None and self._since_checkpoint() >= self.interval_s:
            self._periodic_checkpoint()
        return 0 if batch is None else batch.events.num_rows

    def _periodic_checkpoint(self) -> None:
        """A due checkpoint. If its storage fails, the previous one stays CURRENT (nothing
        behind it is released from the source) and the next try is an interval later; the
        failure is kept in ``checkpoint_error`` (a service stops acknowledging meanwhile)."""
        try:
            self._checkpoint()
        except (OSError, pa.ArrowException) as exc:
            self._last_checkpoint = self.clock.monotonic()
            self.checkpoint_error = f"{type(exc).__name__}: {exc}"[:500]
            log.error("checkpoint %d failed; checkpoint %d stays CURRENT: %s",
                      self.epoch + 1, self.epoch, self.checkpoint_error)  # fmt: skip

    def _since_checkpoint(self) -> float:
        return self.clock.monotonic() - self._last_checkpoint

    def run(self) -> None:
        """A bounded source to its end: read it all, release what waits for the watermark,
        take a last checkpoint (so ``--resume`` of a finished run does nothing)."""
        while not self.source.exhausted:
            self.step()
        while True:
            try:
                self.engine.end_stream()
                self._checkpoint()
                return
            except WorkerLostError as exc:
                self.recover(exc)
                while not self.source.exhausted:
                    self.step()

    def checkpoint(self) -> None:
        """Take a checkpoint now (a clean stop); recovers and retries after a lost worker."""
        while True:
            try:
                self._checkpoint()
                return
            except WorkerLostError as exc:
                self.recover(exc)

    def _checkpoint(self) -> None:
        epoch = self.epoch + 1
        extra = {
            **(self.manifest_extra() if self.manifest_extra is not None else {}),
            "source": {"name": self.source.name, "position": self.source.position},
        }
        oldest = self.engine.checkpoint(epoch, extra)
        self.epoch = epoch
        self.checkpoint_error = None
        self._last_checkpoint = self.clock.monotonic()
        position = oldest.get("source", {}).get("position")
        if position is not None:
            self.source.release(int(position))

    # -- recovery ---------------------------------------------------------------------------
    def _give_up(self, error: BaseException) -> None:
        """Too many failures in a row: raise. The engine may hold part of a stretch the source
        has moved past, so the next ``step`` recovers before it reads anything (a service
        keeps trying, ``max_attempts`` at a time; a replay ends with the error)."""
        self.unrecovered = f"{type(error).__name__}: {error}"[:500]
        self._failures_in_a_row = 0
        raise WorkerLostError(
            f"gave up after {self.max_attempts} recoveries in a row: {error}"
        ) from error

    def recover(self, error: BaseException) -> Recovery:
        """Restore the engine from CURRENT and send the source back to its position."""
        self._failures_in_a_row += 1
        if self._failures_in_a_row > self.max_attempts:
            self._give_up(error)
        started = self.clock.monotonic()
        log.warning("a worker was lost (%s); restoring from the last checkpoint", error)
        while True:
            try:
                document = self.engine.recover()
                break
            except Exception as again:  # a worker still restarting, storage failing: again
                self._failures_in_a_row += 1
                if self._failures_in_a_row > self.max_attempts:
                    self._give_up(again)
                log.warning("recovery failed (%s); trying again", again)
        if document is None:
            self.unrecovered = "no checkpoint to recover from"
            raise WorkerLostError("no checkpoint to recover from") from error
        self._resume_from(document)
        self.unrecovered = None
        recovery = Recovery(
            str(error), self.epoch, self.source.position, self.clock.monotonic() - started
        )
        self.recoveries.append(recovery)
        log.warning(
            "recovered from checkpoint %d in %.2f s; replaying from position %d",
            recovery.epoch, recovery.seconds, recovery.position,
        )  # fmt: skip
        return recovery
