"""Envelope codec (SPEC §2), compiled when available.

At import this picks ``sovereign._fast.envelope`` (Cython) and falls back to the
pure-Python twin ``sovereign.codec.envelope``. ``SOVEREIGN_REQUIRE_FAST=1`` turns a
missing compiled module into an ImportError instead of a silent fallback.
"""

from __future__ import annotations

import os
from types import ModuleType

from sovereign.codec import envelope as _python

__all__ = [
    "IMPLEMENTATION",
    "EnvelopeError",
    "decode_envelope",
    "encode_envelope",
    "encode_envelope_into",
    "implementations",
]

EnvelopeError = _python.EnvelopeError
decode_envelope = _python.decode_envelope
encode_envelope = _python.encode_envelope
encode_envelope_into = _python.encode_envelope_into
IMPLEMENTATION: str = "python"

_compiled: ModuleType | None = None
try:
    from sovereign._fast import envelope as _fast
except ImportError as exc:
    if os.environ.get("SOVEREIGN_REQUIRE_FAST") == "1":
        raise ImportError(
            "SOVEREIGN_REQUIRE_FAST=1 but the compiled codec sovereign._fast.envelope is "
            "missing; build it with `python setup.py build_ext --inplace` "
            f"(or reinstall the package): {exc}"
        ) from exc
else:
    _compiled = _fast
    decode_envelope = _fast.decode_envelope
    encode_envelope = _fast.encode_envelope
    encode_envelope_into = _fast.encode_envelope_into
    IMPLEMENTATION = "compiled"


def implementations() -> dict[str, ModuleType]:
    """The available codec modules by name ("compiled", "python"), for parity tests."""
    impls: dict[str, ModuleType] = {}
    if _compiled is not None:
        impls["compiled"] = _compiled
    impls["python"] = _python
    return impls
