"""The ingest log holds customer keys, not identifiers: an API replica pseudonymizes a batch
before it publishes it (``engine.ingest.keyed``), and the gateway's ingest gives exactly what it
gave for the identifiers, also for a stretch that mixes messages from before and after."""

from __future__ import annotations

import msgpack
import numpy as np
import pyarrow as pa
import pytest

from engine.config import EngineSettings
from engine.errors import EventError
from engine.events.validation import conform, validate
from engine.ingest import Ingestor, keyed
from engine.logformat import decode_message, encode_message
from engine.synthetic import telco

SETTINGS = EngineSettings(shards=3, pseudonym_key="a-unit-test-key")


def _raw(n: int = 3_000) -> pa.Table:
    return telco.events(telco.population(200), n, days=3, late_share=0.01, duplicate_share=0.0)


def _valid(table: pa.Table) -> tuple[pa.RecordBatch, np.ndarray]:
    checked = validate(conform(table))
    return checked.batch.filter(checked.keep), checked.positions[checked.keep]


def _routed(parts: dict[int, pa.RecordBatch]) -> dict[int, pa.Table]:
    return {shard: pa.Table.from_batches([b]) for shard, b in sorted(parts.items())}


def _through_log(batch: pa.RecordBatch | pa.Table, positions: np.ndarray) -> pa.Table:
    return decode_message(encode_message(batch, positions, [])).events


@pytest.mark.parametrize("dictionary", [False, True])
def test_keyed_batches_route_exactly_as_the_identifiers_do(dictionary) -> None:
    """The same routed batches (keys, shards, sequence numbers, late letters) whether the log
    holds identifiers or keys; and no identifier is in the keyed message."""
    table = _raw()
    if dictionary:
        table = table.set_column(1, "customer_id", table.column("customer_id").dictionary_encode())
    batch, positions = _valid(table)
    plain, by_key = Ingestor(SETTINGS), Ingestor(SETTINGS)
    want = plain.ingest(_through_log(batch, positions), positions)
    message = encode_message(keyed(batch, plain.pseudonymizer), positions, [])
    got = by_key.ingest(decode_message(message).events, positions)
    assert want.accepted == got.accepted > 0 and want.dead_letters == got.dead_letters
    assert want.dead_letters, "the workload has late events"
    assert _routed(want.parts) == _routed(got.parts)
    ids = set(table.column("customer_id").to_pylist())
    events = decode_message(message).events
    assert "customer_id" not in events.schema.names
    texts = {v for c in events.columns if pa.types.is_string(c.type) for v in c.to_pylist()}
    assert not texts & ids


def test_a_stretch_mixing_messages_with_identifiers_and_with_keys_routes_as_one() -> None:
    """After an upgrade the log holds version-1 messages (identifiers) before version-2 ones
    (keys); the gateway reads both in one stretch, concatenated."""
    batch, positions = _valid(_raw())
    half = batch.num_rows // 2
    reference = Ingestor(SETTINGS).ingest(batch, positions)
    mixed = Ingestor(SETTINGS)
    old = _through_log(batch.slice(0, half), positions[:half])
    new = _through_log(keyed(batch.slice(half), mixed.pseudonymizer), positions[half:])
    stretch = pa.concat_tables([old, new], promote_options="default")
    assert stretch.column("customer_key").null_count == half
    got = mixed.ingest(stretch, positions)
    assert _routed(reference.parts) == _routed(got.parts)
    assert reference.dead_letters == got.dead_letters


def test_messages_of_an_unknown_version_are_refused_by_name() -> None:
    with pytest.raises(EventError, match="version 3"):
        decode_message(msgpack.packb({"v": 3, "idle": True}))
    assert decode_message(msgpack.packb({"v": 1, "idle": True})).idle
