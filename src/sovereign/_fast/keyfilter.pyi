"""Stub for the compiled idempotency key filter (twin: sovereign.services.keyfilter)."""

from sovereign.services.keyfilter import KeyFilter as KeyFilter

__all__ = ["KeyFilter"]
