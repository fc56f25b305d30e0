"""Replay an event table through the engine on Ray: the work behind `kairos demo` and `replay`.

A replay is an ``engine.pipeline.Pipeline`` from a ``TableSource`` (position = row) into a
``Supervisor``: it takes a checkpoint every ``checkpoint_every_s`` and at the end, recovers by
itself when a shard or sink actor dies (every shard restored from the last checkpoint, the rows
since replayed, the logs committed once), and a replay that stopped (Ctrl-C, a crash of the
driver) continues with ``resume=<run>`` from its last checkpoint. Every folder of a run
(triggers, decisions, dead letters, checkpoints) is named by the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actors.supervisor import Supervisor
from engine.config import EngineSettings
from engine.decision.catalog import Catalog
from engine.decision.scorer import OfferScorer
from engine.events.deadletter import DeadLetter
from engine.pipeline import Pipeline, Recovery
from engine.reference import EMPTY, ReferenceData
from engine.rules.spec import RuleSet
from engine.source import TableSource


@dataclass
class Progress:
    """What a replay has done so far; handed to the progress callback."""

    total: int
    submitted: int = 0
    seconds: float = 0.0
    triggers_by_rule: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.submitted / self.seconds if self.seconds else 0.0


@dataclass
class ReplayReport:
    """The outcome of a replay, for the summary table and for tests."""

    events: int
    seconds: float
    stats: dict[str, Any]
    shard_stats: list[dict[str, Any]]
    trigger_files: list[str]
    dead_letter_files: list[str]
    dead_letter_samples: list[str]
    decision_files: list[str] = field(default_factory=list)
    #: (action, delivered, control) -> decisions
    decisions_by_action: dict[tuple[str, bool, bool], int] = field(default_factory=dict)
    #: the run's name (``resume=`` takes it) and its checkpoints' folder
    run: str = ""
    checkpoints: str = ""
    #: recoveries from lost actors, in order
    recoveries: list[Recovery] = field(default_factory=list)
    #: where the replay started (a resumed run: its last checkpoint's row)
    resumed_at: int = 0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def replay(
    table: pa.Table,
    settings: EngineSettings,
    rules: RuleSet,
    out_dir: Path,
    on_progress: Callable[[Progress], None] | None = None,
    chunk: int = 100_000,
    shard_cpus: float | None = None,
    unreadable: list[DeadLetter] | None = None,
    lines: np.ndarray | None = None,
    catalog: Catalog | None = None,
    source_name: str = "events",
    checkpoint_every_s: float | None = 10.0,
    resume: str | None = None,
    on_step: Callable[[Supervisor, Pipeline], None] | None = None,
    scorer: OfferScorer | None = None,
    reference: ReferenceData = EMPTY,
) -> ReplayReport:
    """Stream ``table`` (raw events in arrival order) through sharded actors on the running Ray.

    With a ``catalog``, shards decide on every trigger through the ranker deployment (which
    must be running) and the decision log goes to ``out_dir/decisions/<run>``. ``resume``
    names an earlier run to continue from its last checkpoint (the same ``source_name`` and
    table). ``reference``: the reference tables rules read. ``on_step`` is called after every
    step (tests inject faults there); ``scorer`` replaces the ranker deployment's.
    """
    from actors.scorer import ServeScorer

    run = resume or time.strftime("run-%Y%m%d-%H%M%S")
    decision_dir = (out_dir / "decisions" / run).resolve()
    checkpoint_dir = (out_dir / "checkpoints" / run).resolve()
    if resume is not None and not checkpoint_dir.exists():
        raise FileNotFoundError(f"no run {resume!r} to resume under {out_dir / 'checkpoints'}")
    supervisor = Supervisor(
        settings,
        rules,
        trigger_uri=str((out_dir / "triggers" / run).resolve()),
        dead_letter_uri=str((out_dir / "dead-letters" / run).resolve()),
        shard_cpus=shard_cpus if shard_cpus is not None else min(0.5, 1.8 / settings.shards),
        namespace_prefix=f"kairos-{run}",
        catalog=catalog,
        scorer=(scorer or ServeScorer()) if catalog else None,
        decision_uri=str(decision_dir) if catalog else None,
        checkpoint_root=str(checkpoint_dir),
        reference=reference,
    )
    source = TableSource(table, source_name, lines, unreadable or [])
    pipeline = Pipeline(source, supervisor, checkpoint_every_s, chunk=chunk)
    try:
        supervisor.ready()  # every actor is up before the clock starts
        if catalog is not None:
            supervisor.connect_scorers()  # problems show as model_unavailable decisions
        pipeline.start()
        resumed_at = source.position
        progress = Progress(total=table.num_rows)
        started = time.perf_counter()
        while not source.exhausted:
            pipeline.step()
            if on_step is not None:
                on_step(supervisor, pipeline)
            progress.submitted = source.position
            progress.seconds = time.perf_counter() - started
            progress.triggers_by_rule = dict(supervisor.router.stats.triggers_by_rule)
            if on_progress is not None:
                on_progress(progress)
        pipeline.run()  # the end of the stream and the last checkpoint
        seconds = time.perf_counter() - started
        router = supervisor.router
        trigger_files = _files(out_dir / "triggers" / run)
        decision_files, by_action = _decision_summary(decision_dir) if catalog else ([], {})
        return ReplayReport(
            events=table.num_rows - resumed_at,
            seconds=seconds,
            stats=router.stats.as_dict(),
            shard_stats=supervisor.shard_stats(),
            trigger_files=trigger_files,
            dead_letter_files=_files(out_dir / "dead-letters" / run),
            dead_letter_samples=[str(d) for d in router.dead_letters[:5]],
            decision_files=decision_files,
            decisions_by_action=by_action,
            run=run,
            checkpoints=str(checkpoint_dir),
            recoveries=list(pipeline.recoveries),
            resumed_at=resumed_at,
        )
    finally:
        supervisor.shutdown()


def _files(folder: Path) -> list[str]:
    """The committed Parquet files of a folder (pending ones start with ``_``)."""
    return sorted(str(p) for p in folder.rglob("*.parquet") if not p.name.startswith("_"))


def _decision_summary(folder: Path) -> tuple[list[str], dict[tuple[str, bool, bool], int]]:
    import pyarrow.dataset as ds

    if not folder.exists():
        return [], {}
    log = ds.dataset(str(folder), format="parquet", partitioning="hive")
    table = log.to_table(columns=["action", "delivered", "control"])
    counts = table.group_by(["action", "delivered", "control"]).aggregate([("action", "count")])
    return list(log.files), {
        (r["action"], r["delivered"], r["control"]): r["action_count"] for r in counts.to_pylist()
    }
