"""YAML loading: one dialect for files and API bodies.

YAML 1.2 booleans (only true/false, so `on:` stays a key), safe construction only, and the
limits of ``engine.limits``: aliases are refused (a few hundred bytes of nested aliases expand
to gigabytes), and so are documents over MAX_DOCUMENT_BYTES or nesting deeper than
MAX_DOCUMENT_DEPTH. Every failure is a ``yaml.YAMLError`` with a message.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from engine.limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_DEPTH, depth_over


class DocumentLimitError(yaml.YAMLError):
    """A document is over a limit of ``engine.limits`` (size, depth, aliases)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's yes/no/on/off booleans, and without aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise DocumentLimitError(
                f"aliases (*name) are not accepted in Kairos documents (line {mark.line + 1})"
            )
        return super().compose_node(parent, index)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str | bytes) -> Any:
    """Parse YAML text safely (no object construction, no aliases), YAML 1.2 booleans."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_DOCUMENT_BYTES:
        raise DocumentLimitError(
            f"document of {size:,} bytes: the limit is {MAX_DOCUMENT_BYTES:,} (max_document_bytes)",
            too_large=True,
        )
    try:
        document = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        raise
    except RecursionError as exc:
        raise DocumentLimitError(_too_deep()) from exc
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:  # e.g. 5,000-digit ints
        raise yaml.YAMLError(f"{type(exc).__name__}: {exc}") from exc
    if depth_over(document, MAX_DOCUMENT_DEPTH):
        raise DocumentLimitError(_too_deep())
    return document


def _too_deep() -> str:
    return f"document nests deeper than {MAX_DOCUMENT_DEPTH} levels (max_document_depth)"
