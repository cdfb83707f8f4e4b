"""Shared fixtures for the microbenchmarks (pytest-benchmark)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def _load(module: str) -> ModuleType:
    """Import a module; a missing compiled one fails unless SOVEREIGN_ALLOW_PURE=1."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("SOVEREIGN_ALLOW_PURE") == "1":
            pytest.skip(f"{module} not built (SOVEREIGN_ALLOW_PURE=1)")
        pytest.fail(f"{module} missing ({exc}): run `python setup.py build_ext --inplace`")


@pytest.fixture(scope="session")
def load_module() -> object:
    return _load
