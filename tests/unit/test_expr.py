"""The expression language: vectorized results equal Python's, unsafe text is refused."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import RuleError
from engine.rules.expr import compile_expression, haversine_km

VOCAB = {"a": "num", "b": "num", "s": "str"}


class Ctx:
    def __init__(self, **cols):
        self.cols = {k: np.asarray(v) for k, v in cols.items()}
        self.size = len(next(iter(self.cols.values())))

    def column(self, name):
        return self.cols[name]


CTX = Ctx(
    a=[1.0, 2.0, np.nan, 4.0],
    b=[4.0, 3.0, 2.0, 1.0],
    s=np.array(["x", "y", None, "x"], dtype=object),
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a + b * 2", [9.0, 8.0, np.nan, 6.0]),
        ("a < b", [True, True, False, False]),
        ("a < b and not (b > 3.5)", [False, True, False, False]),
        ("a >= 2 or s == 'x'", [True, True, False, True]),
        ("s in ['y', 'z']", [False, True, False, False]),
        ("1 < a <= 2", [False, True, False, False]),
        ("max(a, b) - min(a, b)", [3.0, 1.0, 0.0, 3.0]),
        ("b % 2", [0.0, 1.0, 0.0, 1.0]),
        ("is_missing(a)", [False, False, True, False]),
        ("-a", [-1.0, -2.0, np.nan, -4.0]),
    ],
)
def test_expressions_evaluate_elementwise(text, expected) -> None:
    got = compile_expression(text, VOCAB).evaluate(CTX)
    np.testing.assert_array_equal(got, np.asarray(expected))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os').system('true')", "unknown function"),
        ("a.__class__", "'Attribute' is not allowed"),
        ("[x for x in a]", "not allowed"),
        ("c > 1", "unknown name 'c'"),
        ("a and b", "needs a condition"),
        ("s < 'x'", "strings compare only"),
        ("a +", "syntax error"),
        ("a ** 2", "unsupported operator"),
        ("lambda: 1", "not allowed"),
    ],
)
def test_unsafe_or_wrong_expressions_are_refused_with_a_reason(text, message) -> None:
    with pytest.raises(RuleError, match=message):
        compile_expression(text, VOCAB)


def test_haversine_berlin_to_munich_is_about_504_km() -> None:
    assert haversine_km(52.52, 13.405, 48.137, 11.575) == pytest.approx(504.4, abs=1.0)
