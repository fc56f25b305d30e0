"""Rule files are validated with errors naming file, rule id and field."""

from __future__ import annotations

import pytest

from engine.errors import RuleError
from engine.rules.duration import parse_duration_ms
from engine.rules.spec import load_rules, parse_rules_text


def test_shipped_rules_load(rules) -> None:
    assert [r.id for r in rules.rules] == [
        "data_cap_nearing",
        "over_cap_cycles",
        "over_cap_third_time",
        "away_from_home",
        "recalled_device_in_use",
        "browsing",
        "cart_left_while_browsing",
    ]
    by_id = {r.id: r for r in rules.rules}
    assert by_id["away_from_home"].cooldown_ms == 24 * 3_600_000
    assert by_id["cart_left_while_browsing"].pattern is not None
    assert by_id["over_cap_cycles"].window is not None and by_id["over_cap_cycles"].window.distinct


def test_every_problem_is_reported_with_file_rule_and_field(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("""
rules:
  - id: cap
    type: threshold
    on: usage
    value: cycle_usage_mb
    threshold: 0.8 * plan_cap
  - id: far
    type: location
    min_distance_km: -5
  - id: cond
    type: condition
    on: [usage, teleport]
    when: mb > 1
  - id: cap
    type: condition
    on: usage
    when: mb +
""")
    with pytest.raises(RuleError) as info:
        load_rules(path)
    problems = info.value.problems
    text = "\n".join(problems)
    assert f"{path}: rule 'cap': field 'threshold': unknown name 'plan_cap'" in text
    assert f"{path}: rule 'far': field 'min_distance_km'" in text
    assert f"{path}: rule 'cond': field 'on'" in text and "teleport" in text
    assert len(problems) >= 3


def test_duplicate_ids_and_bad_expressions_are_named() -> None:
    with pytest.raises(RuleError) as info:
        parse_rules_text(
            """
rules:
  - {id: a, type: condition, on: usage, when: "mb > 1"}
  - {id: a, type: condition, on: usage, when: "mb > 2"}
  - {id: b, type: condition, on: usage, when: "mb +"}
""",
            "r.yaml",
        )
    text = "\n".join(info.value.problems)
    assert "r.yaml: rule 'a': field 'id': duplicate rule id" in text
    assert "r.yaml: rule 'b': field 'when': syntax error" in text


def test_yaml_on_key_is_not_a_boolean_and_numbers_are_expressions() -> None:
    rules = parse_rules_text(
        "rules:\n  - {id: t, type: threshold, on: usage, value: mb, threshold: 300}"
    )
    assert rules.rules[0].threshold is not None and rules.rules[0].threshold.source == "300"


def test_not_yaml_and_missing_file_are_clear_errors(tmp_path) -> None:
    with pytest.raises(RuleError, match="not valid YAML"):
        parse_rules_text("rules: [", "x.yaml")
    with pytest.raises(RuleError, match="cannot read rule file"):
        load_rules(tmp_path / "missing.yaml")
    with pytest.raises(RuleError, match="'rules' list"):
        parse_rules_text("just: text", "x.yaml")


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("24h", 86_400_000),
        ("30m", 1_800_000),
        ("90s", 90_000),
        ("7d", 604_800_000),
        ("250ms", 250),
        (5, 5000),
    ],
)
def test_durations(text, ms) -> None:
    assert parse_duration_ms(text) == ms
