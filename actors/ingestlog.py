"""The durable ingest log on NATS JetStream: API replicas publish, the gateway reads it in order.

One stream per service (``KAIROS_<name>``, subject ``kairos.<name>.events``), file storage on the
server. A request's batch id is the message id (``Nats-Msg-Id``): JetStream drops a message
whose id it saw within the duplicate window, so a client that retries a batch it got no answer
for does not add it twice (and the shards drop event ids they have seen, past the window). The
stream sequence is the source position; the gateway trims the stream below the oldest kept
checkpoint. The stream refuses new messages when full (``discard: new``): the API answers 503.

``IngestLog`` is the asyncio client (an API replica's event loop); ``LogSource`` wraps it in a
thread of its own as an ``engine.source.Source`` for the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import numpy as np
import pyarrow as pa
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType

from engine.errors import EventError, SourceError
from engine.events.deadletter import DeadLetter
from engine.logformat import decode_message, encode_idle
from engine.source import SourceBatch

log = logging.getLogger(__name__)
T = TypeVar("T")
#: what a failing log raises to its callers (the API answers 503 for these)
LOG_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError, asyncio.TimeoutError)
#: seconds of empty reads, with messages in the stream, before a read takes a new consumer
STALLED_S = 2.0


@dataclass(frozen=True)
class LogConfig:
    """Where the log is and how the stream is set up."""

    url: str
    name: str = "kairos"
    #: the stream's size limit; new messages are refused beyond it (503 to clients)
    max_bytes: int = 8 << 30
    #: a batch id sent again within this window is not stored twice
    duplicate_window_s: float = 600.0
    #: the largest message (the server's max_payload must allow it)
    max_message_bytes: int = 8 << 20
    #: seconds a publish or read may take before it counts as failed
    timeout_s: float = 5.0

    @property
    def stream(self) -> str:
        return "KAIROS_" + re.sub(r"[^A-Za-z0-9_-]", "_", self.name)

    @property
    def subject(self) -> str:
        return "kairos." + re.sub(r"[^A-Za-z0-9_-]", "_", self.name) + ".events"


class IngestLog:
    """The asyncio client: publish, read from a sequence, trim (see the module's docstring)."""

    def __init__(self, config: LogConfig, client: Any) -> None:
        self.config = config
        self.nc = client
        self.js = client.jetstream(timeout=config.timeout_s)
        self._sub: Any = None
        self._next = -1
        #: when the subscription last delivered (or was made)
        self._delivered_at = time.monotonic()

    @classmethod
    async def open(cls, config: LogConfig) -> IngestLog:
        """Connect and make sure the stream exists with this configuration."""
        client = await nats.connect(
            config.url,
            connect_timeout=config.timeout_s,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            # no buffering while disconnected: a publish then fails at once (the API answers
            # 503) instead of being sent after the reconnect, after its 503 was answered
            pending_size=0,
        )
        log = cls(config, client)
        await log._ensure_stream()
        return log

    async def _ensure_stream(self) -> None:
        config = self.config
        settings = {
            "name": config.stream,
            "subjects": [config.subject],
            "storage": StorageType.FILE,
            "max_bytes": config.max_bytes,
            "max_msg_size": config.max_message_bytes,
            "discard": DiscardPolicy.NEW,
            "duplicate_window": config.duplicate_window_s,
        }
        try:
            await self.js.stream_info(config.stream)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(**settings)
        else:
            await self.js.update_stream(**settings)

    async def publish(self, payload: bytes, msg_id: str) -> tuple[int, bool]:
        """Store one message; returns (its stream sequence, whether it was a duplicate).
        Returns only once JetStream has acknowledged it; raises one of LOG_ERRORS if not."""
        ack = await self.js.publish(
            self.config.subject,
            payload,
            timeout=self.config.timeout_s,
            stream=self.config.stream,
            headers={"Nats-Msg-Id": msg_id},
        )
        return int(ack.seq), bool(ack.duplicate)

    async def bounds(self) -> tuple[int, int]:
        """(first, last) sequence in the stream (first > last: empty)."""
        info = await self.js.stream_info(self.config.stream)
        return int(info.state.first_seq), int(info.state.last_seq)

    async def read(self, start: int, max_messages: int, wait_s: float) -> list[tuple[int, bytes]]:
        """Up to ``max_messages`` messages from sequence ``start`` on, waiting at most
        ``wait_s`` for the first; [] when there is none yet."""
        fresh = self._sub is None or start != self._next
        if fresh:
            await self._subscribe(start)
        try:
            messages = await self._sub.fetch(batch=max_messages, timeout=wait_s)
        except TimeoutError:  # nats-py's own and, now and then, asyncio's
            # nothing within wait_s: nothing yet, unless this has lasted while the stream holds
            # messages from ``start`` on (a consumer the server lost): then a new consumer
            if time.monotonic() - self._delivered_at > STALLED_S:
                self._delivered_at = time.monotonic()
                if (await self.bounds())[1] >= start:
                    self._sub = None
            return []
        except LOG_ERRORS:
            self._sub = None  # the server went away: subscribe again once it is back
            raise
        out = [(int(m.metadata.sequence.stream), bytes(m.data)) for m in messages]
        # the stream's sequences have no holes (nothing is deleted but below a checkpoint): a
        # hole means the consumer skipped messages (a pull that expired while they were on
        # their way): keep what came in order and read the rest again from a new consumer
        # (a hole a new consumer sees too is the stream's own, and is read over)
        contiguous = 0
        while contiguous < len(out) and out[contiguous][0] == start + contiguous:
            contiguous += 1
        if contiguous < len(out) and not (fresh and contiguous == 0):
            out = out[:contiguous]
            self._sub = None
        if out:
            self._next = out[-1][0] + 1
            self._delivered_at = time.monotonic()
        return out

    async def _subscribe(self, start: int) -> None:
        if self._sub is not None:
            with contextlib.suppress(*LOG_ERRORS):
                await self._sub.unsubscribe()
        first, _ = await self.bounds()
        if start < first:
            raise SourceError(
                f"the log starts at {first}; position {start} was trimmed (a checkpoint older "
                "than the oldest kept?)"
            )
        self._sub = await self.js.pull_subscribe(
            self.config.subject,
            stream=self.config.stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(start, 1),
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
                mem_storage=True,
            ),
        )
        self._next = start
        self._delivered_at = time.monotonic()

    async def trim_below(self, sequence: int) -> None:
        """Drop every message below ``sequence`` (checkpoints need none of them)."""
        if sequence > 1:
            await self.js.purge_stream(self.config.stream, seq=sequence)

    async def close(self) -> None:
        with contextlib.suppress(*LOG_ERRORS):
            await asyncio.wait_for(self.nc.close(), timeout=self.config.timeout_s)


