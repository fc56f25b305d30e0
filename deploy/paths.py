"""Where the shipped configuration lives: the one place that names these files."""

from __future__ import annotations

from pathlib import Path

#: rules.yaml, offers.yaml, reference.yaml (and its tables) and serve_config.yaml, shipped as
#: package data of ``deploy``
CONFIG_DIR = Path(__file__).parent / "config"
DEFAULT_RULES = CONFIG_DIR / "rules.yaml"
DEFAULT_OFFERS = CONFIG_DIR / "offers.yaml"
DEFAULT_REFERENCE = CONFIG_DIR / "reference.yaml"
