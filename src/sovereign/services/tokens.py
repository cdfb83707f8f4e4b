"""Session tokens and invite codes (SPEC §4).

A token is 32 random bytes, base64url without padding. Only its SHA-256 is stored;
comparisons of stored digests use ``hmac.compare_digest`` (constant time).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

TOKEN_BYTES = 32


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode("ascii")


def new_invite_code() -> str:
    # 20 random bytes: long enough to be unguessable, short enough to paste.
    return base64.urlsafe_b64encode(secrets.token_bytes(20)).rstrip(b"=").decode("ascii")


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def same_digest(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def looks_like_token(token: str) -> bool:
    """Cheap shape check before any lookup: 43 base64url characters."""
    if len(token) != 43:
        return False
    try:
        return len(base64.urlsafe_b64decode(token + "=")) == TOKEN_BYTES
    except (ValueError, TypeError):
        return False
