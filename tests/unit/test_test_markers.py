"""The ``server_in_subprocess`` marker stays true: a module that carries it (and so runs
once under SOVEREIGN_TEST_LOOP=both, tests/conftest.py) never starts a server in the
test's own process, whose code would then run on only one of the two loops."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# What starts a server in-process: the helper, the fixtures built on it, the app itself.
IN_PROCESS = {"running_server", "server_with", "server", "create_app", "App"}


def _marked(tree: ast.Module) -> bool:
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
            and "server_in_subprocess" in ast.unparse(node.value)
        ):
            return True
    return False


def _in_process_uses(tree: ast.Module) -> set[str]:
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in IN_PROCESS - {"server"}:
            used.add(node.id)
        elif isinstance(node, ast.alias) and (node.asname or node.name) in IN_PROCESS:
            used.add(node.name)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test"
        ):
            used |= {a.arg for a in node.args.args if a.arg in {"server", "server_with"}}
    return used


def test_marked_modules_start_no_server_in_process() -> None:
    marked = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        if _marked(tree):
            marked[path.relative_to(TESTS).as_posix()] = _in_process_uses(tree)
    assert "integration/test_crash_safety.py" in marked  # the scan finds the marker
    assert {m: used for m, used in marked.items() if used} == {}


def test_the_scan_sees_an_in_process_server() -> None:
    source = (
        "import pytest\n"
        "pytestmark = pytest.mark.server_in_subprocess\n"
        "from tests.helpers.server import running_server\n"
        "async def test_x(server): ...\n"
    )
    tree = ast.parse(source)
    assert _marked(tree) and _in_process_uses(tree) == {"running_server", "server"}
