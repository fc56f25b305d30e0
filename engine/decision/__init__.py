"""Decisions: offer catalog, contact policy, features, arbitration and the decision log."""
