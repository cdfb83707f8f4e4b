"""Sovereign: a self-hosted, end-to-end-encrypted messaging server."""

__version__ = "0.1.0"
