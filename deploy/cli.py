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

from deploy import learning
from engine.config import EngineSettings
from engine.errors import EngineError
from engine.rules.spec import RuleSet, load_rules

DEFAULT_RULES = Path(__file__).parent / "config" / "rules.yaml"

app = typer.Typer(
    help="Kairos: real-time customer engagement on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
rules_app = typer.Typer(help="Work with rule files.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(learning.offers_app, name="offers")
app.command()(learning.simulate)
app.command()(learning.train)
console = Console()
err = Console(stderr=True)


def _settings(**overrides: Any) -> EngineSettings:
    try:
        return EngineSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise EngineError(f"invalid settings: {exc}") from exc


def _events_file(path: Path) -> Any:
    from engine.replay import read_events

    return read_events(str(path))


def _live_replay(
    file: Any, settings: EngineSettings, rules: RuleSet, out: Path, address: str | None
) -> Any:
    from actors.runtime import init_ray
    from deploy.replay import Progress as ReplayProgress
    from deploy.replay import replay

    with console.status("starting Ray..."):
        init_ray(address=address, num_cpus=max(2, os.cpu_count() or 2))
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
    if report.trigger_files:
        facts.add_row("triggers written to", str(Path(report.trigger_files[0]).parent))
    if report.dead_letter_files:
        facts.add_row("dead letters written to", str(Path(report.dead_letter_files[0]).parent))
    console.print(facts)
    for sample in report.dead_letter_samples[:3]:
        console.print(f"  [dim]dead letter: {sample}")


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
    from engine.replay import write_events
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
    shards: Annotated[int | None, typer.Option(min=1, help="Shard actors.")] = None,
    out: Annotated[Path, typer.Option(help="Where triggers and dead letters go.")] = Path(
        "kairos-data"
    ),
    address: Annotated[str | None, typer.Option(help="Ray address; default: embedded.")] = None,
) -> None:
    """Replay an event file through sharded actors on Ray and summarize what fired."""
    settings = _settings(shards=shards)
    ruleset = load_rules(rules)
    report = _live_replay(_events_file(file), settings, ruleset, out, address)
    _summary(report, ruleset)


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=1)] = 100_000,
    events: Annotated[int, typer.Option(min=1)] = 1_000_000,
    shards: Annotated[int, typer.Option(min=1)] = 2,
    out: Annotated[Path, typer.Option(help="Data folder.")] = Path("kairos-data"),
) -> None:
    """Generate a month of telco traffic if missing, replay it on a local Ray, show the moments."""
    data = out / f"telco-{customers}-{events}.parquet"
    if not data.exists():
        generate(out=data, customers=customers, events=events, days=30, seed=7)
    else:
        console.print(f"using {data}")
    ruleset = load_rules(DEFAULT_RULES)
    report = _live_replay(_events_file(data), _settings(shards=shards), ruleset, out, None)
    _summary(report, ruleset)


@rules_app.command("check")
def rules_check(file: Annotated[Path, typer.Argument(help="Rule file to validate.")]) -> None:
    """Validate a rule file: every problem with file, rule id and field, or a summary."""
    ruleset = load_rules(file)
    table = Table(title=f"{file}: {len(ruleset)} rules OK", header_style="bold")
    for column in ("id", "type", "on", "fires"):
        table.add_column(column)
    for rule in ruleset.rules:
        spec = rule.spec
        if rule.type == "threshold":
            fires = f"{rule.value} >= {rule.threshold}, once per {getattr(spec, 'once_per', '')}"
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
