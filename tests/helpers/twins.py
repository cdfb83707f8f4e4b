"""Loading a compiled module and its pure-Python twin for parity tests.

A missing compiled module FAILS the test (it would otherwise silently test only the
twin) unless SOVEREIGN_ALLOW_PURE=1 says a pure-Python install is intended.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def load_twin(modules: dict[str, str], name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(modules[name])
    except ImportError as exc:
        if os.environ.get("SOVEREIGN_ALLOW_PURE") == "1":
            pytest.skip(f"{name} {what} not built (SOVEREIGN_ALLOW_PURE=1)")
        pytest.fail(f"{name} {what} missing ({exc}): run `python setup.py build_ext --inplace`")


def load_all(modules: dict[str, str], what: str) -> list[ModuleType]:
    return [load_twin(modules, name, what) for name in modules]
