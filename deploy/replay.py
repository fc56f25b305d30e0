"""Replay an event table through the engine on Ray: the work behind `kairos demo` and `replay`."""

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
from engine.events.deadletter import DeadLetter
from engine.rules.spec import RuleSet


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
) -> ReplayReport:
    """Stream ``table`` (raw events in arrival order) through sharded actors on the running Ray.

    With a ``catalog``, shards decide on every trigger through the ranker deployment (which
    must be running) and the decision log goes to ``out_dir/decisions/<run>``.
    """
    from actors.scorer import ServeScorer

    run = time.strftime("run-%Y%m%d-%H%M%S")
    decision_dir = (out_dir / "decisions" / run).resolve()
    supervisor = Supervisor(
        settings,
        rules,
        trigger_uri=str((out_dir / "triggers" / run).resolve()),
        dead_letter_uri=str((out_dir / "dead-letters" / run).resolve()),
        shard_cpus=shard_cpus if shard_cpus is not None else min(0.5, 1.8 / settings.shards),
        namespace_prefix=f"kairos-{run}",
        catalog=catalog,
        scorer=ServeScorer() if catalog else None,
        decision_uri=str(decision_dir) if catalog else None,
    )
    try:
        supervisor.ready()  # every actor is up before the clock starts
        if catalog is not None:
            supervisor.connect_scorers()  # problems show as model_unavailable decisions
        supervisor.router.reject(list(unreadable or []))
        progress = Progress(total=table.num_rows)
        started = time.perf_counter()
        for start in range(0, table.num_rows, chunk):
            positions = None if lines is None else lines[start : start + chunk]
            supervisor.router.submit(table.slice(start, chunk), positions)
            progress.submitted = min(start + chunk, table.num_rows)
            progress.seconds = time.perf_counter() - started
            progress.triggers_by_rule = dict(supervisor.router.stats.triggers_by_rule)
            if on_progress is not None:
                on_progress(progress)
        written = supervisor.router.end_stream()
        seconds = time.perf_counter() - started
        router = supervisor.router
        dead_files = router.dead_letter_sink.files if router.dead_letter_sink else []
        decision_files, by_action = _decision_summary(decision_dir) if catalog else ([], {})
        return ReplayReport(
            events=table.num_rows,
            seconds=seconds,
            stats=router.stats.as_dict(),
            shard_stats=supervisor.shard_stats(),
            trigger_files=list(written.get("files", [])),
            dead_letter_files=list(dead_files),
            dead_letter_samples=[str(d) for d in router.dead_letters[:5]],
            decision_files=decision_files,
            decisions_by_action=by_action,
        )
    finally:
        supervisor.shutdown()


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
