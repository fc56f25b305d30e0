"""Crash anywhere, restore, rescale: the pipeline over the Ray-free engine always ends where a run
without faults ends.

A Hypothesis state machine publishes batches to an in-memory log (duplicates and late events
included), lets the pipeline read them, takes checkpoints, crashes the engine (every shard and the
ingest position lost; outputs kept, like files) and recovers, and moves the engine onto another
shard count from the last checkpoint. At the end (and after every step, for the prefix the
engine has applied) triggers, decisions and golden records equal one plain ``LocalEngine`` fed
the log's batches once, in order: each acknowledged event applied exactly once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.clock import ManualClock
from engine.events.codec import rows_to_batch
from engine.local import LocalEngine
from engine.pipeline import Pipeline
from engine.source import SourceBatch
from tests.property.test_rules_match_reference import decisions_of, streams
from tests.property.test_snapshot_restore import _engine, _records
from tests.pure import examples

#: a log entry that is an idle mark (``engine.logformat.encode_idle``), not a batch
IDLE = "idle"


class MemoryLog:
    """A live source over a list of published batches (and idle marks); the position is the
    entry's index."""

    name = "memory"

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]] | str] = []
        self._position = 0
        self.trimmed = 0

    @property
    def position(self) -> int:
        return self._position

    def seek(self, position: int) -> None:
        assert position >= self.trimmed, "the log was trimmed above a kept checkpoint"
        self._position = position

    def read(self, max_events: int) -> SourceBatch | None:
        if self._position >= len(self.batches):
            return None
        rows = self.batches[self._position]
        self._position += 1
        if rows == IDLE:
            return SourceBatch(
                pa.table({}), np.zeros(0, np.int64), self._position - 1, self._position, idle=True
            )
        batch, positions, letters = rows_to_batch(rows)
        return SourceBatch(
            pa.Table.from_batches([batch]), positions, self._position - 1, self._position, letters
        )

    @property
    def exhausted(self) -> bool:
        return False

    def release(self, position: int) -> None:
        self.trimmed = max(self.trimmed, position)


def _with_faults(events: list[dict[str, Any]], data: st.DataObject) -> list[dict[str, Any]]:
    """Resend some events (duplicates) and move some back in time (late ones)."""
    out = []
    for e in events:
        out.append(e)
        if data.draw(st.integers(0, 9)) == 0:
            out.append(dict(e))  # a duplicate: the same event id again
        if data.draw(st.integers(0, 19)) == 0:
            late = dict(e, event_id=e["event_id"] + 10_000, ts=e["ts"] - 3 * 86_400_000)
            out.append(late)
    return out


def _reference(batches: list[list[dict[str, Any]] | str]) -> LocalEngine:
    """A plain engine fed ``batches`` once each, in order (the batches matter: an event may
    come after one with a later time that was already released by the watermark), releasing
    its watermark at each idle mark."""
    reference = _engine(2)
    for batch in batches:
        if batch == IDLE:
            reference.release_watermark()
        elif batch:
            reference.submit_rows(batch)
    return reference


