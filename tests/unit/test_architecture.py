"""The engine core stays pure: importing all of it loads neither Ray nor XGBoost."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import engine


def test_engine_imports_no_ray_and_no_xgboost() -> None:
    modules = [m.name for m in pkgutil.walk_packages(engine.__path__, "engine.")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(k for k in ('ray', 'xgboost') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
    assert len(modules) > 15
