"""A small safe expression language, compiled to vectorized numpy evaluation.

Text is parsed with Python's own parser (``ast.parse(mode="eval")``) and only a whitelist of
node types is accepted: numbers, strings, names from a fixed vocabulary, arithmetic
(``+ - * / %``), comparisons (``< <= > >= == !=``, ``in`` / ``not in`` a list of constants),
``and`` / ``or`` / ``not``, and calls of whitelisted functions. Nothing is ever ``eval``-ed:
the tree is turned into closures over numpy arrays. Every expression is type-checked
(number, boolean, string) at compile time, so errors surface when rules load, not mid-stream.

Missing numbers are NaN; a comparison involving NaN is false, as in SQL.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from engine.errors import RuleError
from engine.limits import MAX_EXPRESSION_CHARS, MAX_EXPRESSION_DEPTH, MAX_NUMBER
from engine.reference import EARTH_RADIUS_KM, Pooled, ReferenceData

Type = Literal["num", "bool", "str"]
Array = np.ndarray


class Context(Protocol):
    """Gives the column for a name, one value per row of the batch being evaluated."""

    @property
    def size(self) -> int: ...

    @property
    def reference(self) -> ReferenceData:
        """The reference tables the reference functions read (``engine.reference``)."""
        ...

    def column(self, name: str) -> Array: ...


class _Subset:
    """Rows ``rows`` of a Context, as a Context (``and``/``or`` evaluate their later operands
    only on the rows the earlier ones left undecided)."""

    def __init__(self, ctx: Context, rows: Array) -> None:
        self.ctx = ctx
        self.rows = rows
        self.size = int(rows.size)
        self.reference = ctx.reference

    def column(self, name: str) -> Array:
        return self.ctx.column(name)[self.rows]

    def pooled(self, name: str) -> Pooled | None:
        found = pooled(self.ctx, name)
        return None if found is None else found.take(self.rows)


def pooled(ctx: Context, name: str) -> Pooled | None:
    """String column ``name`` of ``ctx`` as codes into its pool, if the context keeps it so
    (``BatchView.pooled``: the golden record's time zone and device model); else None."""
    get = getattr(ctx, "pooled", None)
    return None if get is None else get(name)


@dataclass(frozen=True)
class Function:
    """A function callable from expressions: argument types, result type, implementation."""

    args: tuple[Type, ...]
    result: Type
    impl: Callable[..., Array]
    #: context columns the function reads implicitly (e.g. event time)
    reads: tuple[str, ...] = ()
    #: it reads the reference tables: called with the context's ReferenceData first
    reference: bool = False
    #: its first argument, when a name, may come as ``Pooled`` codes (``pooled``)
    takes_pooled: bool = False


def haversine_km(lat1: Array, lon1: Array, lat2: Array, lon2: Array) -> Array:
    """Great-circle distance in km, vectorized."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _ctx_fn(name: str) -> Callable[[Context], Array]:
    return lambda ctx: ctx.column(name)


BUILTINS: dict[str, Function] = {
    "distance_km": Function(("num", "num", "num", "num"), "num", haversine_km),
    "abs": Function(("num",), "num", np.abs),
    "min": Function(("num", "num"), "num", np.fmin),
    "max": Function(("num", "num"), "num", np.fmax),
    "is_missing": Function(("num",), "bool", np.isnan),
    # implicit-context functions: computed by the evaluation context on demand
    "days_left": Function((), "num", _ctx_fn("@days_left"), reads=("@days_left",)),
    "local_hour": Function((), "num", _ctx_fn("@local_hour"), reads=("@local_hour",)),
    # reference tables (engine.reference): the recall list, accessories, stores with stock
    "recalled": Function(
        ("str",), "bool", ReferenceData.recalled, reference=True, takes_pooled=True
    ),
    "replacement_of": Function(
        ("str",), "str", ReferenceData.replacement_of, reference=True, takes_pooled=True
    ),
    "accessory_of": Function(
        ("str",), "str", ReferenceData.accessory_of, reference=True, takes_pooled=True
    ),
    "nearest_store_km": Function(
        ("str", "num", "num"), "num", ReferenceData.nearest_store_km, reference=True
    ),
}
#: ``and``/``or`` over at least this many rows evaluate a later operand only on the rows still
#: undecided, when they are fewer than half (the result is the same: every operation is per row)
SHORT_CIRCUIT_ROWS = 64

_ARITH: dict[type[ast.operator], Callable[[Array, Array], Array]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: np.fmod,
}
_CMP: dict[type[ast.cmpop], Callable[[Array, Array], Array]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_CONSTANT_NAMES = {"true": True, "false": False, "True": True, "False": False}

Compiled = Callable[[Context], Array]


def _constant(value: bool | float | str) -> tuple[Type, Compiled]:
    """A constant: a 0-d array that broadcasts against columns."""
    if isinstance(value, bool):
        return "bool", lambda ctx: np.array(value)
    if isinstance(value, int | float):
        number = float(value)
        return "num", lambda ctx: np.array(number)
    return "str", lambda ctx: np.array(value, dtype=object)


@dataclass(frozen=True)
class Expression:
    """A compiled expression: its source, result type, the names it reads, its evaluator."""

    source: str
    type: Type
    names: frozenset[str]
    _fn: Compiled

    def evaluate(self, ctx: Context) -> Array:
        """One value per row of ``ctx``, always a full-length array."""
        out = np.asarray(self._fn(ctx))
        if out.ndim == 0:
            out = np.full(ctx.size, out[()])
        return out

    def __str__(self) -> str:
        return self.source


class _Compiler:
    def __init__(self, source: str, vocabulary: Mapping[str, Type]) -> None:
        self.source = source
        self.vocabulary = vocabulary
        self.names: set[str] = set()

    def fail(self, node: ast.AST | None, message: str) -> RuleError:
        where = ""
        if node is not None and hasattr(node, "col_offset"):
            where = (
                f" (at column {node.col_offset + 1}: {ast.get_source_segment(self.source, node)!r})"
            )
        return RuleError(f"{message}{where}")

    def compile(self, node: ast.AST) -> tuple[Type, Compiled]:
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, int | float) and not _in_range(value):
                raise self.fail(node, f"a number beyond +-{MAX_NUMBER:g} (limit max_number)")
            if isinstance(value, bool | int | float | str):
                return _constant(value)
            raise self.fail(node, f"unsupported constant of type {type(value).__name__}")
        if isinstance(node, ast.Name):
            if node.id in _CONSTANT_NAMES:
                return _constant(_CONSTANT_NAMES[node.id])
            typ = self.vocabulary.get(node.id)
            if typ is None:
                known = ", ".join(sorted(self.vocabulary))
                raise self.fail(node, f"unknown name '{node.id}'; known names: {known}")
            self.names.add(node.id)
            return typ, lambda ctx, n=node.id: ctx.column(n)
        if isinstance(node, ast.UnaryOp):
            typ, fn = self.compile(node.operand)
            if isinstance(node.op, ast.Not):
                self.expect(node.operand, typ, "bool", "'not'")
                return "bool", lambda ctx: np.logical_not(fn(ctx))
            if isinstance(node.op, ast.USub | ast.UAdd):
                self.expect(node.operand, typ, "num", "unary minus")
                sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
                return "num", lambda ctx: sign * fn(ctx)
            raise self.fail(node, "unsupported unary operator")
        if isinstance(node, ast.BinOp):
            op = _ARITH.get(type(node.op))
            if op is None:
                raise self.fail(node, "unsupported operator; use + - * / %")
            lt, lf = self.compile(node.left)
            rt, rf = self.compile(node.right)
            self.expect(node.left, lt, "num", "arithmetic")
            self.expect(node.right, rt, "num", "arithmetic")

            def arith(ctx: Context) -> Array:
                with np.errstate(divide="ignore", invalid="ignore"):
                    return op(np.asarray(lf(ctx), dtype=np.float64), rf(ctx))

            return "num", arith
        if isinstance(node, ast.BoolOp):
            parts = [self.compile(v) for v in node.values]
            for operand, (typ, _) in zip(node.values, parts, strict=True):
                self.expect(operand, typ, "bool", "'and'/'or'")
            fns = [f for _, f in parts]
            conjunction = isinstance(node.op, ast.And)
            combine = np.logical_and if conjunction else np.logical_or

            def boolop(ctx: Context) -> Array:
                out = np.asarray(fns[0](ctx))
                for f in fns[1:]:
                    if out.ndim == 0 or ctx.size < SHORT_CIRCUIT_ROWS:
                        out = combine(out, f(ctx))
                        continue
                    undecided = np.flatnonzero(out if conjunction else ~out)
                    if undecided.size * 2 >= ctx.size:
                        out = combine(out, f(ctx))
                        continue
                    out = out.copy()
                    if undecided.size:
                        out[undecided] = combine(out[undecided], f(_Subset(ctx, undecided)))
                return out

            return "bool", boolop
        if isinstance(node, ast.Compare):
            return self.compile_compare(node)
        if isinstance(node, ast.Call):
            return self.compile_call(node)
        raise self.fail(node, f"'{type(node).__name__}' is not allowed in rule expressions")

    def compile_compare(self, node: ast.Compare) -> tuple[Type, Compiled]:
        steps: list[Compiled] = []
        left_node = node.left
        lt, lf = self.compile(left_node)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn):
                if not isinstance(right_node, ast.List | ast.Tuple | ast.Set):
                    raise self.fail(
                        right_node, "'in' needs a list of constants, e.g. in ['a', 'b']"
                    )
                values: list[Any] = []
                for elt in right_node.elts:
                    if not isinstance(elt, ast.Constant) or isinstance(elt.value, bool):
                        raise self.fail(elt, "'in' lists hold only numbers or strings")
                    values.append(elt.value)
                want: Type = "str" if all(isinstance(v, str) for v in values) else "num"
                self.expect(left_node, lt, want, "'in'")
                member = np.array(values, dtype=object if want == "str" else np.float64)
                negate = isinstance(op, ast.NotIn)

                def contains(
                    ctx: Context, f: Compiled = lf, m: Array = member, neg: bool = negate
                ) -> Array:
                    out = np.isin(np.asarray(f(ctx)), m)
                    return ~out if neg else out

                steps.append(contains)
                rt, rf = lt, lf  # 'in' compares the same left operand again if chained
            else:
                cmp = _CMP.get(type(op))
                if cmp is None:
                    raise self.fail(node, "unsupported comparison")
                rt, rf = self.compile(right_node)
                if lt != rt or lt == "bool":
                    raise self.fail(node, f"cannot compare {lt} with {rt}")
                if lt == "str" and not isinstance(op, ast.Eq | ast.NotEq):
                    raise self.fail(node, "strings compare only with == and !=")

                def compare(
                    ctx: Context,
                    c: Callable[[Array, Array], Array] = cmp,
                    a: Compiled = lf,
                    b: Compiled = rf,
                ) -> Array:
                    with np.errstate(invalid="ignore"):
                        return np.asarray(c(a(ctx), b(ctx)), dtype=bool)

                steps.append(compare)
            left_node, lt, lf = right_node, rt, rf

        def chain(ctx: Context) -> Array:
            out = steps[0](ctx)
            for s in steps[1:]:
                out = np.logical_and(out, s(ctx))
            return out

        return "bool", chain

    def compile_call(self, node: ast.Call) -> tuple[Type, Compiled]:
        if not isinstance(node.func, ast.Name) or node.func.id not in BUILTINS:
            raise self.fail(node, f"unknown function; known: {', '.join(sorted(BUILTINS))}")
        if node.keywords:
            raise self.fail(node, "functions take positional arguments only")
        fn = BUILTINS[node.func.id]
        if len(node.args) != len(fn.args):
            raise self.fail(
                node, f"{node.func.id}() takes {len(fn.args)} arguments, got {len(node.args)}"
            )
        compiled = []
        for arg, want in zip(node.args, fn.args, strict=True):
            typ, f = self.compile(arg)
            self.expect(arg, typ, want, f"{node.func.id}()")
            compiled.append(f)
        self.names.update(fn.reads)
        if fn.reads:
            return fn.result, fn.impl
        impl = fn.impl
        first = node.args[0] if node.args else None
        if fn.takes_pooled and isinstance(first, ast.Name) and first.id not in _CONSTANT_NAMES:
            compiled[0] = _pooled_or_column(first.id)
        if fn.reference:
            return fn.result, lambda ctx: impl(ctx.reference, *(f(ctx) for f in compiled))
        return fn.result, lambda ctx: impl(*(f(ctx) for f in compiled))

    def expect(self, node: ast.AST, got: Type, want: Type, where: str) -> None:
        if got != want:
            raise self.fail(node, f"{where} needs a {_NOUN[want]}, got a {_NOUN[got]}")


_NOUN = {"num": "number", "bool": "condition", "str": "string"}


def _pooled_or_column(name: str) -> Compiled:
    """The column ``name`` as ``Pooled`` codes where the context has them, else its strings."""

    def get(ctx: Context) -> Any:
        found = pooled(ctx, name)
        return ctx.column(name) if found is None else found

    return get


def _in_range(value: float) -> bool:
    """A finite number within +-MAX_NUMBER (compared as int first: huge ints overflow floats)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_NUMBER
    return math.isfinite(value) and abs(value) <= MAX_NUMBER


def _depth(node: ast.AST) -> int:
    """Depth of a syntax tree, iteratively (the compiler below recurses: bounded by this)."""
    deepest = 0
    stack = [(node, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(item))
    return deepest


def compile_expression(
    source: str, vocabulary: Mapping[str, Type], want: Type | None = None
) -> Expression:
    """Compile ``source`` against ``vocabulary``; raise RuleError naming what is wrong and where."""
    text = str(source).strip()
    if not text:
        raise RuleError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise RuleError(
            f"expression of {len(text):,} characters: the limit is {MAX_EXPRESSION_CHARS:,} "
            "(max_expression_chars)"
        )
    too_deep = RuleError(
        f"expression nests deeper than {MAX_EXPRESSION_DEPTH} levels (max_expression_depth)"
    )
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise RuleError(f"syntax error at column {exc.offset}: {exc.msg}") from exc
    except (RecursionError, MemoryError, ValueError) as exc:  # the parser's own limits
        raise too_deep from exc
    if _depth(tree.body) > MAX_EXPRESSION_DEPTH:
        raise too_deep
    compiler = _Compiler(text, vocabulary)
    typ, fn = compiler.compile(tree.body)
    if want is not None and typ != want:
        raise RuleError(f"expected a {_NOUN[want]}, got a {_NOUN[typ]}")
    return Expression(text, typ, frozenset(compiler.names), fn)
