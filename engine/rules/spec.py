"""The rule file: YAML -> validated specs -> compiled rules, with errors naming file, rule, field.

A rule file holds ``rules:``, a list of rules of four types:

* ``threshold``: fires the first time ``value >= threshold`` in a period (once per billing
  cycle or local day) per customer;
* ``condition``: fires when ``when`` holds, at most once per ``cooldown`` per customer;
* ``location``: a condition rule spelled for the commonest case, a location event more than
  ``min_distance_km`` from home;
* ``pattern``: a sequence of steps (``begin``, ``followed_by``, ``not_followed_by``) with
  ``times``, ``optional`` and ``within``, compiled to a small state machine
  (``engine.rules.pattern``); an absence at the end fires on an event-time timer.

Each has ``on`` (event kinds; a pattern's steps have their own), an optional ``when`` and
``emit`` (numbers the trigger carries).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.errors import RuleError
from engine.events.schema import KIND_NAMES, EventKind
from engine.fields import expression_names
from engine.limits import unencodable_text
from engine.rules.duration import parse_duration_ms
from engine.rules.expr import Expression, Type, compile_expression
from engine.rules.pattern import Automaton, compile_pattern
from engine.rules.probe import probe
from engine.rules.windows import MAX_BUCKETS, Window
from engine.state.view import CURRENT_LOCATION
from engine.yamlfile import load_yaml

#: what rule expressions can name; event fields are missing (NaN / empty) on other kinds
#: (``engine.fields``: the names of each role an expression can use)
EVENT_NAMES: dict[str, Type] = dict(expression_names("event"))
PROFILE_NAMES: dict[str, Type] = dict(expression_names("profile"))
AGGREGATE_NAMES: dict[str, Type] = dict(expression_names("aggregate"))
#: where the phone is now (the latest location as of each event: ``BatchView.last_location``)
CURRENT_NAMES: dict[str, Type] = dict.fromkeys(CURRENT_LOCATION, "num")
VOCABULARY: dict[str, Type] = {
    **EVENT_NAMES,
    **PROFILE_NAMES,
    **AGGREGATE_NAMES,
    **CURRENT_NAMES,
}

RULE_ID = r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$"


def _number_as_text(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    return value


#: an expression; a bare number (threshold: 300) is an expression too
ExprText = Annotated[str, BeforeValidator(_number_as_text)]


def _event_kinds(value: Any) -> Any:
    kinds = [value] if isinstance(value, str) else value
    if not isinstance(kinds, list) or not kinds:
        raise ValueError("needs one or more event kinds")
    unknown = [k for k in kinds if k not in KIND_NAMES]
    if unknown:
        raise ValueError(f"unknown event kind(s) {unknown}; known: {', '.join(KIND_NAMES)}")
    return kinds


#: event kinds, one (``on: usage``) or a list
Kinds = Annotated[list[str], BeforeValidator(_event_kinds)]


def _duration(value: Any) -> Any:
    parse_duration_ms(value)
    return value


Duration = Annotated[str | float, BeforeValidator(_duration)]


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=RULE_ID)]
    description: str = ""
    when: ExprText | None = None
    emit: dict[str, ExprText] = Field(default_factory=dict)
    enabled: bool = True


class _RuleBase(_Common):
    on: Kinds


class ThresholdSpec(_RuleBase):
    type: Literal["threshold"]
    value: ExprText
    threshold: ExprText
    once_per: Literal["billing_cycle", "day"] = "billing_cycle"


class ConditionSpec(_RuleBase):
    type: Literal["condition"]
    cooldown: str | float = 0

    @field_validator("cooldown")
    @classmethod
    def _cooldown(cls, value: str | float) -> str | float:
        parse_duration_ms(value)
        return value


class LocationSpec(_RuleBase):
    type: Literal["location"]
    on: list[str] = Field(default_factory=lambda: ["location"])
    min_distance_km: Annotated[float, Field(gt=0, le=20_100)]  # half the Earth's circumference
    cooldown: str | float = "24h"

    @field_validator("cooldown")
    @classmethod
    def _cooldown(cls, value: str | float) -> str | float:
        parse_duration_ms(value)
        return value


#: calendar periods of the customer's local time (tumbling windows, sliding windows' buckets)
CALENDAR_PERIODS = ("hour", "day", "billing_cycle")

STEP_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,31}$"
#: how a step follows the one before (Flink's names); ``next``/``not_next`` are refused when
#: compiled, with the reason
STEP_LINKS = ("begin", "followed_by", "not_followed_by", "next", "not_next")


class PatternStep(BaseModel):
    """One step of a pattern: its link (the key naming it), the events it takes, how often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    begin: Annotated[str, Field(pattern=STEP_NAME)] | None = None
    followed_by: Annotated[str, Field(pattern=STEP_NAME)] | None = None
    not_followed_by: Annotated[str, Field(pattern=STEP_NAME)] | None = None
    next: Annotated[str, Field(pattern=STEP_NAME)] | None = None
    not_next: Annotated[str, Field(pattern=STEP_NAME)] | None = None
    on: Kinds
    when: ExprText | None = None
    #: how many events of the step, in order (any events may come between them)
    times: int | list[int] = 1
    optional: bool = False
    within: Duration | None = None

    @property
    def link(self) -> str:
        """'begin', 'followed_by', ... (exactly one is set: see the validator)."""
        return next(k for k in STEP_LINKS if getattr(self, k) is not None)

    @property
    def name(self) -> str:
        return str(getattr(self, self.link))

    @property
    def absent(self) -> bool:
        return self.link in ("not_followed_by", "not_next")

    @model_validator(mode="after")
    def _one_link(self) -> PatternStep:
        links = [k for k in STEP_LINKS if getattr(self, k) is not None]
        if len(links) != 1:
            raise ValueError(
                "a step names itself with exactly one of begin, followed_by or not_followed_by"
                + (f" (found {', '.join(links)})" if links else "")
            )
        return self


