"""Router: ingest raw batches and carry out the micro-batcher's calls on the shard actors.

Runs in the caller's process (driver, job or gateway). What to send where and when is decided by
``engine.batcher.MicroBatcher`` (size, deadline, calls in flight, idle release), which is pure
and tested with a ``ManualClock``; this class only turns its ``Send`` s into actor calls with
``ray.wait`` / ``ray.get``. A micro-batch is a list of the ingestor's per-shard batches, sent as
they are: the driver copies an event's payload once, when it routes it. Trigger and decision
tables go from the shard straight to the sinks as object refs.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from engine.batcher import MicroBatcher, RouterStats, Send
from engine.clock import Clock, SystemClock
from engine.decision.response import offer_responses, response_table
from engine.errors import WorkerLostError
from engine.events.deadletter import DeadLetter, dead_letter_table
from engine.ingest import Ingestor
from engine.sink import ParquetSink

__all__ = ["Router", "RouterStats"]
log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    stats_ref: ray.ObjectRef
    triggers_ref: ray.ObjectRef
    decisions_ref: ray.ObjectRef
    opened: float


class Router:
    """Feeds shard actors with micro-batches and the sinks with their triggers and decisions."""

    def __init__(
        self,
        ingestor: Ingestor,
        shards: list[Any],
        sink: Any | None = None,
        clock: Clock | None = None,
        dead_letter_sink: ParquetSink | None = None,
        decision_sink: Any | None = None,
        response_sink: ParquetSink | None = None,
        observer: Callable[[int, dict[str, Any], float], None] | None = None,
        idle_release_ms: float | None = None,
    ) -> None:
        """``observer(shard, shard_stats, latency_ms)`` is told of every finished call;
        ``idle_release_ms`` (a live service) releases the watermark when input goes quiet."""
        self.ingestor = ingestor
        self.observer = observer
        self.decision_sink = decision_sink
        #: offer responses as they are ingested: what retraining joins the decision log with
        self.response_sink = response_sink
        self.settings = ingestor.settings
        self.shards = shards
        self.sink = sink
        self._clock = clock or SystemClock()
        self._idle_release_ms = idle_release_ms
        #: called instead of releasing when input goes quiet (behind a log: write an idle mark
        #: there, ``LogSource.mark_idle``; the release comes when it is read back); False: not
        #: quiet after all (a request is still on its way), ask again at the next poll
        self.on_idle: Callable[[], bool] | None = None
        self.reset()
        #: the first dead letters, for display; all of them go to ``dead_letter_sink``
        self.dead_letters: list[DeadLetter] = []
        self._keep_dead_letters = 1_000
        self.dead_letter_sink = dead_letter_sink

    def reset(
        self, counters: dict[str, Any] | None = None, incarnations: list[str] | None = None
    ) -> None:
        """Forget every open micro-batch and call in flight (a recovery: the shards were
        restored to a checkpoint) and start from a checkpoint's ``counters``. ``incarnations``
        are the shards' now: a finished call from another incarnation means the shard restarted
        (empty) since, and raises WorkerLostError."""
        self.batcher = MicroBatcher(
            len(self.shards),
            self.settings.micro_batch_max_events,
            self.settings.micro_batch_deadline_ms,
            self.settings.max_in_flight_per_shard,
            self._clock,
            self._idle_release_ms,
        )
        self._in_flight: list[deque[_InFlight]] = [deque() for _ in self.shards]
        self.stats = RouterStats.from_counters(counters or {})
        self.incarnations = incarnations

    # -- input --------------------------------------------------------------------------------
    def submit(
        self, batch: pa.RecordBatch | pa.Table, positions: np.ndarray | list[int] | None = None
    ) -> list[DeadLetter]:
        """Ingest one raw batch; sends every micro-batch that fills up. Returns dead letters."""
        before = self.ingestor.watermark_ms  # what a call that leaves this batch's events
        result = self.ingestor.ingest(batch, positions)  # for later carries (Send.behind)
        self._record_rejects(result.dead_letters)
        self.stats.ingested += result.accepted
        if self.response_sink is not None and result.accepted:
            responses = response_table(result.routed)
            self.stats.responses += offer_responses(responses)
            if responses.num_rows:
                self.response_sink.write(responses)
        self._carry_out(self.batcher.add(result.parts), before)
        self._harvest(block=False)
        return result.dead_letters

    def reject(self, letters: list[DeadLetter]) -> None:
        """Dead-letter events rejected before ingest (unreadable lines of a file, say)."""
        self._record_rejects(letters)

    def _record_rejects(self, letters: list[DeadLetter]) -> None:
        self.stats.rejected += len(letters)
        for letter in letters:
            self.stats.rejected_by_reason[letter.reason.split(":")[0].split(" ")[0]] += 1
        room = self._keep_dead_letters - len(self.dead_letters)
        if room > 0:
            self.dead_letters.extend(letters[:room])
        if letters and self.dead_letter_sink is not None:
            self.dead_letter_sink.write(dead_letter_table(letters))

    def poll(self, source_idle: bool | None = None) -> None:
        """Send micro-batches whose deadline has passed, release the watermark if input went
        quiet (a service; ``MicroBatcher.poll``), and collect finished calls."""
        poll = self.batcher.poll(source_idle)
        self._carry_out(poll.sends)
        if poll.release_idle:
            if self.on_idle is not None:  # behind a log: the release comes when it is read
                if not self.on_idle():
                    self.batcher.idle_declined()
            else:
                self.release_watermark()
        self._harvest(block=False)

    # -- shard calls --------------------------------------------------------------------------
    def _carry_out(self, sends: list[Send], before: int | None = None) -> None:
        """Make the calls of ``sends``; a call ``behind`` the batch just added carries the
        watermark from before it (``before``), every other the ingestor's current one."""
        for send in sends:
            queue = self._in_flight[send.shard]
            for _ in range(send.wait):  # backpressure: the batcher counted these finished
                self._finish(send.shard, queue.popleft())
            shard = self.shards[send.shard]
            if send.final:  # end of stream: release everything still waiting for the watermark
                triggers_ref, decisions_ref, stats_ref = shard.end_stream.remote()
            else:
                watermark = self.ingestor.watermark_ms
                if send.behind and before is not None:
                    watermark = before
                triggers_ref, decisions_ref, stats_ref = shard.apply.remote(send.parts, watermark)
            queue.append(_InFlight(stats_ref, triggers_ref, decisions_ref, send.opened))

    def _finish(self, shard: int, call: _InFlight) -> None:
        try:
            stats = ray.get(call.stats_ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise WorkerLostError(f"shard {shard} was lost: {type(exc).__name__}") from exc
        if self.incarnations is not None and stats["incarnation"] != self.incarnations[shard]:
            raise WorkerLostError(f"shard {shard} restarted since the last checkpoint")
        latency_ms = (self.batcher.clock.monotonic() - call.opened) * 1000
        self.stats.finished(stats, latency_ms)
        if self.observer is not None:
            self.observer(shard, stats, latency_ms)
        if stats["triggers"] and self.sink is not None:
            self.sink.write.remote(call.triggers_ref)
        if stats["decisions"] and self.decision_sink is not None:
            self.decision_sink.write.remote(call.decisions_ref)
        failed = stats.get("failed")
        if failed is not None and failed.num_rows:
            log.error("shard %d: %d events of a failed step dead-lettered: %s", shard,
                      failed.num_rows, failed.column("reason")[0])  # fmt: skip
            if self.dead_letter_sink is not None:
                self.dead_letter_sink.write(failed)

    def _harvest(self, block: bool) -> None:
        for shard, queue in enumerate(self._in_flight):
            while queue:
                ready, _ = ray.wait([queue[0].stats_ref], timeout=None if block else 0)
                if not ready:
                    break
                self._finish(shard, queue.popleft())
                self.batcher.finished(shard)

    # -- end of stream ------------------------------------------------------------------------
    def drain(self) -> None:
        """Send every open micro-batch and wait for all calls."""
        self._carry_out(self.batcher.close_open())
        self._harvest(block=True)

    def release_watermark(self) -> None:
        """The input went quiet: close the watermark up to the newest event and let every
        shard apply what it holds (see ``Ingestor.close_idle``); waits for them."""
        self.ingestor.close_idle()
        self._carry_out(self.batcher.close_every_shard())
        self._harvest(block=True)

    @property
    def queue_depth(self) -> list[int]:
        """Calls in flight per shard."""
        return self.batcher.in_flight

    def write_logs(self) -> None:
        """Write what the sinks buffer (triggers, decisions, responses, dead letters), so readers
        see everything so far. Applies nothing: works while shards or the ranker stop."""
        if self.response_sink is not None:
            self.response_sink.write_buffered()
        if self.dead_letter_sink is not None:
            self.dead_letter_sink.write_buffered()
        sinks = (self.decision_sink, self.sink)
        ray.get([s.write_buffered.remote() for s in sinks if s is not None])

    def end_stream(self, write_logs: bool = True) -> dict[str, Any]:
        """End of stream: shards release everything pending; every log is written (unless a
        checkpoint is to commit them). Returns the trigger sink's summary."""
        self._carry_out(self.batcher.end_stream())
        self._harvest(block=True)
        if write_logs:
            self.write_logs()
        if self.sink is not None:
            return dict(ray.get(self.sink.summary.remote()))
        return {}
