"""The columnar customer store (golden records) and its Arrow snapshots."""
