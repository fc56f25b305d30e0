"""Loading heavy code a process may need soon, in a background thread.

A shard with pattern rules needs Numba's compiled loop (about 1.1 s to import and load here) and
one with store data needs SciPy's k-d tree (about 0.6 s to import). Loading them while the shard
is being built would make every new actor, a spare that is to take over a lost shard above
all, that much slower to answer. ``preload`` starts the load in a daemon thread instead: the
actor answers at once, and a step that needs the code before the thread is done waits for it
(an import waits on Python's module lock; the compiled loop on its own lock).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_threads: dict[str, threading.Thread] = {}
_lock = threading.Lock()


def preload(name: str, load: Callable[[], object]) -> bool:
    """Run ``load`` in a daemon thread, once per process for ``name``; False when it was
    already started."""
    with _lock:
        if name in _threads:
            return False
        thread = _threads[name] = threading.Thread(
            target=load, name=f"kairos-preload-{name}", daemon=True
        )
    thread.start()
    return True


def loaded(timeout_s: float | None = None) -> bool:
    """Wait for every load started so far; False when one still runs after ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _lock:
        threads = list(_threads.values())
    for thread in threads:
        thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
    return not any(thread.is_alive() for thread in threads)
