"""Fault tests: kill actors, processes and storage at the worst moments; compare with a run
without faults. The long ones are marked ``faults`` (``make test-faults``, and CI)."""
