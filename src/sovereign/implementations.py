"""Placeholder: replaced by the implementation selector (merged from wt-frames)."""

from __future__ import annotations

from types import ModuleType


def fanout() -> ModuleType:
    from sovereign.transport.fanout import implementation

    return implementation()


def dispatch() -> ModuleType:
    try:
        from sovereign._fast import dispatch as fast

        return fast
    except ImportError as exc:
        import os

        if os.environ.get("SOVEREIGN_REQUIRE_FAST") == "1":
            raise ImportError(
                f"SOVEREIGN_REQUIRE_FAST=1 but sovereign._fast.dispatch is not built: {exc}"
            ) from None
        from sovereign.protocol import dispatch as py

        return py


def describe() -> str:
    from sovereign import codec

    return f"envelope codec: {codec.IMPLEMENTATION}, dispatcher: {_kind(dispatch())}"


def _kind(mod: ModuleType) -> str:
    return "compiled" if mod.__name__.startswith("sovereign._fast") else "python"
