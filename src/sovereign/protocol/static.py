"""The web client's static files on the WebSocket listener (SPEC §12.30). No I/O.

Rules, in order (anything not matched here is not ours, and the listener answers 404):

1. Only ``GET /`` (the page, ``index.html``) and ``GET /app/<name>`` (its assets) are
   handled; a query string is ignored. Another method on a well-formed name -> 405.
2. ``<name>`` is one flat file name: ASCII letters, digits, ``_``, ``-`` and single dots
   between them. Nothing is URL-decoded, so ``%2e%2e``, ``..``, ``/``, ``\\``, NUL and
   every other escape simply fail to match -> 404: there is no path to traverse and no
   directory to list (``/app/`` is 404 too).
3. ``<name>`` must be one of the files loaded at start-up -> 200 with its bytes, else 404.
   ``index.html`` is the page at ``/`` only.

Headers: the page and every asset carry a strict Content-Security-Policy (scripts and
styles only from this origin, no inline script, ``connect-src`` this origin and its
ws/wss twin, nothing framed), ``nosniff`` and ``no-referrer``. Content-hashed assets
(``name-HASH.ext``, what the bundler emits) are immutable for a year; the page and
unhashed files are ``no-cache`` so a new release is picked up on the next load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

INDEX = "index.html"
APP_PREFIX = "/app/"

_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")  # fullmatch: no "\n" slips by
#: ``app-5XUVP3ZA.js``: esbuild's ``[name]-[hash]`` (8 characters of base32).
_HASHED = re.compile(r"[A-Za-z0-9_]+-[A-Z0-9]{8}\.[a-z0-9]+")

CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
    "png": "image/png",
    "ico": "image/x-icon",
    "webmanifest": "application/manifest+json",
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
}

IMMUTABLE = "public, max-age=31536000, immutable"
NO_CACHE = "no-cache"


@dataclass(frozen=True, slots=True)
class StaticResponse:
    status: int  # 200, 404 or 405
    body: bytes = b""
    headers: Mapping[str, str] | None = None
    reason: str = ""


NOT_FOUND = StaticResponse(404, reason="not found")
NOT_ALLOWED = StaticResponse(405, reason="method not allowed")


def websocket_origins(http_origins: Iterable[str]) -> list[str]:
    """``http://h`` -> ``ws://h``, ``https://h`` -> ``wss://h`` (CSP ``connect-src``)."""
    out = []
    for origin in http_origins:
        if origin.startswith("https://"):
            out.append("wss://" + origin[len("https://") :])
        elif origin.startswith("http://"):
            out.append("ws://" + origin[len("http://") :])
    return out


def content_security_policy(origins: Iterable[str]) -> str:
    connect = " ".join(["'self'", *websocket_origins(origins)])
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: blob:",
            "font-src 'self'",
            f"connect-src {connect}",
            "manifest-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def is_static_path(path: str) -> bool:
    """True for the paths this module answers (rule 1); the rest is the listener's."""
    route = path.split("?", 1)[0]
    return route == "/" or route.startswith(APP_PREFIX)


class StaticSite:
    """The loaded files with their ready-made responses: serving allocates nothing."""

    def __init__(self, files: Mapping[str, bytes], origins: Iterable[str]) -> None:
        if INDEX not in files:
            raise ValueError(f"the web client bundle has no {INDEX}")
        csp = content_security_policy(origins)
        self._responses: dict[str, StaticResponse] = {}
        for name, body in files.items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"web client file {name!r}: not a flat file name")
            ext = name.rsplit(".", 1)[-1] if "." in name else ""
            ctype = CONTENT_TYPES.get(ext)
            if ctype is None:
                raise ValueError(f"web client file {name!r}: unknown type .{ext}")
            self._responses[name] = StaticResponse(
                200,
                body,
                {
                    "Content-Type": ctype,
                    "Cache-Control": IMMUTABLE if _HASHED.fullmatch(name) else NO_CACHE,
                    "Content-Security-Policy": csp,
                    "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY",
                    "Cross-Origin-Opener-Policy": "same-origin",
                },
            )

    @property
    def names(self) -> list[str]:
        return sorted(self._responses)

    def decide(self, method: str, path: str) -> StaticResponse:
        route = path.split("?", 1)[0]
        if route == "/":
            name = INDEX
        elif route.startswith(APP_PREFIX):
            name = route[len(APP_PREFIX) :]
            if name == INDEX or not _NAME.fullmatch(name):
                return NOT_FOUND
        else:
            return NOT_FOUND
        if method != "GET":
            return NOT_ALLOWED
        return self._responses.get(name, NOT_FOUND)
