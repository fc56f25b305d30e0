"""Governance: pseudonymization of identifiers with a keyed SipHash (consent is a golden-record
column today; consent by purpose, retention and erasure come with the privacy issue)."""
