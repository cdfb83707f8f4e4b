"""The layering rules, checked on the source (docs/architecture.md).

Every ``import`` in ``src/sovereign`` counts, including those under ``TYPE_CHECKING``
and inside functions: a type-only or lazy import is still a dependency a reader must
follow. Two rules:

1. Layers point one way. ``protocol`` (sans-I/O) <- ``services`` <- ``api``;
   ``storage`` below ``services``; ``transport`` is a shell that services never import
   (they talk to it through ``services.ports.Outbox``); ``cluster`` (the Redis bus and
   the ``--workers`` supervisor) is a shell of the same kind behind ``services.ports.Bus``;
   only the composition root
   (``server``, and the ``cli`` above it) knows every layer.
2. No import circle between modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "sovereign"

# layer -> layers it must never import (a layer is the first dotted part after
# ``sovereign``; top-level modules like ``errors`` and ``clock`` are their own layer).
SERVER_SIDE = {"server", "cli", "api", "admin", "services", "transport", "storage", "cluster"}
FORBIDDEN: dict[str, set[str]] = {
    "errors": {"*"},
    "clock": {"*"},
    "collector": {"*"},
    "stats": {"*"},
    "protocol": {
        "server",
        "cli",
        "api",
        "admin",
        "services",
        "transport",
        "storage",
        "client",
        "bench",
        "cluster",
    },
    "codec": {
        "server",
        "cli",
        "api",
        "admin",
        "services",
        "transport",
        "storage",
        "client",
        "bench",
        "cluster",
    },
    "_fast": {
        "server",
        "cli",
        "api",
        "admin",
        "services",
        "transport",
        "storage",
        "client",
        "bench",
        "cluster",
    },
    "mls": {
        "server",
        "cli",
        "api",
        "admin",
        "services",
        "transport",
        "storage",
        "client",
        "bench",
        "cluster",
    },
    "auth": {
        "server",
        "cli",
        "api",
        "admin",
        "services",
        "transport",
        "storage",
        "client",
        "bench",
        "cluster",
    },
    "storage": {
        "server",
        "cli",
        "api",
        "admin",
        "services",
        "transport",
        "client",
        "bench",
        "protocol",
        "cluster",
    },
    "services": {"server", "cli", "api", "admin", "transport", "client", "bench", "cluster"},
    "api": {"server", "cli", "admin", "transport", "storage", "client", "bench", "cluster"},
    "transport": {"server", "cli", "api", "admin", "storage", "client", "bench", "cluster"},
    # The cluster's shells (Redis bus, --workers supervisor) are like transport/: they
    # may see the services' ports, never the services' logic or storage, and only the
    # composition root (server, cli) builds them.
    "cluster": {"server", "cli", "api", "admin", "transport", "storage", "client", "bench"},
    # The admin listener is a shell like api/ and transport/: it reaches storage only
    # through services (AdminService), and nothing but the composition root imports it.
    "admin": {"server", "cli", "api", "transport", "storage", "client", "bench", "cluster"},
    "client": SERVER_SIDE | {"bench"},
    "bench": SERVER_SIDE - {"server", "cli"},
}
# Leaf modules anyone may import (no further dependencies of their own inside the tree).
ALWAYS_ALLOWED = {"sovereign", "sovereign.v1", "sovereign.v1.sovereign_pb2", "sovereign.errors"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[:2] == [PACKAGE, "v1"]:
            continue  # generated protobuf code
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_pkg = MODULES[module].name == "__init__.py"
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str) -> Iterator[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in MODULES else target


def _internal(name: str) -> str | None:
    """The tree module ``name`` refers to (a package's submodule, or the package)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


GRAPH: dict[str, set[str]] = {
    m: {t for i in _imports(m) if (t := _internal(i)) is not None and t != m} for m in MODULES
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_analysis_sees_the_tree() -> None:
    # Guards the guard: a broken walk would find no imports and pass every rule.
    assert "sovereign.services.delivery" in MODULES
    assert "sovereign.services.ports" in GRAPH["sovereign.services.delivery"]
    assert "sovereign.transport.outbox" in GRAPH["sovereign.server"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_point_one_way(module: str) -> None:
    forbidden = FORBIDDEN.get(_layer(module), set())
    bad = sorted(
        t
        for t in GRAPH[module]
        if t not in ALWAYS_ALLOWED
        and _layer(t) != _layer(module)
        and ("*" in forbidden or _layer(t) in forbidden)
    )
    assert not bad, f"{module} imports {bad} across the layering (tests/unit/test_layers.py)"


def test_no_import_circle() -> None:
    # Tarjan's strongly connected components: any component of 2+ modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)
