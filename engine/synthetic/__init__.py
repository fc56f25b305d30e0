"""Synthetic data: a seeded telco customer population and a month of its events."""