class LogSource:
    """The log as an ``engine.source.Source`` (position = the next stream sequence to read),
    for the gateway's thread: the asyncio client runs on a loop in a thread of its own."""

    def __init__(self, config: LogConfig, wait_s: float = 0.01, max_messages: int = 64) -> None:
        self.config = config
        self.name = f"nats:{config.stream}"
        self.wait_s = wait_s
        self.max_messages = max_messages
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="log", daemon=True)
        self._thread.start()
        self.log: IngestLog = self._call(IngestLog.open(config))
        self._position = 1
        self._bounds_asked = 0.0
        self._behind = False
        self._idle_failed_at = 0.0
        #: messages that were not Kairos log messages (dead-lettered)
        self.unreadable = 0

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout or self.config.timeout_s * 4)

    @property
    def position(self) -> int:
        return self._position

    def seek(self, position: int) -> None:
        first, _ = self.bounds()
        if position < first:
            raise SourceError(f"the log starts at {first}; position {position} was trimmed")
        self._position = max(position, 1)

    def publish(self, payload: bytes, msg_id: str) -> tuple[int, bool]:
        """``IngestLog.publish`` from this thread."""
        return self._call(self.log.publish(payload, msg_id))

    def bounds(self) -> tuple[int, int]:
        """``IngestLog.bounds`` from this thread."""
        return self._call(self.log.bounds())

    def mark_idle(self) -> bool:
        """Write an idle mark at the end of the log (``engine.logformat.encode_idle``); the
        release comes when it is read. False if the log refused it (the next poll tries again;
        nothing can be ingested meanwhile either)."""
        if time.monotonic() - self._idle_failed_at < 1.0:
            return False
        try:
            self.publish(encode_idle(), f"idle:{self._position}")
        except (TimeoutError, *LOG_ERRORS) as exc:
            self._idle_failed_at = time.monotonic()
            log.warning("could not mark a quiet spell in the ingest log: %s", exc)
            return False
        return True

    def _caught_up(self) -> bool:
        """Whether the stream ends before the position (asked at most every 50 ms)."""
        now = time.monotonic()
        if now - self._bounds_asked >= 0.05:
            self._bounds_asked = now
            self._behind = self.bounds()[1] >= self._position
        return not self._behind

    def lag(self) -> int:
        """Messages in the log not read yet."""
        return max(0, self.bounds()[1] + 1 - self._position)

    def read(self, max_events: int) -> SourceBatch | None:
        """The next messages; None only when the stream holds nothing more (a read that
        found nothing while messages wait is an empty batch: the source is not idle)."""
        messages = self._call(self.log.read(self._position, self.max_messages, self.wait_s))
        if not messages:
            if self._caught_up():
                return None
            return SourceBatch(pa.table({}), np.zeros(0, np.int64), self._position, self._position)
        tables, positions, letters, decisions = [], [], [], []
        events, idle = 0, False
        start = self._position
        for sequence, data in messages:
            try:
                message = decode_message(data)
            except EventError as exc:
                self.unreadable += 1
                letters.append(DeadLetter(-1, f"log message {sequence}: {exc}"))
                continue
            if message.idle:  # the stretch ends here: the release comes after its events
                self._position = sequence + 1
                idle = True
                break
            if message.decisions is not None:
                decisions.append(message.decisions)
            if message.events is not None:
                tables.append(message.events)
                positions.append(message.positions)
                letters.extend(message.letters)
                events += message.events.num_rows
            if events >= max_events:
                self._position = sequence + 1
                break
        else:
            self._position = messages[-1][0] + 1
        # stopped early: the next read starts before where the subscription is, and
        # ``IngestLog.read`` subscribes again from there
        table = pa.concat_tables(tables, promote_options="default") if tables else None
        return SourceBatch(
            table if table is not None else pa.table({}),
            np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64),
            start,
            self._position,
            letters,
            pa.concat_tables(decisions, promote_options="default") if decisions else None,
            idle,
        )

    @property
    def exhausted(self) -> bool:
        return False

    def release(self, position: int) -> None:
        self._call(self.log.trim_below(position))

    def close(self) -> None:
        try:
            self._call(self.log.close())
        except (TimeoutError, *LOG_ERRORS):
            pass
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
