"""Governance: pseudonymization of identifiers (consent, retention and erasure come later)."""
