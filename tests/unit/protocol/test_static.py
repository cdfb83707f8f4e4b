"""The web client's static-file rules (SPEC §12.30), pure: no sockets, no files."""

from __future__ import annotations

import pytest

from sovereign.protocol.static import (
    IMMUTABLE,
    NO_CACHE,
    StaticSite,
    content_security_policy,
    is_static_path,
    websocket_origins,
)

FILES = {
    "index.html": b"<!doctype html><title>x</title>",
    "app-5XUVP3ZA.js": b"console.log(1)",
    "app-Q2W3E4R5.css": b"body{}",
    "icon.svg": b"<svg/>",
    "manifest.webmanifest": b"{}",
}
ORIGINS = ["http://localhost:8080", "https://chat.example.org"]


@pytest.fixture
def site() -> StaticSite:
    return StaticSite(FILES, ORIGINS)


def test_page_and_assets_with_types_and_caching(site: StaticSite) -> None:
    page = site.decide("GET", "/")
    assert page.status == 200 and page.body == FILES["index.html"]
    assert page.headers is not None
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.headers["Cache-Control"] == NO_CACHE
    js = site.decide("GET", "/app/app-5XUVP3ZA.js")
    assert js.status == 200 and js.body == FILES["app-5XUVP3ZA.js"] and js.headers is not None
    assert js.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert js.headers["Cache-Control"] == IMMUTABLE
    css = site.decide("GET", "/app/app-Q2W3E4R5.css")
    assert css.headers is not None and css.headers["Content-Type"] == "text/css; charset=utf-8"
    icon = site.decide("GET", "/app/icon.svg")
    assert icon.headers is not None and icon.headers["Content-Type"] == "image/svg+xml"
    assert icon.headers["Cache-Control"] == NO_CACHE  # not content-hashed
    assert site.decide("GET", "/?invite=abc").status == 200  # the query is ignored
    for response in (page, js, css, icon):
        assert response.headers is not None
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"


def test_csp_is_strict(site: StaticSite) -> None:
    csp = site.decide("GET", "/").headers["Content-Security-Policy"]  # type: ignore[index]
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no inline script, no eval
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self' ws://localhost:8080 wss://chat.example.org"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp
    assert content_security_policy([]).count("connect-src 'self'") == 1
    assert websocket_origins(["ftp://x", "http://a:1"]) == ["ws://a:1"]


@pytest.mark.parametrize(
    "path",
    [
        "/app/",
        "/app",
        "/app/index.html",  # the page lives at / only
        "/index.html",
        "/app/missing.js",
        "/app/../index.html",
        "/app/..%2findex.html",
        "/app/%2e%2e/index.html",
        "/app/%2E%2E%2Fsovereign.db",
        "/app/.%2e/x",
        "/app/..",
        "/app/.",
        "/app/...js",
        "/app//etc/passwd",
        "/app/sub/app-5XUVP3ZA.js",
        "/app/..\\index.html",
        "/app/\\app-5XUVP3ZA.js",
        "/app/app-5XUVP3ZA.js\x00.html",
        "/app/app-5XUVP3ZA.js%00",
        "/app/app-5XUVP3ZA.js\n",
        "/app/.hidden",
        "/app/app-5XUVP3ZA.js/",
        "/app/APP-5XUVP3ZA.JS",
        "/favicon.ico",
        "/ws/../app/x",
        "//app/app-5XUVP3ZA.js",
    ],
)
def test_nothing_else_is_served(site: StaticSite, path: str) -> None:
    assert site.decide("GET", path).status == 404


def test_only_get(site: StaticSite) -> None:
    for method in ("POST", "PUT", "DELETE", "HEAD", "OPTIONS"):
        assert site.decide(method, "/").status == 405
        assert site.decide(method, "/app/app-5XUVP3ZA.js").status == 405


def test_routing_predicate() -> None:
    assert is_static_path("/") and is_static_path("/?x=1") and is_static_path("/app/x")
    assert not is_static_path("/ws") and not is_static_path("/healthz")
    assert not is_static_path("/admin/") and not is_static_path("/apple")


def test_a_broken_bundle_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match=r"no index\.html"):
        StaticSite({"app.js": b""}, ORIGINS)
    with pytest.raises(ValueError, match="unknown type"):
        StaticSite({**FILES, "run.sh": b""}, ORIGINS)
    with pytest.raises(ValueError, match="flat file name"):
        StaticSite({**FILES, "a b.js": b""}, ORIGINS)
