"""Crash points, for the crash-point tests: a process exits hard (no cleanup, as ``kill -9``)
at a named step when ``KAIROS_CRASH_AT`` names it.

``KAIROS_CRASH_AFTER`` (default 1) picks the n-th time the step is reached in that process;
``KAIROS_CRASH_MARK`` names a file made when a crash fires: once it exists no crash point fires
again, so a restarted process (an actor Ray restarts, the resumed run) goes on. Without
``KAIROS_CRASH_AT`` (production) ``crash_point`` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
from collections import Counter

_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Exit this process at once if the crash-point test asks for ``name`` here."""
    if os.environ.get("KAIROS_CRASH_AT") != name:
        return
    mark = os.environ.get("KAIROS_CRASH_MARK")
    if mark and os.path.exists(mark):
        return
    _reached[name] += 1
    if _reached[name] < int(os.environ.get("KAIROS_CRASH_AFTER", "1")):
        return
    if mark:
        with open(mark, "w") as f:
            f.write(name)
    os._exit(137)
