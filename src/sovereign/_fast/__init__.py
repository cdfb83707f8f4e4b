"""Compiled hot path. Every module here has a pure-Python twin; see sovereign.codec."""
