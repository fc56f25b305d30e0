"""The `kairos` command line: demo, generate, replay, simulate, train, rules and offers check."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deploy import cli_decisions, cli_security, doctor, service
from deploy.paths import DEFAULT_OFFERS, DEFAULT_REFERENCE, DEFAULT_RULES
from engine.config import EngineSettings
from engine.decision.catalog import Catalog, load_catalog
from engine.errors import EngineError
from engine.reference import EMPTY, ReferenceData, load_reference
from engine.rules.spec import RuleSet, load_rules

app = typer.Typer(
    help="Kairos: real-time customer engagement on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
rules_app = typer.Typer(help="Work with rule files.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(cli_decisions.offers_app, name="offers")
app.add_typer(cli_security.keys_app, name="keys")
app.add_typer(cli_security.audit_app, name="audit")
app.command()(cli_decisions.simulate)
app.command()(cli_decisions.train)
app.command("serve")(service.serve)
app.command("doctor")(doctor.doctor)
console = Console()
err = Console(stderr=True)


def _settings(**overrides: Any) -> EngineSettings:
    try:
        return EngineSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise EngineError(f"invalid settings: {exc}") from exc


def _events_file(path: Path) -> Any:
    from engine.eventfile import read_events

    return read_events(str(path))


def _start_ranker(out: Path, rules: RuleSet, catalog: Catalog) -> str:
    """Deploy the ranker on Serve with the champion of ``out/models`` (bootstrapped if none)."""
    from deploy.ranker import start_ranker

    with console.status("starting the ranker on Ray Serve (a first model is trained if needed)..."):
        return start_ranker(str((out / "models").resolve()), rules, catalog)


def _live_replay(
    file: Any,
    settings: EngineSettings,
    rules: RuleSet,
    out: Path,
    address: str | None,
    catalog: Catalog | None = None,
    resume: str | None = None,
    checkpoint_every_s: float | None = 10.0,
    source_name: str = "events",
    reference: ReferenceData = EMPTY,
) -> Any:
    from actors.runtime import init_ray
    from deploy.replay import Progress as ReplayProgress
    from deploy.replay import replay

    with console.status("starting Ray..."):
        init_ray(address=address, num_cpus=max(2, os.cpu_count() or 2))
    if catalog is not None:
        version = _start_ranker(out, rules, catalog)
        console.print(f"ranker model {version} serving on Ray Serve")
    bar = Progress(
        TextColumn("[bold]replay"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} events"),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
    )
    table = file.table
    task = bar.add_task("replay", total=table.num_rows, rate="")
    moments = Table(title="moments so far", show_header=True, header_style="bold")

    def render(p: ReplayProgress) -> Group:
        grid = Table.grid(padding=(0, 2))
        for rule in rules.rules:
            grid.add_row(f"[magenta]{rule.id}", f"{p.triggers_by_rule.get(rule.id, 0):,}")
        return Group(bar, grid)

    with Live(Group(bar, moments), console=console, refresh_per_second=10) as live:

        def on_progress(p: ReplayProgress) -> None:
            bar.update(task, completed=p.submitted, rate=f"{p.events_per_s:,.0f} events/s")
            live.update(render(p))

        report = replay(
            table,
            settings,
            rules,
            out,
            on_progress=on_progress,
            unreadable=file.dead_letters,
            lines=file.positions,
            catalog=catalog,
            source_name=source_name,
            resume=resume,
            checkpoint_every_s=checkpoint_every_s,
            reference=reference,
        )
        bar.update(task, completed=table.num_rows, rate=f"{report.events_per_s:,.0f} events/s")
        final = ReplayProgress(
            total=table.num_rows,
            submitted=table.num_rows,
            seconds=report.seconds,
            triggers_by_rule=report.stats["triggers_by_rule"],
        )
        live.update(render(final))
    return report


def _summary(report: Any, rules: RuleSet) -> None:
    stats = report.stats
    table = Table(title="Kairos replay summary", header_style="bold")
    table.add_column("rule")
    table.add_column("description")
    table.add_column("triggers", justify="right")
    for rule in rules.rules:
        table.add_row(
            rule.id, rule.spec.description, f"{stats['triggers_by_rule'].get(rule.id, 0):,}"
        )
    console.print(table)
    customers = sum(s["customers"] for s in report.shard_stats)
    facts = Table.grid(padding=(0, 2))
    facts.add_row(
        "events", f"{report.events:,} in {report.seconds:.2f} s ({report.events_per_s:,.0f}/s)"
    )
    facts.add_row("applied", f"{stats['applied']:,}")
    facts.add_row("dead-lettered", f"{stats['rejected']:,} (invalid or too late)")
    facts.add_row("duplicates dropped", f"{stats['duplicates']:,}")
    per_customer = report.shard_stats[0]["state_bytes_per_customer"]
    facts.add_row(
        "customers",
        f"{customers:,} on {len(report.shard_stats)} shards, "
        f"{per_customer:.0f} bytes of state each",
    )
    facts.add_row(
        "micro-batch latency", f"p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms"
    )
    if report.resumed_at:
        facts.add_row("resumed", f"run {report.run} from row {report.resumed_at:,}")
    facts.add_row("checkpoints", f"{report.checkpoints} (--resume {report.run})")
    for recovery in report.recoveries:
        facts.add_row(
            "recovered",
            f"{recovery.error[:60]}: from checkpoint {recovery.epoch} (row {recovery.position:,}) "
            f"in {recovery.seconds:.2f} s",
        )
    if report.trigger_files:
        facts.add_row("triggers written to", str(Path(report.trigger_files[0]).parent))
    if report.dead_letter_files:
        facts.add_row("dead letters written to", str(Path(report.dead_letter_files[0]).parent))
    console.print(facts)
    for sample in report.dead_letter_samples[:3]:
        console.print(f"  [dim]dead letter: {sample}")
    if report.decision_files:
        _decision_table(report)


def _decision_table(report: Any) -> None:
    by_action: dict[str, list[int]] = {}
    for (action, delivered, control), n in report.decisions_by_action.items():
        row = by_action.setdefault(action, [0, 0, 0])
        row[0] += n
        row[1] += n if delivered else 0
        row[2] += n if control else 0
    table = Table(title="Decisions", header_style="bold")
    for column in ("action", "decided", "delivered", "control group (logged only)"):
        table.add_column(column, justify="left" if column == "action" else "right")
    for action, (n, sent, held) in sorted(by_action.items(), key=lambda kv: -kv[1][0]):
        table.add_row(action, f"{n:,}", f"{sent:,}", f"{held:,}")
    console.print(table)
    console.print(f"decision log: {Path(report.decision_files[0]).parent.parent}")


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Parquet file to write.")] = Path(
        "kairos-data/events.parquet"
    ),
    customers: Annotated[int, typer.Option(min=1)] = 100_000,
    events: Annotated[int, typer.Option(min=1)] = 1_000_000,
    days: Annotated[int, typer.Option(min=1, max=366)] = 30,
    seed: int = 7,
) -> None:
    """Generate a seeded synthetic telco population and a month of its events as Parquet."""
    from engine.eventfile import write_events
    from engine.synthetic.telco import events as make_events
    from engine.synthetic.telco import population

    with console.status(f"generating {events:,} events for {customers:,} customers..."):
        table = make_events(population(customers, seed), events, days=days, seed=seed)
        write_events(table, str(out))
    console.print(f"wrote {table.num_rows:,} events to {out}")


@app.command("replay")
def replay_command(
    file: Annotated[Path, typer.Argument(help="Parquet or NDJSON event file.")],
    rules: Annotated[Path, typer.Option(help="Rule file.")] = DEFAULT_RULES,
    reference: Annotated[
        Path, typer.Option(help="Reference tables the rules read (stores, stock, recalls).")
    ] = DEFAULT_REFERENCE,
    shards: Annotated[int | None, typer.Option(min=1, help="Shard actors.")] = None,
    out: Annotated[Path, typer.Option(help="Where triggers and dead letters go.")] = Path(
        "kairos-data"
    ),
    address: Annotated[str | None, typer.Option(help="Ray address; default: embedded.")] = None,
    offers: Annotated[
        Path | None, typer.Option(help="Offer catalog: decide on every trigger (ranker on Serve).")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue run RUN (its name, or 'latest') from its last checkpoint: the same "
            "file, the outputs of the run's folders written once."
        ),
    ] = None,
    checkpoint_every: Annotated[
        float, typer.Option(min=0.1, help="Seconds between checkpoints (and one at the end).")
    ] = 10.0,
) -> None:
    """Replay an event file through sharded actors on Ray and summarize what fired.

    Checkpoints go to OUT/checkpoints/RUN; a lost shard or sink actor is recovered by itself."""
    settings = _settings(shards=shards)
    ruleset = load_rules(rules)
    catalog = load_catalog(offers) if offers else None
    if resume == "latest":
        runs = sorted(p.name for p in (out / "checkpoints").glob("run-*"))
        if not runs:
            raise typer.BadParameter(f"no run under {out / 'checkpoints'}", param_hint="--resume")
        resume = runs[-1]
    report = _live_replay(
        _events_file(file), settings, ruleset, out, address, catalog, resume, checkpoint_every,
        str(file.resolve()), load_reference(reference),
    )  # fmt: skip
    _summary(report, ruleset)


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=1)] = 100_000,
    events: Annotated[int, typer.Option(min=1)] = 1_000_000,
    shards: Annotated[int, typer.Option(min=1)] = 2,
    out: Annotated[Path, typer.Option(help="Data folder.")] = Path("kairos-data"),
    loop_customers: Annotated[
        int, typer.Option(min=0, help="Closed-loop comparison population (0: skip it).")
    ] = 5_000,
) -> None:
    """The whole loop on synthetic telco customers: a month of traffic replayed on a local Ray
    with live moments and decisions, then Kairos against a blanket campaign in closed loop."""
    data = out / f"telco-{customers}-{events}.parquet"
    if not data.exists():
        generate(out=data, customers=customers, events=events, days=30, seed=7)
    else:
        console.print(f"using {data}")
    ruleset = load_rules(DEFAULT_RULES)
    catalog = load_catalog(DEFAULT_OFFERS)
    report = _live_replay(
        _events_file(data), _settings(shards=shards), ruleset, out, None, catalog,
        source_name=str(data.resolve()), reference=load_reference(DEFAULT_REFERENCE),
    )  # fmt: skip
    _summary(report, ruleset)
    if loop_customers:
        _closed_loop(ruleset, catalog, loop_customers, out)


def _closed_loop(rules: RuleSet, catalog: Catalog, customers: int, out: Path) -> None:
    """Kairos against a blanket upgrade campaign on one simulated population (in process)."""
    from models.simulate import Simulation, SimulationConfig, report

    config = SimulationConfig(customers=customers, days=28, warmup_days=10)
    bar = Progress(TextColumn("[bold]{task.description:22}"), BarColumn(), console=console)
    with bar:
        tasks = {
            "blanket": bar.add_task("closed loop: blanket", total=1.0),
            "kairos": bar.add_task("closed loop: kairos", total=1.0),
        }
        sim = Simulation(
            config,
            rules,
            catalog,
            str((out / "simulate" / "models").resolve()),
            progress=lambda name, share: bar.update(tasks[name], completed=share),
        )
        results = {n: report(sim.run(n), customers, sim.warmup_end, sim.t0) for n in tasks}
    table = Table(
        title=f"Closed loop: {customers:,} simulated customers, days "
        f"{config.warmup_days}-{config.days} (after Kairos's warm-up)",
        caption="cap: the data-cap moments, the only ones the blanket campaign answers; "
        "all: every moment Kairos answers",
        header_style="bold",
    )
    for column in ("policy", "offers sent", "accepted", "acceptance", "net value", "opt-outs"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    rows = [
        ("blanket", results["blanket"]),
        ("kairos, cap", cli_decisions.scoped(results["kairos"], cli_decisions.BLANKET_SCOPE)),
        ("kairos, all", results["kairos"]),
    ]
    for name, r in rows:
        table.add_row(
            name,
            f"{r['offers_sent']:,}",
            f"{r['accepted']:,}",
            f"{r['acceptance_rate']:.1%}",
            f"{r['net_value']:,.0f}",
            f"{r['opt_outs']:,}",
        )
    console.print(table)
    b, k = rows[0][1], rows[1][1]
    if b["acceptance_rate"]:
        console.print(
            f"At the moments the blanket campaign answers (data cap nearing), Kairos sent "
            f"{k['offers_sent']:,} offers to its {b['offers_sent']:,}, with "
            f"{k['acceptance_rate'] / b['acceptance_rate']:.1f}x its acceptance rate and a net "
            f"value of {k['net_value']:,.0f} against {b['net_value']:,.0f}. "
            "`kairos simulate` runs all four policies."
        )


@rules_app.command("check")
def rules_check(file: Annotated[Path, typer.Argument(help="Rule file to validate.")]) -> None:
    """Validate a rule file: every problem with file, rule id and field, or a summary."""
    ruleset = load_rules(file)
    table = Table(title=f"{file}: {len(ruleset)} rules OK", header_style="bold")
    for column in ("id", "type", "on", "fires"):
        table.add_column(column)
    for rule in ruleset.rules:
        spec = rule.spec
        if rule.window is not None:
            summed = getattr(spec, "sum", None)
            w, what = rule.window, f"sum of {summed}" if summed else "count"
            every = getattr(spec, "every", "")
            sliding = (f"this {every} and the {w.buckets - 1} before" if w.period
                       else f"last {getattr(spec, 'sliding', '')} in {every} buckets")  # fmt: skip
            shape = {"session": f"session (gap {getattr(spec, 'session', '')})",
                     "tumbling": f"per {getattr(spec, 'tumbling', '')}",
                     "sliding": sliding}[w.shape]  # fmt: skip
            if w.distinct:
                what = f"number of {every or 'bucket'}s with any"
            events = "events" if spec.when is None else f"events where {spec.when}"
            fires = f"nothing: other rules read '{w.name}', the {what} of its {events}, {shape}"
        elif rule.pattern is not None:
            fires = rule.pattern.words
            if rule.when is not None:
                fires += f" Reported when {rule.when}."
        elif rule.type == "threshold":
            fires = f"{rule.value} >= {rule.threshold}, once per {getattr(spec, 'once_per', '')}"
            if spec.when is not None:
                fires += f", when {spec.when}"
        else:
            cooldown = getattr(spec, "cooldown", 0)
            fires = f"{rule.when}" + (f", cooldown {cooldown}" if rule.cooldown_ms else "")
        table.add_row(rule.id, rule.type, ", ".join(spec.on), fires)
    console.print(table)


def _run(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except EngineError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


def main() -> None:
    """Console-script entry point."""
    _run(app)


if __name__ == "__main__":
    main()
