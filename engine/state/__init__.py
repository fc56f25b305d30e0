"""The columnar customer store (golden records), its event buffer and the per-batch view."""
