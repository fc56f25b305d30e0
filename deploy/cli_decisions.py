"""`kairos simulate`, `kairos train` and `kairos offers check`: the decision side of the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deploy.paths import DEFAULT_OFFERS, DEFAULT_RULES
from engine.decision.catalog import load_catalog
from engine.errors import EngineError
from engine.rules.spec import load_rules

console = Console()
offers_app = typer.Typer(help="Work with offer catalogs.", no_args_is_help=True)


@offers_app.command("check")
def offers_check(file: Annotated[Path, typer.Argument(help="Offer catalog to validate.")]) -> None:
    """Validate an offer catalog: every problem with file, offer id and field, or a summary."""
    catalog = load_catalog(file)
    table = Table(title=f"{file}: {len(catalog.offers)} offers OK", header_style="bold")
    for column in ("id", "answers", "eligible", "channels", "value", "cost", "cooldown"):
        table.add_column(column)
    for offer in catalog.offers:
        s = offer.spec
        table.add_row(
            s.id,
            ", ".join(s.answers),
            str(offer.eligible or "always"),
            ", ".join(s.channels),
            f"{s.value:g}",
            f"{s.cost:g}",
            str(s.cooldown),
        )
    console.print(table)
    p = catalog.policy
    caps = ", ".join(f"{c.max} per {c.per}" for c in p.frequency_caps) or "none"
    quiet = f"{p.quiet_hours.start}:00-{p.quiet_hours.end}:00" if p.quiet_hours else "none"
    console.print(
        f"policy: caps {caps}; quiet hours {quiet}; consent {p.consent}; "
        f"control group {p.control_share:.0%}; exploration {p.exploration:.0%}"
    )


#: the moments the blanket campaign answers: comparisons with it are made on these only
BLANKET_SCOPE = "data_cap_nearing"

#: (description, policy, measure, relation, other, factor, scope):
#: policy.measure rel factor * other.measure, over the decisions of ``scope`` (None: all)
TARGETS: tuple[tuple[str, str, str, str, str, float, str | None], ...] = (
    ("kairos acceptance rate >= 4x blanket", "kairos", "acceptance_rate", ">=", "blanket", 4.0,
     BLANKET_SCOPE),
    ("kairos offers sent <= 50% of blanket", "kairos", "offers_sent", "<=", "blanket", 0.5,
     BLANKET_SCOPE),
    ("kairos net value > blanket", "kairos", "net_value", ">", "blanket", 1.0, BLANKET_SCOPE),
    ("kairos opt-outs <= 50% of blanket", "kairos", "opt_outs", "<=", "blanket", 0.5,
     BLANKET_SCOPE),
    ("kairos net value >= 1.2x rules", "kairos", "net_value", ">=", "rules", 1.2, None),
    ("kairos net value >= 90% of oracle", "kairos", "net_value", ">=", "oracle", 0.9, None),
    # issue 16, the uplift world: Kairos deciding on incremental value against the yardstick
    ("kairos-uplift incremental net value > 0", "kairos-uplift", "incremental_net_value", ">",
     "kairos-uplift", 0.0, None),
    ("kairos-uplift incremental net value >= 50% of uplift", "kairos-uplift",
     "incremental_net_value", ">=", "uplift", 0.5, None),
    ("kairos-uplift offers sent <= 2x uplift", "kairos-uplift", "offers_sent", "<=", "uplift", 2.0,
     None),
    ("kairos-uplift opt-outs <= 1.5x uplift", "kairos-uplift", "opt_outs", "<=", "uplift", 1.5,
     None),
)  # fmt: skip
#: what ``kairos simulate`` runs by default, per world
DEFAULT_POLICIES = {
    "uplift": "blanket,rules,kairos,kairos-uplift,oracle,uplift",
    "classic": "blanket,rules,kairos,oracle",
}


def targets(reports: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """The issue's closed-loop targets, each met or not (empty if a policy did not run).

    The blanket campaign answers only data-cap moments, so Kairos is compared with it on those
    moments (the story's comparison: the same customers at the same moment); the comparisons
    with rules and the oracle cover every moment.
    """
    out: dict[str, bool] = {}
    for text, policy, measure, relation, other, factor, scope in TARGETS:
        if policy not in reports or other not in reports:
            continue
        a, b = (scoped(reports[name], scope)[measure] for name in (policy, other))
        b *= factor
        label = f"{text} (on {scope} moments)" if scope else text
        out[label] = a >= b if relation == ">=" else a <= b if relation == "<=" else a > b
    return out


def scoped(report: dict[str, Any], scope: str | None) -> dict[str, Any]:
    """A policy's report over one moment (trigger id), or the whole report for None."""
    if scope is None:
        return report
    empty = {"offers_sent": 0, "accepted": 0, "acceptance_rate": 0.0, "net_value": 0.0,
             "incremental_net_value": 0.0, "opt_outs": 0}  # fmt: skip
    return dict(report["by_trigger"].get(scope, empty))


def simulate(
    customers: Annotated[int, typer.Option(min=100)] = 20_000,
    days: Annotated[int, typer.Option(min=2, max=180)] = 84,
    warmup_days: Annotated[int, typer.Option(min=1)] = 42,
    policies: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: blanket, rules, kairos (the response ranker), kairos-uplift "
            "(Kairos deciding on incremental value), oracle (true response), uplift (true "
            "incremental value, uplift world only), ceiling (Kairos's features fitted to "
            "the true propensities) and uplift-ceiling (the same for all three probabilities, "
            "served with kairos-uplift's exploration; uplift world only). Default: all but the "
            "ceilings (classic: not the uplift ones)."
        ),
    ] = None,
    seed: int = 7,
    world: Annotated[
        str,
        typer.Option(
            help="uplift: customers who buy anyway, only when asked, never, or react badly "
            "(engine/synthetic/uplift.py); classic: the world of the figures before it."
        ),
    ] = "uplift",
    out: Annotated[Path, typer.Option(help="Folder for the chart, report and models.")] = Path(
        "kairos-data/simulate"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run one simulated population under blanket, rules-only, Kairos and yardstick policies."""
    from deploy.chart import acceptance_chart
    from models.simulate import POLICIES, WORLDS, Simulation, SimulationConfig, report

    if policies is None:
        policies = DEFAULT_POLICIES.get(world, DEFAULT_POLICIES["classic"])
    names = [p.strip() for p in policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise EngineError(f"unknown policy {unknown}; known: {', '.join(POLICIES)}")
    if world not in WORLDS:
        raise EngineError(f"unknown world {world!r}; known: {', '.join(WORLDS)}")
    if warmup_days >= days:
        raise EngineError(f"--warmup-days ({warmup_days}) must be less than --days ({days})")
    config = SimulationConfig(
        customers=customers, days=days, warmup_days=warmup_days, seed=seed, world=world
    )
    quiet = Console(stderr=True, quiet=as_json)
    bar = Progress(
        TextColumn("[bold]{task.description:8}"), BarColumn(), TimeElapsedColumn(), console=quiet
    )
    with bar:
        gen = bar.add_task("generate", total=None)
        sim = Simulation(
            config,
            load_rules(DEFAULT_RULES),
            load_catalog(DEFAULT_OFFERS),
            str((out / "models").resolve()),
            progress=lambda name, share: bar.update(tasks[name], completed=share),
        )
        bar.update(gen, total=1, completed=1)
        tasks = {name: bar.add_task(name, total=1.0) for name in names}
        reports = {}
        for name in names:
            reports[name] = report(sim.run(name), customers, sim.warmup_end, sim.t0)
    chart = acceptance_chart(reports, warmup_days, out / "acceptance.png")
    result: dict[str, Any] = {**reports, "targets": targets(reports), "chart": str(chart)}
    (out / "report.json").write_text(json.dumps(result, indent=2, default=float))
    if as_json:
        print(json.dumps(result, default=float))
        return
    _print_report(reports, result["targets"], chart, config.customers)


def _print_report(
    reports: dict[str, dict[str, Any]], checks: dict[str, bool], chart: Path, customers: int
) -> None:
    table = Table(title=f"Closed loop, {customers:,} customers, after warm-up", header_style="bold")
    for column in ("policy", "offers sent", "accepted", "acceptance", "per 1,000", "net value",
                   "incremental", "opt-outs", "uplift (95% CI)", "true uplift"):  # fmt: skip
        table.add_column(column, justify="right" if column != "policy" else "left")
    for name, r in reports.items():
        u = r["uplift"]
        table.add_row(
            name,
            f"{r['offers_sent']:,}",
            f"{r['accepted']:,}",
            f"{r['acceptance_rate']:.1%}",
            f"{r['accepted_per_1000_customers']:.1f}",
            f"{r['net_value']:,.0f}",
            f"{r['incremental_net_value']:,.0f}",
            f"{r['opt_outs']:,}",
            f"{u['uplift']:+.1%} ({u['low']:+.1%}, {u['high']:+.1%})",
            f"{u['true_uplift']:+.1%}",
        )
    console.print(table)
    moments = Table(title="By moment (trigger)", header_style="bold")
    for column in ("moment", "policy", "offers sent", "acceptance", "net value", "incremental",
                   "opt-outs"):  # fmt: skip
        moments.add_column(column, justify="left" if column in ("moment", "policy") else "right")
    triggers = sorted({t for r in reports.values() for t in r["by_trigger"]})
    for trigger in triggers:
        for name, r in reports.items():
            m = scoped(r, trigger)
            moments.add_row(
                trigger, name, f"{m['offers_sent']:,}", f"{m['acceptance_rate']:.1%}",
                f"{m['net_value']:,.0f}", f"{m['incremental_net_value']:,.0f}",
                f"{m['opt_outs']:,}",
            )  # fmt: skip
        moments.add_section()
    console.print(moments)
    for name, ok in checks.items():
        console.print(f"  {'[green]met' if ok else '[red]not met'}[/] {name}")
    if "kairos" in reports:
        promoted = [m for m in reports["kairos"]["models"] if m["promoted"]]
        console.print(
            f"kairos trained {len(reports['kairos']['models'])} models, promoted "
            f"{len(promoted)}: {', '.join(m['version'] for m in promoted) or 'none'}"
        )
    console.print(f"chart: {chart}")


def train(
    decisions: Annotated[Path, typer.Argument(help="Decision log: Parquet file or folder.")],
    responses: Annotated[
        Path,
        typer.Argument(
            help="Outcome events (Parquet/NDJSON): offer responses, and for an uplift model the "
            "conversions and consent changes of every customer (or the service's response log)."
        ),
    ],
    registry: Annotated[Path, typer.Option(help="Model registry folder.")] = Path(
        "kairos-data/models"
    ),
    offers: Annotated[Path, typer.Option(help="Offer catalog.")] = DEFAULT_OFFERS,
    cutoff: Annotated[
        str | None,
        typer.Option(help="Training cutoff (ISO time with a zone); default: newest event."),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="uplift (a T-learner judged on incremental value) or response; default: uplift "
            "when the catalog's offers name their conversions."
        ),
    ] = None,
) -> None:
    """Train a candidate ranker from the decision log and outcomes; promote it if it wins."""
    from datetime import datetime

    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from engine.clock import utc_ms
    from engine.config import EngineSettings
    from engine.eventfile import read_events
    from engine.governance.pseudonym import Pseudonymizer
    from engine.limits import TS_RANGE_TEXT, time_in_range
    from models.promotion import train_round, uplift_round
    from models.registry import ModelRegistry

    if kind not in (None, "uplift", "response"):
        raise EngineError(f"--kind {kind!r}: uplift or response")

    try:
        log = ds.dataset(str(decisions), format="parquet").to_table()
    except (OSError, ValueError) as exc:
        raise EngineError(f"{decisions}: cannot read the decision log: {exc}") from exc
    events = read_events(str(responses)).table
    if cutoff is None:
        newest = pc.max(events.column("ts")).as_py() if events.num_rows else None
        cutoff_ms = int(newest.timestamp() * 1000) if newest else 0
    else:
        try:
            cutoff_ms = utc_ms(datetime.fromisoformat(cutoff))
            if not time_in_range(cutoff_ms):
                raise ValueError(f"outside {TS_RANGE_TEXT}")
        except ValueError as exc:  # not ISO, or naive (local time would depend on the machine)
            raise EngineError(
                f"--cutoff {cutoff!r} is not an ISO date-time with a zone (e.g. 2026-03-01T00:00Z)"
            ) from exc
    catalog = load_catalog(offers)
    if kind is None:
        kind = "uplift" if any(o.spec.conversion for o in catalog.offers) else "response"
    store = ModelRegistry(str(registry))
    if kind == "uplift":  # events name customers by identifier: keyed as the engine keys them
        key = Pseudonymizer(EngineSettings().pseudonym_key)
        result = uplift_round(log, events, catalog, store, cutoff_ms, key)
    else:
        result = train_round(log, events, catalog, store, cutoff_ms)
    if result.artifact is None:
        raise EngineError(f"no model trained: {result.reason}")
    m = result.metrics
    console.print(f"trained {kind} model {result.artifact.version} on "
                  f"{json.dumps(m['train_rows'])} rows")  # fmt: skip
    console.print(f"holdout: {json.dumps(m['holdout'], default=float)}")
    if "randomization" in m:
        console.print("randomization in the holdout period (by the serving model's expected "
                      f"values): {json.dumps(m['randomization'], default=float)}",
                      soft_wrap=True)  # fmt: skip
    gate = m["gate"] if kind == "uplift" else m["offpolicy"]
    console.print(f"gate: {json.dumps(gate, default=float)}")
    verdict = "[green]promoted[/]" if result.promoted else "[red]refused[/]"
    console.print(f"{verdict}: {result.reason}")
