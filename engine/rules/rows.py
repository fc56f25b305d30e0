"""The rows of a step that a rule, a pattern's step or a window looks at."""

from __future__ import annotations

import numpy as np

from engine.events.schema import EventKind
from engine.rules.expr import Expression
from engine.state.view import BatchView, RowsView


def rows_where(
    kinds: tuple[EventKind, ...], when: Expression | None, view: BatchView
) -> np.ndarray:
    """View rows of one of ``kinds`` where ``when`` holds (evaluated on those rows only)."""
    wanted = np.zeros(256, dtype=bool)  # kind codes are small: a lookup table, not isin
    wanted[[int(k) for k in kinds]] = True
    rows = np.flatnonzero(wanted[view.kind.astype(np.uint8)])
    if rows.size and when is not None:
        rows = rows[np.asarray(when.evaluate(RowsView(view, rows)), dtype=bool)]
    return rows
