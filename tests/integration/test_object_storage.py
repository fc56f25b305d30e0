"""Checkpoints, output logs and models on a real S3 endpoint on this machine (moto's server),
through the same ``pyarrow.fs`` code as a local folder.

- a pipeline over the engine checkpoints to ``s3://``, loses its state, recovers from there and
  ends where a run without the crash ends;
- a sink's two-phase commit and its recovery (rename = copy + delete on S3) keep exactly the
  committed epochs;
- a model registered in an ``s3://`` registry loads back and becomes the champion.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from engine.clock import ManualClock
from engine.config import EngineSettings
from engine.local import LocalEngine
from engine.pipeline import Pipeline
from engine.sink import ParquetSink
from engine.source import TableSource
from engine.synthetic.telco import events, population
from tests.conftest import free_port

pytestmark = pytest.mark.integration
BUCKET = "kairos-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with a bucket; the AWS_* variables point pyarrow at it."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}  # fmt: skip
    os.environ.update(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                pafs.S3FileSystem(
                    allow_bucket_creation=True, endpoint_override=f"127.0.0.1:{port}", scheme="http"
                ).create_dir(BUCKET)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"s3://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _engine(root: str, rules) -> LocalEngine:
    settings = EngineSettings(shards=2, allowed_lateness_s=60, dedupe_window_s=3600)
    return LocalEngine(settings, rules, checkpoint_root=root)


def test_a_pipeline_checkpoints_to_s3_and_recovers_from_there(s3, rules) -> None:
    stream = events(population(2_000, seed=5), 60_000, days=20, seed=5)
    clean = _engine(f"{s3}/clean", rules)
    Pipeline(TableSource(stream, "telco"), clean, None, ManualClock(), chunk=5_000).run()

    engine = _engine(f"{s3}/crash", rules)
    source = TableSource(stream, "telco")
    pipeline = Pipeline(source, engine, None, ManualClock(), chunk=5_000)
    pipeline.start()
    for step in range(9):
        pipeline.step()
        if step in (3, 6):
            pipeline.checkpoint()
    engine.lose_state()  # the process dies after 9 steps; the last checkpoint was after 7
    recovery = pipeline.recover(RuntimeError("killed"))
    assert recovery.position == 35_000
    pipeline.run()
    assert engine.trigger_table().equals(clean.trigger_table())
    fs, path = pafs.FileSystem.from_uri(f"{s3}/crash")
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))
    assert "CURRENT" in names and len([n for n in names if n.startswith("chk-")]) == 3


def test_sink_commits_and_recovers_on_s3(s3) -> None:
    uri = f"{s3}/triggers"
    table = pa.table({"n": pa.array(np.arange(10), pa.int64())})
    sink = ParquetSink(uri)
    sink.write(table.slice(0, 4))
    sink.precommit(1)
    sink.commit(1)
    sink.write(table.slice(4, 3))
    sink.precommit(2)  # the process dies before CURRENT names epoch 2
    again = ParquetSink(uri)
    again.recover(1)
    again.write(table.slice(4, 6))  # the replay
    again.precommit(2)
    again.commit(2)
    fs, path = pafs.FileSystem.from_uri(uri)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.is_file]
    assert all(not f.rsplit("/", 1)[-1].startswith("_") for f in files)
    read = ds.dataset(files, filesystem=fs, format="parquet").to_table()
    assert sorted(read.column("n").to_pylist()) == list(range(10))


def test_a_model_registry_on_s3(s3) -> None:
    import xgboost as xgb

    from models.registry import ModelRegistry
    from tests.factories import generated_rows, trained_model

    registry = ModelRegistry(f"{s3}/models")
    artifact = trained_model(registry)
    registry.set_champion(artifact.version)
    again = ModelRegistry(f"{s3}/models")
    assert again.champion() == artifact.version
    loaded = again.load(artifact.version)
    assert loaded.feature_names == artifact.feature_names
    x, _ = generated_rows(500, seed=3)
    rows = xgb.DMatrix(x, feature_names=list(artifact.feature_names))
    assert np.array_equal(loaded.booster.predict(rows), artifact.booster.predict(rows))
