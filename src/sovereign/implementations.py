"""The one place that picks, per hot-path component, the compiled module or its twin.

Every module in ``sovereign._fast`` (Cython) has a pure-Python twin with the same API
and results (the parity tests hold them to that). Which one runs is decided here, from
the environment, the first time a component is asked for:

* ``SOVEREIGN_PURE=1``: the twin, for every component; the compiled modules are not
  even imported (to debug, profile or bisect a difference between the two).
* ``SOVEREIGN_REQUIRE_FAST=1``: the compiled module, and an ``ImportError`` whose
  message is one line naming the missing module when it cannot be imported (a
  production install that silently ran the twins would be slower: 1.7-15x in the
  microbenchmarks under ``benchmarks/``).
* Both set: an ``ImportError``; they contradict each other.
* Neither: the compiled module if it imports, else the twin.

The choice is cached for the life of the process, so every caller of a component gets
the same module. :func:`describe` renders the choices for the start-up log.
:func:`available` is for parity tests and benchmarks: every implementation that
imports, whatever the environment says.

Import-light on purpose (standard library only): ``sovereign.codec`` imports it while
it is itself being imported.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Final, Literal, NamedTuple

__all__ = [
    "COMPILED",
    "COMPONENTS",
    "PYTHON",
    "Component",
    "Kind",
    "Selection",
    "active",
    "available",
    "describe",
    "load",
    "resolve",
    "select",
]

Kind = Literal["compiled", "python"]
COMPILED: Final = "compiled"
PYTHON: Final = "python"


@dataclass(frozen=True, slots=True)
class Component:
    name: str  # the key callers use: "envelope", "dispatch", "fanout", "walvfs", "ids", "keyfilter"
    label: str  # as the start-up log names it
    compiled: str  # the Cython module
    python: str  # its pure-Python twin


COMPONENTS: Final[Mapping[str, Component]] = {
    c.name: c
    for c in (
        Component(
            "envelope", "envelope codec", "sovereign._fast.envelope", "sovereign.codec.envelope"
        ),
        Component(
            "dispatch", "dispatcher", "sovereign._fast.dispatch", "sovereign.protocol.dispatch"
        ),
        Component("fanout", "fan-out", "sovereign._fast.fanout", "sovereign.transport.fanout"),
        Component(
            "walvfs", "WAL coalescing", "sovereign._fast.walvfs", "sovereign.storage.walvfs_twin"
        ),
        Component("ids", "event ids", "sovereign._fast.ids", "sovereign.services.ids"),
        Component(
            "keyfilter",
            "idempotency filter",
            "sovereign._fast.keyfilter",
            "sovereign.services.keyfilter",
        ),
    )
}


class Selection(NamedTuple):
    module: ModuleType
    kind: Kind


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name) == "1"


def resolve(name: str, environ: Mapping[str, str] = os.environ) -> Selection:
    """Pick ``name``'s implementation under ``environ`` (not cached; see :func:`select`)."""
    component = COMPONENTS[name]
    pure = _flag(environ, "SOVEREIGN_PURE")
    require_fast = _flag(environ, "SOVEREIGN_REQUIRE_FAST")
    if pure and require_fast:
        raise ImportError(
            "SOVEREIGN_PURE=1 and SOVEREIGN_REQUIRE_FAST=1 contradict each other; unset one"
        )
    if not pure:
        try:
            return Selection(importlib.import_module(component.compiled), COMPILED)
        except ImportError as exc:
            if require_fast:
                raise ImportError(
                    f"SOVEREIGN_REQUIRE_FAST=1 but the compiled {component.label} "
                    f"{component.compiled} is missing; build it with `python setup.py "
                    f"build_ext --inplace` (or reinstall the package): {exc}"
                ) from exc
    return Selection(importlib.import_module(component.python), PYTHON)


_selected: dict[str, Selection] = {}


def select(name: str) -> Selection:
    """``name``'s implementation for this process: chosen on first use, then fixed."""
    selection = _selected.get(name)
    if selection is None:
        selection = _selected[name] = resolve(name)
    return selection


def load(name: str) -> ModuleType:
    """The module that implements ``name`` in this process."""
    return select(name).module


def active(name: str) -> Kind:
    """``"compiled"`` or ``"python"``: which implementation of ``name`` runs."""
    return select(name).kind


def describe() -> str:
    """Every component's choice, for the start-up log:
    ``envelope codec: compiled, dispatcher: compiled, fan-out: compiled, WAL
    coalescing: compiled, event ids: compiled, idempotency filter: compiled``."""
    return ", ".join(f"{c.label}: {active(c.name)}" for c in COMPONENTS.values())


def available(name: str) -> dict[str, ModuleType]:
    """Every implementation of ``name`` that imports, compiled first (parity tests).

    Ignores ``SOVEREIGN_PURE`` and ``SOVEREIGN_REQUIRE_FAST``: a parity test wants both.
    """
    component = COMPONENTS[name]
    found: dict[str, ModuleType] = {}
    with contextlib.suppress(ImportError):
        found[COMPILED] = importlib.import_module(component.compiled)
    found[PYTHON] = importlib.import_module(component.python)
    return found
