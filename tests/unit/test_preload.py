"""Background loading (engine.preload) and the pattern loop compiled once under concurrency."""

from __future__ import annotations

import threading
import time

from engine import preload
from engine.rules import sequential


def test_a_load_runs_once_per_name_and_loaded_waits_for_it() -> None:
    gate = threading.Event()
    runs: list[int] = []

    def load() -> None:
        gate.wait(5)
        runs.append(1)

    assert preload.preload("test-gate", load)
    assert not preload.preload("test-gate", load)  # started already: not again
    assert not preload.loaded(timeout_s=0.05)  # still running
    gate.set()
    assert preload.loaded(timeout_s=5)
    assert runs == [1]


def test_the_pattern_loop_is_compiled_once_when_a_warming_thread_and_a_step_ask_at_once(
    monkeypatch,
) -> None:
    sequential.compile_loop.cache_clear()
    calls: list[float] = []
    real = sequential.compile_loop.__wrapped__

    def slow_load():
        calls.append(time.monotonic())
        time.sleep(0.2)  # a second caller arriving now must wait, not compile again
        return real()

    monkeypatch.setattr(sequential, "compile_loop", __import__("functools").cache(slow_load))
    threads = [threading.Thread(target=sequential.warm) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    loop = sequential.compiled_loop()
    assert loop is sequential.compiled_loop()
