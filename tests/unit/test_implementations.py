"""``sovereign.implementations``: the one place that picks compiled or pure-Python.

In-process tests call ``resolve`` with an explicit environment and block a compiled
module through ``sys.modules``; the subprocess tests check what a fresh process picks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import sovereign._fast
from sovereign import implementations as impls
from tests.helpers.twins import load_twin

NAMES = list(impls.COMPONENTS)
Block = Callable[[str], None]


@pytest.fixture
def block(monkeypatch: pytest.MonkeyPatch) -> Block:
    """Make a module unimportable for the test (an ImportError, as when not built)."""

    def _block(module: str) -> None:
        monkeypatch.setitem(sys.modules, module, None)

    return _block


def test_every_compiled_module_is_a_component() -> None:
    built = {
        "sovereign._fast." + p.name.split(".")[0]
        for d in sovereign._fast.__path__
        for p in Path(d).glob("*.pyx")
    }
    assert built == {c.compiled for c in impls.COMPONENTS.values()}
    for c in impls.COMPONENTS.values():
        assert c.compiled.rsplit(".", 1)[1] == c.name


@pytest.mark.parametrize("name", NAMES)
def test_compiled_when_built(name: str) -> None:
    compiled = load_twin(name, "compiled")
    assert impls.resolve(name, {}) == (compiled, "compiled")
    assert impls.resolve(name, {"SOVEREIGN_REQUIRE_FAST": "1"}) == (compiled, "compiled")


@pytest.mark.parametrize("name", NAMES)
def test_pure_gives_the_twin(name: str, block: Block) -> None:
    twin = load_twin(name, "python")
    assert impls.resolve(name, {"SOVEREIGN_PURE": "1"}) == (twin, "python")
    block(impls.COMPONENTS[name].compiled)  # not even imported
    assert impls.resolve(name, {"SOVEREIGN_PURE": "1"}) == (twin, "python")


@pytest.mark.parametrize("name", NAMES)
def test_missing_compiled_falls_back_to_the_twin(name: str, block: Block) -> None:
    block(impls.COMPONENTS[name].compiled)
    twin = load_twin(name, "python")
    for env in ({}, {"SOVEREIGN_REQUIRE_FAST": "0"}, {"SOVEREIGN_PURE": "0"}):
        assert impls.resolve(name, env) == (twin, "python")


@pytest.mark.parametrize("name", NAMES)
def test_require_fast_turns_missing_compiled_into_one_clear_line(name: str, block: Block) -> None:
    c = impls.COMPONENTS[name]
    block(c.compiled)
    with pytest.raises(ImportError) as info:
        impls.resolve(name, {"SOVEREIGN_REQUIRE_FAST": "1"})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"SOVEREIGN_REQUIRE_FAST=1 but the compiled {c.label} {c.compiled} is missing; "
        "build it with `python setup.py build_ext --inplace`"
    )


def test_pure_and_require_fast_contradict() -> None:
    with pytest.raises(ImportError, match="contradict"):
        impls.resolve("envelope", {"SOVEREIGN_PURE": "1", "SOVEREIGN_REQUIRE_FAST": "1"})


@pytest.mark.parametrize("value", ["0", "", "true", "yes"])
def test_only_1_switches_a_flag_on(value: str) -> None:
    load_twin("fanout", "compiled")
    assert impls.resolve("fanout", {"SOVEREIGN_PURE": value}).kind == "compiled"


def test_every_caller_gets_the_cached_choice() -> None:
    from sovereign import codec
    from sovereign.transport import fanout, outbox

    assert impls.select("envelope") is impls.select("envelope")
    assert impls.active("envelope") == codec.IMPLEMENTATION
    assert codec.decode_envelope is impls.load("envelope").decode_envelope
    assert fanout.implementation() is impls.load("fanout")
    assert outbox.LocalOutbox.frame is impls.load("fanout").ws_frame


def test_describe_names_every_component_for_the_startup_log() -> None:
    kind = "(compiled|python)"
    assert re.fullmatch(
        f"envelope codec: {kind}, dispatcher: {kind}, fan-out: {kind}, WAL coalescing: {kind},"
        f" event ids: {kind}, idempotency filter: {kind}",
        impls.describe(),
    )


@pytest.mark.parametrize("name", NAMES)
def test_available_ignores_the_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled, twin = load_twin(name, "compiled"), load_twin(name, "python")
    monkeypatch.setenv("SOVEREIGN_PURE", "1")
    assert impls.available(name) == {"compiled": compiled, "python": twin}
    assert list(impls.available(name)) == ["compiled", "python"]


@pytest.mark.parametrize("name", NAMES)
def test_available_without_compiled(name: str, block: Block) -> None:
    block(impls.COMPONENTS[name].compiled)
    assert impls.available(name) == {"python": load_twin(name, "python")}


# ------------------------------------------------------------------ fresh processes


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "SOVEREIGN_PURE": "0", "SOVEREIGN_REQUIRE_FAST": "0", **env},
        check=False,
        timeout=60,
    )


REPORT = """
import sys
from sovereign import codec, implementations
import sovereign.server  # the composition root imports every selected module
from sovereign.transport import fanout
print(codec.IMPLEMENTATION, codec.decode_envelope.__module__)
print(fanout.implementation().__name__)
module, kind = implementations.select("dispatch")
print(module.__name__, kind)
print(implementations.describe())
print(sorted(m for m in sys.modules if m.startswith("sovereign._fast.")))
"""


def test_pure_gives_the_twins_everywhere() -> None:
    r = _run(REPORT, SOVEREIGN_PURE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "python sovereign.codec.envelope",
        "sovereign.transport.fanout",
        "sovereign.protocol.dispatch python",
        "envelope codec: python, dispatcher: python, fan-out: python, WAL coalescing: python,"
        " event ids: python, idempotency filter: python",
        "[]",  # no compiled module was even imported
    ]


def test_compiled_everywhere_by_default() -> None:
    for name in NAMES:
        load_twin(name, "compiled")
    r = _run(REPORT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == [
        "compiled sovereign._fast.envelope",
        "sovereign._fast.fanout",
        "sovereign._fast.dispatch compiled",
    ]
    assert lines[3] == (
        "envelope codec: compiled, dispatcher: compiled, fan-out: compiled,"
        " WAL coalescing: compiled, event ids: compiled, idempotency filter: compiled"
    )
    assert lines[4] == str(sorted(c.compiled for c in impls.COMPONENTS.values()))


def test_pure_and_require_fast_fail_at_import() -> None:
    r = _run("import sovereign.codec", SOVEREIGN_PURE="1", SOVEREIGN_REQUIRE_FAST="1")
    assert r.returncode != 0
    assert "ImportError: SOVEREIGN_PURE=1 and SOVEREIGN_REQUIRE_FAST=1 contradict" in r.stderr
