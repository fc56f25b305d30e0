"""Dead letters: events that were not applied, each with the reason, the field and the value."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import pyarrow as pa

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64()),
        pa.field("event_id", pa.uint64()),
        pa.field("kind", pa.string()),
        pa.field("field", pa.string()),
        pa.field("value", pa.string()),
        pa.field("reason", pa.string()),
    ]
)

#: fields whose values are personal data and never copied into a dead letter
_PERSONAL = frozenset({"customer_id"})
_MAX_VALUE_CHARS = 80


@dataclass(frozen=True)
class DeadLetter:
    """One rejected event. ``index`` is its position in the batch or request it came in."""

    index: int
    reason: str
    field: str | None = None
    value: str | None = None
    event_id: int | None = None
    kind: str | None = None

    def __str__(self) -> str:
        return f"event {self.index}: {self.reason}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def label(name: object) -> str:
    """A field name as printable, encodable text of at most 80 characters: a key may be any
    value, a lone surrogate or a megabyte long, and a dead letter must still be writable."""
    text = name if isinstance(name, str) else repr(name)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def show_value(field: str, value: object) -> str:
    """The value as it may appear in a dead letter: personal fields are withheld, long ones cut."""
    if field in _PERSONAL:
        return "<withheld>"
    text = label(value if not isinstance(value, str) else repr(value))
    return text


def dead_letter_table(letters: Iterable[DeadLetter]) -> pa.Table:
    return pa.Table.from_pylist([d.to_dict() for d in letters], schema=DEAD_LETTER_SCHEMA)
