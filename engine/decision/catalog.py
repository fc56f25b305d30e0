"""The offer catalog: YAML -> validated offers and contact policy, with errors naming file,
offer id and field.

A catalog document has two keys:

* ``policy``: the contact policy every decision obeys (frequency caps, quiet hours, consent
  mode, control group share, exploration rate, attribution window);
* ``offers``: the actions a decision can choose, each with the triggers (rule ids) it
  answers, an eligibility condition in the rule expression language, the channels it can be
  sent on (in order of preference), its value (margin if accepted) and contact cost, and a
  per-customer cooldown.

NO_ACTION is not listed: it is always a candidate, with value 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.errors import CatalogError, RuleError
from engine.events.schema import CHANNELS, PROFILE_FIELDS
from engine.limits import MAX_NUMBER, unencodable_text
from engine.rules.duration import parse_duration_ms
from engine.rules.expr import Expression, compile_expression
from engine.rules.probe import probe
from engine.rules.spec import RULE_ID, VOCABULARY, ExprText
from engine.yamlfile import load_yaml

NO_ACTION = "NO_ACTION"


def _duration(value: str | float) -> str | float:
    parse_duration_ms(value)
    return value


class FrequencyCap(BaseModel):
    """At most ``max`` offers delivered per ``per`` (a duration), per customer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max: Annotated[int, Field(ge=0, le=16)]
    per: str | float

    _check = field_validator("per")(_duration)

    @property
    def per_ms(self) -> int:
        return parse_duration_ms(self.per)


class QuietHours(BaseModel):
    """No outbound offers from ``start`` to ``end`` o'clock in the customer's own time zone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: Annotated[int, Field(ge=0, le=23)] = 21
    end: Annotated[int, Field(ge=0, le=23)] = 8


class PolicySpec(BaseModel):
    """The contact policy; every field has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frequency_caps: list[FrequencyCap] = Field(
        default_factory=lambda: [FrequencyCap(max=1, per="24h"), FrequencyCap(max=3, per="7d")]
    )
    quiet_hours: QuietHours | None = Field(default_factory=QuietHours)
    #: opt_out: a reachable channel may be used unless consent was withdrawn;
    #: opt_in: only channels with consent granted
    consent: Literal["opt_out", "opt_in"] = "opt_out"
    control_share: Annotated[float, Field(ge=0, lt=1)] = 0.05
    exploration: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    #: share of decisions (with a candidate) randomized to NO_ACTION, logged with its
    #: probability: what customers do without an offer, at every kind of moment
    no_action_share: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    attribution_window: str | float = "72h"
    #: salt of the stable hashes (control group, exploration draws)
    seed: Annotated[int, Field(ge=0, lt=1 << 32)] = 0
    #: what a customer's opt-out costs (the value of contacting them later): weighs a model's
    #: P(opt-out | contact) in the objective; 0 leaves opt-outs out of it
    customer_value: Annotated[float, Field(ge=0, le=MAX_NUMBER)] = 0.0

    _check = field_validator("attribution_window")(_duration)

    @property
    def attribution_window_ms(self) -> int:
        return parse_duration_ms(self.attribution_window)

    @property
    def contacts_kept(self) -> int:
        """How many past contact times are kept per customer: what the caps need, and at
        least 3 for the recent-contacts features."""
        return max([3, *(c.max for c in self.frequency_caps)])