class Recovery(RuleBasedStateMachine):
    @initialize(events=streams(), shards=st.sampled_from([1, 2, 3]), data=st.data())
    def start(self, events: list[dict[str, Any]], shards: int, data: st.DataObject) -> None:
        import tempfile

        self.folder = tempfile.TemporaryDirectory()
        self.events = _with_faults(events, data)
        self.published = 0
        self.log = MemoryLog()
        self.clock = ManualClock()
        self.shards = shards
        self.engine = self._new_engine(shards)
        self.pipeline = self._pipeline(self.engine)
        self.pipeline.start()
        self.crashes = 0

    def _pipeline(self, engine: LocalEngine) -> Pipeline:
        # crashes in a row without a step are this test's doing, not a failing stretch
        return Pipeline(self.log, engine, None, self.clock, max_attempts=10_000)

    def _new_engine(self, shards: int) -> LocalEngine:
        engine = _engine(shards)
        engine.checkpoint_root = self.folder.name
        return engine

    @rule(n=st.integers(1, 30))
    @precondition(lambda self: self.published < len(self.events))
    def publish(self, n: int) -> None:
        self.log.batches.append(self.events[self.published : self.published + n])
        self.published = min(self.published + n, len(self.events))

    @rule()
    def go_quiet(self) -> None:
        """The gateway found the log quiet and marked it: the release happens where the mark
        is, in the first run and in every replay."""
        self.log.batches.append(IDLE)

    @rule()
    def step(self) -> None:
        self.pipeline.step()

    @rule()
    def checkpoint(self) -> None:
        self.pipeline.checkpoint()

    @rule()
    @precondition(lambda self: not self.pipeline.checkpoint_in_flight)
    def begin_checkpoint(self) -> None:
        """A periodic checkpoint begins: its cut is taken now and it is completed by the next
        step, after that step's stretch is applied (which must not be in it), unless a crash
        comes first (then it is never used)."""
        self.pipeline.begin_checkpoint()

    @rule()
    def crash(self) -> None:
        """The process dies: state in memory is gone; outputs (files) stay."""
        self.engine.lose_state()
        self.pipeline.recover(RuntimeError("killed"))
        self.crashes += 1

    @rule()
    @precondition(lambda self: self.log.position < len(self.log.batches))
    def step_fails_halfway(self) -> None:
        """The last shard raises (not a lost worker: a call that timed out, a bug) after the
        others applied their part of the stretch: the pipeline recovers and reads it again."""
        shard = self.engine.shards[-1]
        apply = shard.apply

        def fail_once(*args: Any, **kwargs: Any) -> Any:
            shard.apply = apply  # type: ignore[method-assign]
            raise RuntimeError("a call timed out")

        shard.apply = fail_once  # type: ignore[method-assign]
        self.pipeline.step()
        shard.apply = apply  # type: ignore[method-assign]

    @rule(shards=st.sampled_from([1, 2, 4]))
    def rescale(self, shards: int) -> None:
        """Stop without a checkpoint and start on another shard count from CURRENT."""
        engine = self._new_engine(shards)
        old = self.engine
        # the outputs committed so far are files; they carry over
        engine.triggers, engine.decisions = old.triggers, old.decisions
        engine.dead_letters, engine.failed = old.dead_letters, old.failed
        engine._marks = old._marks  # noqa: SLF001 - the files' commit marks
        self.engine = engine
        self.pipeline = self._pipeline(engine)
        self.pipeline.start()

    @invariant()
    def the_applied_prefix_is_the_reference(self) -> None:
        if not hasattr(self, "pipeline"):
            return
        reference = _reference(self.log.batches[: self.log.position])
        assert self.engine.trigger_table().equals(reference.trigger_table())
        assert decisions_of(self.engine) == decisions_of(reference)

    def teardown(self) -> None:
        if not hasattr(self, "pipeline"):
            return
        rest = self.events[self.published :]
        if rest:
            self.log.batches.append(rest)
        while self.log.position < len(self.log.batches):
            self.pipeline.step()
        self.engine.end_stream()
        reference = _reference(self.log.batches)
        reference.end_stream()
        assert self.engine.trigger_table().equals(reference.trigger_table())
        assert decisions_of(self.engine) == decisions_of(reference)
        customers = {e["customer_id"] for e in self.events}
        assert _records(self.engine, customers) == _records(reference, customers)
        assert sorted(d.event_id for d in self.engine.dead_letters) == sorted(
            d.event_id for d in reference.dead_letters
        )
        self.folder.cleanup()


Recovery.TestCase.settings = settings(
    max_examples=examples(30),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_recovery = Recovery.TestCase


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams(), cut=st.integers(1, 40), crash=st.booleans())
def test_an_asynchronous_checkpoint_holds_its_cut_only(
    events: list[dict[str, Any]], cut: int, crash: bool
) -> None:
    """A checkpoint begun at a cut is written after the next stretch has been applied (as a
    shard writes its snapshot while it goes on): restored after a crash, the engine holds the
    cut and nothing of the stretch, which is then replayed once. Fails if the snapshot shares
    memory with the live golden records."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        log = MemoryLog()
        engine = _engine(2)
        engine.checkpoint_root = folder
        pipeline = Pipeline(log, engine, None, ManualClock())
        pipeline.start()
        log.batches.append(events[:cut])
        pipeline.step()
        pipeline.begin_checkpoint()
        log.batches.append(events[cut:])
        if crash:  # before the checkpoint completes: it is never used, the cut is taken again
            engine.lose_state()
            pipeline.recover(RuntimeError("killed"))
            assert pipeline.epoch == 1 and log.position == 0
            pipeline.step()
            pipeline.begin_checkpoint()
        pipeline.step()  # the stretch after the cut, then the checkpoint completes
        assert pipeline.epoch == 2 and not pipeline.checkpoint_in_flight
        engine.lose_state()
        pipeline.recover(RuntimeError("killed"))
        assert log.position == 1
        while log.position < len(log.batches):
            pipeline.step()
        reference = _reference(log.batches)
        customers = {e["customer_id"] for e in events}
        assert _records(engine, customers) == _records(reference, customers)
        assert engine.trigger_table().equals(reference.trigger_table())
