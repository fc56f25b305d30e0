"""Limits on what a request or a document may hold: named here, enforced before the work.

Every limit has a name users see in the error that enforces it (``LIMITS`` below, listed in
the README), so a refused request says which limit it hit. The point is bounded cost: no
request can cost the service more than a small constant times its own size, and no input can
reach the framework as a 500.
"""

from __future__ import annotations

from engine.units import DAY_MS

#: events in one ``POST /v1/events`` (more: 413)
MAX_EVENTS_PER_REQUEST = 10_000
#: nesting of a request body: an array of events, an event map, a list value (deeper: 400)
MAX_EVENT_DEPTH = 3
#: fields in one event map (there are fewer payload fields than this)
MAX_FIELDS_PER_EVENT = 64
#: errors an ingest answer lists (the count is always the whole)
MAX_ERRORS_LISTED = 100
#: characters of an identifier (customer_id, a textual event_id, request_id)
MAX_ID_CHARS = 256
#: a rules or offers document: bytes, nesting depth (deeper: 422); YAML aliases are refused
MAX_DOCUMENT_BYTES = 1 << 20
MAX_DOCUMENT_DEPTH = 16
#: a reference table (``PUT /v1/reference/{name}``): bytes of the body (YAML: the document
#: limit), rows, characters of a text value, and bytes a Parquet body may decode to
MAX_REFERENCE_BYTES = 16 << 20
MAX_REFERENCE_ROWS = 200_000
MAX_REFERENCE_CHARS = 256
MAX_REFERENCE_DECODED_BYTES = 64 << 20
#: a rule or eligibility expression: characters and syntax-tree depth
MAX_EXPRESSION_CHARS = 2_000
MAX_EXPRESSION_DEPTH = 32
#: the magnitude of a number in an expression or a document
MAX_NUMBER = 1e15
#: a duration in a rule or catalog (cooldowns, windows): at most ten years
MAX_DURATION_MS = 3650 * DAY_MS

#: accepted event times (ingest, inbound decisions, training cutoffs): [1970-01-01, 2200-01-01)
TS_MIN_MS, TS_MAX_MS = 0, 7_258_118_400_000
TS_RANGE_TEXT = "1970-01-01 .. 2200-01-01 (epoch milliseconds 0 .. 7258118400000)"

#: name -> value, as the README lists them
LIMITS: dict[str, float] = {
    "max_events_per_request": MAX_EVENTS_PER_REQUEST,
    "max_event_depth": MAX_EVENT_DEPTH,
    "max_fields_per_event": MAX_FIELDS_PER_EVENT,
    "max_errors_listed": MAX_ERRORS_LISTED,
    "max_id_chars": MAX_ID_CHARS,
    "max_document_bytes": MAX_DOCUMENT_BYTES,
    "max_document_depth": MAX_DOCUMENT_DEPTH,
    "max_reference_bytes": MAX_REFERENCE_BYTES,
    "max_reference_rows": MAX_REFERENCE_ROWS,
    "max_reference_chars": MAX_REFERENCE_CHARS,
    "max_reference_decoded_bytes": MAX_REFERENCE_DECODED_BYTES,
    "max_expression_chars": MAX_EXPRESSION_CHARS,
    "max_expression_depth": MAX_EXPRESSION_DEPTH,
    "max_number": MAX_NUMBER,
    "max_duration_ms": MAX_DURATION_MS,
    "ts_min_ms": TS_MIN_MS,
    "ts_max_ms": TS_MAX_MS,
}


def time_in_range(ms: int) -> bool:
    """Is ``ms`` (epoch milliseconds) an event time Kairos accepts?"""
    return TS_MIN_MS <= ms < TS_MAX_MS


def unencodable_text(value: object, limit: int = 5) -> list[str]:
    """Paths of strings (keys or values) in ``value`` that UTF-8 cannot carry (lone
    surrogates, which JSON allows); at most ``limit`` of them. Iterative and total."""
    found: list[str] = []
    stack: list[tuple[object, str]] = [(value, "")]
    while stack and len(found) < limit:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                found.append(path or "(the document)")
        elif isinstance(item, dict):
            for key, child in item.items():
                name = (
                    key.encode("utf-8", "backslashreplace").decode()
                    if isinstance(key, str)
                    else repr(key)
                )
                stack.append((key, f"{path}.{name}" if path else name))
                stack.append((child, f"{path}.{name}" if path else name))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return found


def depth_over(value: object, limit: int) -> bool:
    """True if ``value`` (decoded JSON, msgpack or YAML) nests deeper than ``limit`` containers.

    Iterative, so it is total on any input; stops at the first container past the limit.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            children = list(item)
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