class PatternSpec(_Common):
    type: Literal["pattern"]
    pattern: Annotated[list[PatternStep], Field(min_length=1, max_length=32)]
    #: the longest time from the first positive step's event to the last one's
    within: Duration | None = None
    #: after a match: drop every partial match begun before it, or keep them
    skip: Literal["past_last_event", "no_skip"] = "past_last_event"

    @property
    def on(self) -> list[str]:
        """Every event kind a step listens to, in the order first named."""
        return list(dict.fromkeys(k for step in self.pattern for k in step.on))


class WindowSpec(_Common):
    """A named aggregate over event time (``engine.rules.windows``); it fires nothing."""

    type: Literal["window"]
    on: Kinds
    #: what each event adds (default: 1, a count)
    sum: ExprText | None = None
    session: Duration | None = None
    tumbling: str | None = None
    #: a duration, or with a calendar ``every`` the number of its periods
    sliding: int | str | float | None = None
    #: a sliding window's bucket: a duration, or ``hour``, ``day``, ``billing_cycle``
    every: int | str | float | None = None
    #: a sliding count of the buckets with an event (each bucket counts once)
    distinct: bool = False

    @property
    def calendar_every(self) -> bool:
        return self.every in CALENDAR_PERIODS

    @field_validator("sliding", "every", mode="before")
    @classmethod
    def _duration_or_period(cls, value: Any) -> Any:
        if value in CALENDAR_PERIODS or (isinstance(value, int) and not isinstance(value, bool)):
            return value  # checked with the other fields below
        parse_duration_ms(value)
        return value

    @model_validator(mode="after")
    def _one_shape(self) -> WindowSpec:
        shapes = [k for k in ("session", "tumbling", "sliding") if getattr(self, k) is not None]
        if len(shapes) != 1:
            raise ValueError("a window is exactly one of session, tumbling or sliding")
        if self.emit:
            raise ValueError("a window fires nothing, so it emits nothing: other rules read it")
        if (self.sliding is None) != (self.every is None):
            raise ValueError("a sliding window needs 'every' (its bucket), and only it")
        if self.distinct and (self.sliding is None or self.sum is not None):
            raise ValueError("'distinct' counts the buckets of a sliding count (no 'sum')")
        if self.sliding is not None and self.calendar_every:
            if not isinstance(self.sliding, int) or not 1 <= self.sliding <= MAX_BUCKETS:
                raise ValueError(
                    f"with 'every: {self.every}', 'sliding' is a number of them, 1 to {MAX_BUCKETS}"
                )
        elif isinstance(self.sliding, int) and not isinstance(self.sliding, bool):
            parse_duration_ms(self.sliding)
        calendar = self.tumbling in (None, *CALENDAR_PERIODS)
        if not calendar and parse_duration_ms(str(self.tumbling)) <= 0:  # aligned to the epoch
            raise ValueError("a tumbling window's period must be longer than 0")
        return self