class ConversionSpec(BaseModel):
    """The ordinary event that shows a customer did what the offer is about, with the offer
    or without it: a ``purchase`` (or ``cart_add``) of ``item`` (any item if unset), a
    ``checkout``, or a ``profile_update`` that sets ``field``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["purchase", "checkout", "cart_add", "profile_update"]
    item: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    field: str | None = None

    @field_validator("field")
    @classmethod
    def _profile_field(cls, value: str | None) -> str | None:
        if value is not None and value not in PROFILE_FIELDS:
            raise ValueError(f"unknown profile field {value!r}; known: {', '.join(PROFILE_FIELDS)}")
        return value


class OfferSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=RULE_ID)]
    description: str = ""
    answers: list[Annotated[str, Field(pattern=RULE_ID)]] = Field(min_length=1)
    eligible: ExprText | None = None
    channels: list[str] = Field(min_length=1)
    value: Annotated[float, Field(ge=0, le=MAX_NUMBER)]
    #: the margin of the same conversion bought without the offer (default: ``value``): what
    #: a customer who would have converted anyway brings without it
    list_value: Annotated[float, Field(ge=0, le=MAX_NUMBER)] | None = None
    cost: Annotated[float, Field(ge=0, le=MAX_NUMBER)] = 0.0
    cooldown: str | float = "7d"
    #: the event that shows a conversion, with or without the offer (models.attribution);
    #: None: only an accepted offer_response counts
    conversion: ConversionSpec | None = None
    enabled: bool = True

    _check = field_validator("cooldown")(_duration)

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == NO_ACTION:
            raise ValueError(f"'{NO_ACTION}' is reserved: no action is always a candidate")
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in CHANNELS]
        if unknown:
            raise ValueError(f"unknown channel(s) {unknown}; known: {', '.join(CHANNELS)}")
        return value


@dataclass(frozen=True)
class Offer:
    """A validated offer with its compiled eligibility condition."""

    spec: OfferSpec
    eligible: Expression | None
    cooldown_ms: int

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True)
class Catalog:
    """The offers (in file order) and the contact policy, with the document they came from."""

    offers: tuple[Offer, ...]
    policy: PolicySpec
    source: str = "<catalog>"
    document: Mapping[str, Any] = field(default_factory=dict)

    @property
    def offer_ids(self) -> tuple[str, ...]:
        return tuple(o.id for o in self.offers)

    def expected_values(
        self,
        propensity: np.ndarray,
        baseline: np.ndarray,
        opt_out: np.ndarray,
        customer_value: np.ndarray | None = None,
    ) -> np.ndarray:
        """The objective per (decision, offer): incremental expected value against NO_ACTION,

        ``P(convert | offer) x value - P(convert | no action) x list value - cost
        - P(opt-out | contact) x customer value``;

        ``baseline`` and ``opt_out`` are NaN where the model gives none (a response model):
        then it is ``propensity x value - cost``, the response objective. NaN propensities
        (not scored) stay NaN. ``customer_value``: per decision, from the customer's profile;
        NaN (or None) is the policy's ``customer_value``."""
        values = np.array([o.spec.value for o in self.offers])
        listed = np.array(
            [o.spec.value if o.spec.list_value is None else o.spec.list_value for o in self.offers]
        )
        costs = np.array([o.spec.cost for o in self.offers])
        return (
            propensity * values
            - np.nan_to_num(baseline) * listed
            - costs
            - np.nan_to_num(opt_out) * self._customer_value(customer_value, len(propensity))
        )

    def _customer_value(self, given: np.ndarray | None, n: int) -> np.ndarray | float:
        """Per decision (a column), the profile's customer value or the policy's."""
        if given is None:
            return self.policy.customer_value
        value = np.asarray(given, dtype=np.float64).reshape(n)
        return np.where(np.isnan(value), self.policy.customer_value, value)[:, None]

    @property
    def trigger_ids(self) -> tuple[str, ...]:
        """Every rule id some offer answers, sorted."""
        return tuple(sorted({r for o in self.offers for r in o.spec.answers}))

    def answering(self, rule_id: str) -> tuple[int, ...]:
        """Indexes of the offers that answer ``rule_id``."""
        return tuple(i for i, o in enumerate(self.offers) if rule_id in o.spec.answers)

    @property
    def names(self) -> frozenset[str]:
        exprs = [o.eligible for o in self.offers if o.eligible is not None]
        return frozenset().union(*(e.names for e in exprs)) if exprs else frozenset()


def parse_catalog(document: Any, source: str = "<catalog>") -> Catalog:
    """Validate a parsed YAML document; every problem is reported, then raised as CatalogError."""
    bad_text = unencodable_text(document)
    if bad_text:
        raise CatalogError(
            f"{source}: text that is not valid Unicode (a lone surrogate) at {bad_text}"
        )
    if not isinstance(document, Mapping) or "offers" not in document:
        raise CatalogError(f"{source}: expected a mapping with an 'offers' list at the top")
    problems = [
        f"{source}: unknown top-level key '{k}'"
        for k in sorted(set(document) - {"offers", "policy"})
    ]
    policy = PolicySpec()
    try:
        policy = PolicySpec.model_validate(document.get("policy") or {})
    except ValidationError as exc:
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"]) or "policy"
            problems.append(f"{source}: policy: field '{path}': {err['msg']}")
    raw_offers = document["offers"]
    if not isinstance(raw_offers, list):
        raise CatalogError(f"{source}: 'offers' must be a list")
    offers: list[Offer] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_offers):
        oid = str(raw.get("id", f"#{index + 1}")) if isinstance(raw, Mapping) else f"#{index + 1}"
        try:
            spec = OfferSpec.model_validate(raw)
        except ValidationError as exc:
            for err in exc.errors():
                path = ".".join(str(p) for p in err["loc"]) or "offer"
                problems.append(f"{source}: offer '{oid}': field '{path}': {err['msg']}")
            continue
        if spec.id in seen:
            problems.append(f"{source}: offer '{spec.id}': field 'id': duplicate offer id")
            continue
        seen.add(spec.id)
        eligible = None
        if spec.eligible is not None:
            try:
                eligible = compile_expression(spec.eligible, VOCABULARY, "bool")
                probe(eligible)
            except RuleError as exc:
                problems.append(f"{source}: offer '{spec.id}': field 'eligible': {exc}")
                continue
        if spec.enabled:
            offers.append(Offer(spec, eligible, parse_duration_ms(spec.cooldown)))
    if problems:
        raise CatalogError(problems[0], problems)
    return Catalog(tuple(offers), policy, source, dict(document))


def parse_catalog_text(text: str, source: str = "<catalog>") -> Catalog:
    try:
        document = load_yaml(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"{source}: not valid YAML: {exc}") from exc
    return parse_catalog(document, source)


def load_catalog(path: str | Path) -> Catalog:
    """Load an offer catalog file; CatalogError lists every problem (file, offer id, field)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise CatalogError(f"{p}: cannot read offer catalog: {exc.strerror}") from exc
    return parse_catalog_text(text, str(p))
