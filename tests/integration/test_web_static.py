"""The web client's files on the WebSocket listener (SPEC §12.30) over real sockets:
raw HTTP/1.1 requests (so nothing normalises the path on the way), the real server,
a real bundle directory -- and the bundle shipped in the package."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from sovereign.transport.webclient import bundled_directory, read_files
from tests.helpers.server import RunningServer
from tests.helpers.wsclient import WsClient

ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]

PAGE = b"<!doctype html><title>test page</title><script src=/app/app-5XUVP3ZA.js></script>"
SCRIPT = b"console.log('bundle')"


async def http_get(
    srv: RunningServer, path: str | bytes, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.app.port)
    raw_path = path if isinstance(path, bytes) else path.encode("latin-1")
    writer.write(
        method.encode() + b" " + raw_path + b" HTTP/1.1\r\nHost: localhost:8080\r\n"
        b"Connection: close\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    writer.close()
    return status, headers, body


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "index.html").write_bytes(PAGE)
    (d / "app-5XUVP3ZA.js").write_bytes(SCRIPT)
    (d / "app-5XUVP3ZA.css").write_bytes(b"body{color:#111}")
    (d / ".gitkeep").write_bytes(b"")  # hidden files are not served
    (tmp_path / "secret.txt").write_bytes(b"outside the bundle")
    return d


async def test_serves_page_and_assets_with_headers(server_with: ServerWith, bundle: Path) -> None:
    async with server_with(web_client_dir=str(bundle)) as srv:
        status, h, body = await http_get(srv, "/")
        assert (status, body) == (200, PAGE)
        assert h["content-type"] == "text/html; charset=utf-8"
        assert h["cache-control"] == "no-cache"
        csp = h["content-security-policy"]
        assert "script-src 'self';" in csp and "default-src 'none'" in csp
        assert "connect-src 'self' ws://localhost:8080;" in csp and "unsafe" not in csp
        assert h["x-content-type-options"] == "nosniff"
        status, h, body = await http_get(srv, "/app/app-5XUVP3ZA.js")
        assert (status, body) == (200, SCRIPT)
        assert h["content-type"] == "text/javascript; charset=utf-8"
        assert h["cache-control"] == "public, max-age=31536000, immutable"
        status, h, _ = await http_get(srv, "/app/app-5XUVP3ZA.css")
        assert status == 200 and h["content-type"] == "text/css; charset=utf-8"
        # Changing a file on disk changes nothing: the bundle was read at start-up.
        (bundle / "index.html").write_bytes(b"changed")
        assert (await http_get(srv, "/"))[2] == PAGE
        # The WebSocket endpoint and health check still work beside it.
        assert (await http_get(srv, "/healthz"))[0] == 200
        c = await WsClient.connect(srv.url)
        await c.close()


@pytest.mark.parametrize(
    "path",
    [
        "/app/",
        "/app",
        "/app/index.html",
        "/index.html",
        "/app/.gitkeep",
        "/app/missing.js",
        "/app/../secret.txt",
        "/app/../../secret.txt",
        "/app/%2e%2e/secret.txt",
        "/app/%2E%2E%2Fsecret.txt",
        "/app/..%2fsecret.txt",
        "/app/..%5csecret.txt",
        "/app/..\\secret.txt",
        "/app/app-5XUVP3ZA.js%00",
        "/app//app-5XUVP3ZA.js",
        "/secret.txt",
        "/bundle/index.html",
        "/favicon.ico",
    ],
)
async def test_nothing_else_is_served(server_with: ServerWith, bundle: Path, path: str) -> None:
    async with server_with(web_client_dir=str(bundle)) as srv:
        status, _, body = await http_get(srv, path)
        assert status == 404, path
        assert b"outside the bundle" not in body and PAGE not in body


async def test_nul_byte_and_other_methods(server_with: ServerWith, bundle: Path) -> None:
    async with server_with(web_client_dir=str(bundle)) as srv:
        status, _, _ = await http_get(srv, b"/app/app-5XUVP3ZA.js\x00.html")
        assert status in (400, 404)
        for method in ("POST", "PUT", "DELETE"):
            # picows refuses a method other than GET itself (400); ours would say 405.
            status, _, body = await http_get(srv, "/", method)
            assert status in (400, 405) and PAGE not in body


async def test_web_client_off_serves_nothing(server_with: ServerWith, bundle: Path) -> None:
    async with server_with(web_client=False, web_client_dir=str(bundle)) as srv:
        assert (await http_get(srv, "/"))[0] == 404
        assert (await http_get(srv, "/app/app-5XUVP3ZA.js"))[0] == 404
        assert (await http_get(srv, "/healthz"))[0] == 200


async def test_the_bundled_client_is_served(server: RunningServer) -> None:
    """The bundle shipped in the package (``make web``): its page and every asset it
    references, nothing inline."""
    files = read_files(bundled_directory())
    assert "index.html" in files, "the web client is not built: run `make web`"
    status, h, page = await http_get(server, "/")
    assert status == 200 and page == files["index.html"]
    assert b"<script>" not in page and b"<style>" not in page and b" style=" not in page
    assets = [n for n in files if n != "index.html"]
    assert any(n.endswith(".js") for n in assets) and any(n.endswith(".css") for n in assets)
    for name in assets:
        status, h, body = await http_get(server, f"/app/{name}")
        assert status == 200 and body == files[name], name
        if name.endswith((".js", ".css")):
            assert f"/app/{name}".encode() in page  # the page references the hashed names
            assert h["cache-control"] == "public, max-age=31536000, immutable"