AnySpec = ThresholdSpec | ConditionSpec | LocationSpec | PatternSpec | WindowSpec
RuleSpec = Annotated[AnySpec, Field(discriminator="type")]


_RULE_ADAPTER: TypeAdapter[AnySpec] = TypeAdapter(RuleSpec)


DISTANCE_FROM_HOME = "distance_km(lat, lon, home_lat, home_lon)"


@dataclass(frozen=True)
class CompiledRule:
    """A rule ready to evaluate: its spec, the kinds it listens to and compiled expressions."""

    spec: AnySpec
    kinds: tuple[EventKind, ...]
    when: Expression | None
    emit: dict[str, Expression]
    value: Expression | None = None
    threshold: Expression | None = None
    cooldown_ms: int = 0
    pattern: Automaton | None = None
    window: Window | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def names(self) -> frozenset[str]:
        """Every name the rule's expressions read."""
        exprs = [e for e in (self.when, self.value, self.threshold) if e is not None]
        exprs += list(self.emit.values())
        if self.pattern is not None:
            exprs += [c.when for c in self.pattern.conditions if c.when is not None]
        return frozenset().union(*(e.names for e in exprs)) if exprs else frozenset()

    @property
    def state_key(self) -> str:
        """Identifies the rule's per-customer state; a changed type starts it afresh (and a
        changed pattern: its state machine's digest is part of the key)."""
        if self.pattern is not None:
            return f"{self.id}:pattern:{self.pattern.digest}"
        return f"{self.id}:{self.type}"

    @property
    def state_keys(self) -> list[str]:
        """The store's int64 state columns of this rule (a pattern or a window has one per
        register)."""
        if self.pattern is not None:
            return [f"{self.state_key}:{name}" for name in self.pattern.register_names]
        if self.window is not None:
            return list(self.window.keys)
        return [self.state_key]


