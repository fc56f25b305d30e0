"""Pipeline: a source into an engine, with periodic checkpoints and recovery, without Ray.

The pipeline reads its ``Source`` in order and submits each stretch to the ``Engine``; every
``interval_s`` it begins a checkpoint: the engine drains its calls (an aligned cut), every shard
takes a detached snapshot and writes it while later stretches are applied, and the sinks
pre-commit. The steps after that complete it once the snapshots are written: the manifest with
the source position of the cut, CURRENT, the sinks committed (Flink's asynchronous snapshots;
one checkpoint in flight at a time). A clean stop and the end of a bounded source take one and
wait for it. The source may then drop what is behind the oldest kept checkpoint.

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

    def begin_checkpoint(self, epoch: int, extra: Mapping[str, Any]) -> None:
        """The barrier of checkpoint ``epoch`` (``extra`` goes into its manifest): an aligned
        cut of every shard's state is taken now and written while the stream goes on."""
        ...

    def finish_checkpoint(self, wait: bool = False) -> Mapping[str, Any] | None:
        """Once the cut is written: the manifest, CURRENT replaced, the sinks committed;
        returns the ``extra`` of the oldest checkpoint kept, or None while the cut is still
        being written (unless ``wait``). A failure drops the checkpoint begun."""
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
    #: a checkpoint was begun and is being written (the next steps complete it)
    checkpoint_in_flight: bool = False
    _last_checkpoint: float = 0.0
    _failures_in_a_row: int = 0
    #: the epoch of the last checkpoint begun (``epoch``: the last one completed)
    _attempted: int = 0

    # -- start ------------------------------------------------------------------------------
    def start(self) -> Mapping[str, Any] | None:
        """Restore from CURRENT when there is one (and send the source to its position), else
        take checkpoint 0 of the empty engine, so a recovery always has one. Returns the
        manifest restored from."""
        document = self.engine.recover()
        if document is None:
            self.epoch = self._attempted = 0
            self.checkpoint_in_flight = False
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
        self.epoch = self._attempted = int(document["epoch"])
        self.checkpoint_in_flight = False  # a checkpoint begun before is not completed
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
        self._advance_checkpoint()
        return 0 if batch is None else batch.events.num_rows

    def _advance_checkpoint(self) -> None:
        """Complete the checkpoint being written once it is, or begin one when it is due
        (never two at once). If its storage fails, the previous one stays CURRENT (nothing
        behind it is released from the source) and the next try is an interval later; the
        failure is kept in ``checkpoint_error`` (a service stops acknowledging meanwhile)."""
        try:
            if self.checkpoint_in_flight:
                self._finish_checkpoint(wait=False)
            elif self.interval_s is not None and self._since_checkpoint() >= self.interval_s:
                self.begin_checkpoint()
        except (OSError, pa.ArrowException) as exc:
            self._last_checkpoint = self.clock.monotonic()
            self.checkpoint_error = f"{type(exc).__name__}: {exc}"[:500]
            log.error("checkpoint %d failed; checkpoint %d stays CURRENT: %s",
                      self._attempted, self.epoch, self.checkpoint_error)  # fmt: skip

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
        """A checkpoint of everything read so far, CURRENT when this returns (the one being
        written, if any, is completed first)."""
        if self.checkpoint_in_flight:
            try:
                self._finish_checkpoint(wait=True)
            except (OSError, pa.ArrowException) as exc:  # this one tries again, from now
                self.checkpoint_error = f"{type(exc).__name__}: {exc}"[:500]
        self.begin_checkpoint()
        self._finish_checkpoint(wait=True)

    def begin_checkpoint(self) -> None:
        """Begin a checkpoint of everything read so far; later steps complete it (or
        ``checkpoint``). Its epoch is new even if an earlier attempt failed without a
        recovery: that attempt's sink files carry its number and are committed with this one."""
        epoch = max(self._attempted, self.epoch) + 1
        extra = {
            **(self.manifest_extra() if self.manifest_extra is not None else {}),
            "source": {"name": self.source.name, "position": self.source.position},
        }
        self._attempted = epoch
        self._last_checkpoint = self.clock.monotonic()
        self.engine.begin_checkpoint(epoch, extra)
        self.checkpoint_in_flight = True

    def _finish_checkpoint(self, wait: bool) -> bool:
        try:
            oldest = self.engine.finish_checkpoint(wait)
        except BaseException:
            self.checkpoint_in_flight = False
            raise
        if oldest is None:
            return False
        self.checkpoint_in_flight = False
        self.epoch = self._attempted
        self.checkpoint_error = None
        position = oldest.get("source", {}).get("position")
        if position is not None:
            self.source.release(int(position))
        return True

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
