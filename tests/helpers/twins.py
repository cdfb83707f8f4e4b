"""The one parity fixture: every implementation of a hot-path component, for tests and
benchmarks that must hold the compiled module and its pure-Python twin to the same
results.

Components and their modules come from ``sovereign.implementations.COMPONENTS``
("envelope", "dispatch", "fanout"). ``SOVEREIGN_PURE`` does not matter here: parity
needs both implementations whatever the server would pick.

A missing compiled module FAILS (it would otherwise silently test only the twin)
unless SOVEREIGN_ALLOW_PURE=1 says a pure-Python install is intended: then the cases
that need it are skipped and cross-checks run on the twin alone.

Usage, in a test module::

    from tests.helpers.twins import impl_fixture, impls_fixture

    mod = impl_fixture("dispatch")  # each test taking `mod` runs once per implementation
    mods = impls_fixture("dispatch")  # a list of all of them, for cross-checks

and in a benchmark or a one-off: ``load_twin("fanout", "compiled")``, parametrized over
:data:`KINDS`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from sovereign.implementations import COMPILED, COMPONENTS, PYTHON

KINDS: tuple[str, ...] = (COMPILED, PYTHON)


def _allow_pure() -> bool:
    return os.environ.get("SOVEREIGN_ALLOW_PURE") == "1"


def _import(component: str, kind: str) -> ModuleType:
    c = COMPONENTS[component]
    return importlib.import_module(c.compiled if kind == COMPILED else c.python)


def load_twin(component: str, kind: str) -> ModuleType:
    """``kind`` ("compiled" or "python") of ``component``; a missing compiled module
    fails the test, or skips it under SOVEREIGN_ALLOW_PURE=1."""
    try:
        return _import(component, kind)
    except ImportError as exc:
        label = f"{kind} {COMPONENTS[component].label}"
        if _allow_pure():
            pytest.skip(f"{label} not built (SOVEREIGN_ALLOW_PURE=1)")
        pytest.fail(
            f"{label} missing ({exc}): run `python setup.py build_ext --inplace` "
            "(or set SOVEREIGN_ALLOW_PURE=1 to test the twin alone)"
        )


def load_all(component: str) -> list[ModuleType]:
    """Every implementation of ``component``, compiled first. Without the compiled one:
    fails, or under SOVEREIGN_ALLOW_PURE=1 returns the twin alone."""
    out = []
    for kind in KINDS:
        try:
            out.append(_import(component, kind))
        except ImportError:
            if kind == PYTHON or not _allow_pure():
                out.append(load_twin(component, kind))  # fails with the reason
    return out


def impl_fixture(component: str, scope: Any = "module") -> Callable[..., ModuleType]:
    """A fixture parametrized over :data:`KINDS`: one run per implementation."""

    @pytest.fixture(scope=scope, params=KINDS)
    def impl(request: pytest.FixtureRequest) -> ModuleType:
        return load_twin(component, request.param)

    return impl


def impls_fixture(component: str, scope: Any = "module") -> Callable[..., list[ModuleType]]:
    """A fixture giving :func:`load_all` of ``component``, for cross-checks."""

    @pytest.fixture(scope=scope)
    def impls() -> list[ModuleType]:
        return load_all(component)

    return impls