@dataclass(frozen=True)
class RuleSet:
    """An ordered, validated collection of compiled rules, with the document it came from."""

    rules: tuple[CompiledRule, ...]
    source: str = "<rules>"
    document: Mapping[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> frozenset[str]:
        return frozenset().union(*(r.names for r in self.rules)) if self.rules else frozenset()

    @property
    def state_keys(self) -> list[str]:
        """Every per-customer state column of the rules (``CompiledRule.state_keys``)."""
        return [key for rule in self.rules for key in rule.state_keys]

    @property
    def windows(self) -> dict[str, Window]:
        """The window rules by name (``BatchView.windows``)."""
        return {r.id: r.window for r in self.rules if r.window is not None}

    @property
    def listening(self) -> dict[str, list[str]]:
        """Rule id -> the event kinds it reads (``Ingestor.listen``)."""
        return {rule.id: list(rule.spec.on) for rule in self.rules}

    def __len__(self) -> int:
        return len(self.rules)


def _window(spec: WindowSpec, when: Expression | None, value: Expression | None) -> Window:
    kinds = tuple(EventKind.from_wire(k) for k in spec.on)
    digest = hashlib.sha256(repr(spec.model_dump()).encode()).hexdigest()[:8]
    if spec.session is not None:
        shape, size, every, period = "session", parse_duration_ms(spec.session), 0, None
    elif spec.tumbling is not None:
        calendar = spec.tumbling in ("hour", "day", "billing_cycle")
        shape, every = "tumbling", 0
        size = 0 if calendar else parse_duration_ms(spec.tumbling)
        period = spec.tumbling if calendar else None
    elif spec.calendar_every:
        assert isinstance(spec.sliding, int)
        shape, size, every, period = "sliding", spec.sliding, 1, str(spec.every)
    else:
        assert spec.sliding is not None and spec.every is not None
        shape, period = "sliding", None
        size, every = parse_duration_ms(spec.sliding), parse_duration_ms(spec.every)
    window = Window(spec.id, kinds, when, value, shape, size, every, period)
    keys = tuple(f"{spec.id}:window:{digest}:{name}" for name in window.register_names)
    return Window(
        spec.id, kinds, when, value, shape, size, every, period, keys, distinct=spec.distinct
    )


def _sliding_problem(spec: WindowSpec) -> str | None:
    if spec.sliding is None or spec.every is None or spec.calendar_every:
        return None
    size, every = parse_duration_ms(spec.sliding), parse_duration_ms(spec.every)
    if every <= 0 or size % every or not 1 <= size // every <= MAX_BUCKETS:
        return (
            f"a sliding window is a whole number of buckets, 1 to {MAX_BUCKETS} "
            f"({spec.sliding} every {spec.every} is not)"
        )
    return None


def _compile(spec: AnySpec, where: str, windows: dict[str, Window] | None = None) -> CompiledRule:
    problems: list[str] = []
    windows = windows or {}
    number: Type = "num"
    vocabulary: dict[str, Type] = {**VOCABULARY, **dict.fromkeys(windows, number)}

    def expr(fieldname: str, text: str | None, want: Type | None) -> Expression | None:
        if text is None:
            return None
        try:
            compiled = compile_expression(text, vocabulary, want)
            probe(compiled, windows)  # it runs on representative events, or it is refused now
        except RuleError as exc:
            problems.append(f"{where}: rule '{spec.id}': field '{fieldname}': {exc}")
            return None
        return compiled

    when = expr("when", spec.when, "bool")
    emit: dict[str, Expression] = {}
    for name, text in spec.emit.items():
        compiled = expr(f"emit.{name}", text, "num")
        if compiled is not None:
            emit[name] = compiled
    kinds = tuple(EventKind.from_wire(k) for k in spec.on)
    if isinstance(spec, WindowSpec):
        value = expr("sum", spec.sum, "num")
        sliding = _sliding_problem(spec)
        if sliding:
            problems.append(f"{where}: rule '{spec.id}': field 'every': {sliding}")
        if problems:
            raise RuleError(problems[0], problems)
        return CompiledRule(spec, kinds, when, emit, window=_window(spec, when, value))
    if isinstance(spec, PatternSpec):

        def refuse(fieldname: str, message: str) -> None:
            problems.append(f"{where}: rule '{spec.id}': field '{fieldname}': {message}")

        automaton = compile_pattern(spec, lambda f, text: expr(f, text, "bool"), refuse)
        if problems or automaton is None:
            raise RuleError(problems[0], problems)
        return CompiledRule(spec, kinds, when, emit, pattern=automaton)
    if isinstance(spec, ThresholdSpec):
        value = expr("value", spec.value, "num")
        threshold = expr("threshold", spec.threshold, "num")
        if problems:
            raise RuleError(problems[0], problems)
        return CompiledRule(spec, kinds, when, emit, value, threshold)
    if isinstance(spec, LocationSpec):
        if any(k is not EventKind.LOCATION for k in kinds):
            problems.append(
                f"{where}: rule '{spec.id}': field 'on': "
                "a location rule listens to location events only"
            )
        near = compile_expression(
            f"{DISTANCE_FROM_HOME} > {spec.min_distance_km!r}", VOCABULARY, "bool"
        )
        when_all = (
            near
            if when is None
            else compile_expression(f"({near.source}) and ({when.source})", VOCABULARY, "bool")
        )
        emit.setdefault("distance_km", compile_expression(DISTANCE_FROM_HOME, VOCABULARY, "num"))
        if problems:
            raise RuleError(problems[0], problems)
        return CompiledRule(
            spec, kinds, when_all, emit, cooldown_ms=parse_duration_ms(spec.cooldown)
        )
    if problems:
        raise RuleError(problems[0], problems)
    if when is None:
        raise RuleError(
            f"{where}: rule '{spec.id}': field 'when': a condition rule needs a condition"
        )
    return CompiledRule(spec, kinds, when, emit, cooldown_ms=parse_duration_ms(spec.cooldown))


def _field_path(loc: tuple[Any, ...]) -> tuple[int | None, str]:
    # pydantic locations look like ('rules', 3, 'threshold', 'once_per')
    index = loc[1] if len(loc) > 1 and loc[0] == "rules" and isinstance(loc[1], int) else None
    rest = [str(p) for p in loc[2:]]
    if len(rest) > 1 and rest[0] in ("threshold", "condition", "location", "pattern", "window"):
        rest = rest[1:]  # the discriminator tag pydantic puts in the path
    return index, ".".join(rest) if rest else "type"


def parse_rules(document: Any, source: str = "<rules>") -> RuleSet:
    """Validate and compile a parsed YAML document; every problem is reported, then raised."""
    bad_text = unencodable_text(document)
    if bad_text:
        raise RuleError(
            f"{source}: text that is not valid Unicode (a lone surrogate) at {bad_text}"
        )
    if not isinstance(document, Mapping) or "rules" not in document:
        raise RuleError(f"{source}: expected a mapping with a 'rules' list at the top")
    raw_rules = document["rules"]
    if not isinstance(raw_rules, list):
        raise RuleError(f"{source}: 'rules' must be a list")
    unknown = set(document) - {"rules"}
    problems: list[str] = [f"{source}: unknown top-level key '{k}'" for k in sorted(unknown)]
    specs: list[AnySpec] = []
    for index, raw in enumerate(raw_rules):
        rid = str(raw.get("id", f"#{index + 1}")) if isinstance(raw, Mapping) else f"#{index + 1}"
        try:
            specs.append(_RULE_ADAPTER.validate_python(raw))
        except ValidationError as exc:
            for err in exc.errors():
                _, path = _field_path(("rules", index, *err["loc"]))
                problems.append(f"{source}: rule '{rid}': field '{path}': {err['msg']}")
    seen: set[str] = set()
    compiled: list[CompiledRule] = []
    windows: dict[str, Window] = {}
    # windows first (over the base names only), then the rules that may read them
    for spec in sorted(specs, key=lambda s: not isinstance(s, WindowSpec)):
        if spec.id in seen:
            problems.append(f"{source}: rule '{spec.id}': field 'id': duplicate rule id")
            continue
        seen.add(spec.id)
        if isinstance(spec, WindowSpec) and spec.id in VOCABULARY:
            problems.append(
                f"{source}: rule '{spec.id}': field 'id': a window's name must not be a known "
                "name (it would hide it)"
            )
            continue
        try:
            rule = _compile(spec, source, None if isinstance(spec, WindowSpec) else windows)
        except RuleError as exc:
            problems.extend(exc.problems)
            continue
        if rule.window is not None and spec.enabled:
            windows[spec.id] = rule.window
        if spec.enabled:
            compiled.append(rule)
    order = {spec.id: i for i, spec in enumerate(specs)}
    compiled.sort(key=lambda r: order[r.id])
    if problems:
        raise RuleError(problems[0], problems)
    return RuleSet(tuple(compiled), source, dict(document))


def parse_rules_text(text: str, source: str = "<rules>") -> RuleSet:
    try:
        document = load_yaml(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"{source}: not valid YAML: {exc}") from exc
    return parse_rules(document, source)


def load_rules(path: str | Path) -> RuleSet:
    """Load and compile a rule file; RuleError lists every problem with file, rule id and field."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RuleError(f"{p}: cannot read rule file: {exc.strerror}") from exc
    return parse_rules_text(text, str(p))
