"""Kairos engine: the pure domain core (events, partitioning, state, rules, shard logic). No Ray."""
