"""Typed storage errors.

Storage never speaks wire codes: services catch these and raise ``SovereignError``
(``DatabaseError`` maps to 9002 DatabaseError, SPEC §8). Callers outside this package
never see ``sqlite3`` exceptions, so a PostgreSQL engine can raise the same types.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by ``sovereign.storage``."""


class DatabaseError(StorageError):
    """The database itself failed (I/O, busy, corrupt, failed COMMIT...).

    The original driver exception is chained as ``__cause__``.
    """


class DatabaseClosed(StorageError):
    """The database was closed (or never finished opening); no more reads or writes."""


class MigrationError(StorageError):
    """A schema migration could not be applied, or the schema is newer than this code."""


class NotFound(StorageError, LookupError):
    """The row to update (or a row it refers to) does not exist."""


class InviteUnusable(StorageError, LookupError):
    """The invite code is unknown, already used or expired."""


class AlreadyExists(StorageError):
    """A unique key is already taken."""


class UsernameTaken(AlreadyExists):
    """The username is taken (compared case-insensitively)."""


class CredentialExists(AlreadyExists):
    """A passkey with this credential id is already registered."""
