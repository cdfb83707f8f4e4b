"""TLS on the main listener (SPEC §11): wss:// with a real certificate, TLS 1.2+ with
modern ciphers only, and a certificate that does not load stops start-up."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import picows
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.flows import register, resume
from tests.helpers.server import running_server
from tests.helpers.wsclient import WsClient, _Listener
from tests.integration.test_process import Server


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def write_self_signed(directory: Path, name: str = "server") -> CertFiles:
    """A self-signed ECDSA P-256 certificate for localhost and 127.0.0.1 (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = CertFiles(directory / f"{name}.crt.pem", directory / f"{name}.key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture
def certs(tmp_path: Path) -> CertFiles:
    return write_self_signed(tmp_path)


def trusting(cert: Path) -> ssl.SSLContext:
    """A client context that trusts exactly this certificate (and checks the host)."""
    return ssl.create_default_context(cafile=str(cert))


def legacy_client(cert: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers only ``version`` with every cipher OpenSSL still has."""
    ctx = trusting(cert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are deprecated
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


async def wss_connect(url: str, ctx: ssl.SSLContext) -> WsClient:
    """WsClient.connect with a TLS context (the helper has no ssl parameter)."""
    transport, listener = await picows.ws_connect(
        _Listener,
        url,
        ssl_context=ctx,
        extra_headers={"Sec-WebSocket-Protocol": "sovereign.v1"},
        enable_auto_pong=False,
    )
    assert isinstance(listener, _Listener)
    return WsClient(transport, listener)


async def handshake(port: int, ctx: ssl.SSLContext) -> ssl.SSLObject:
    """A bare TLS handshake with 127.0.0.1:port; returns the negotiated session."""
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 5
    )
    try:
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj is not None
        return sslobj  # type: ignore[no-any-return]
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


# -- wss:// works ------------------------------------------------------------------------


async def test_wss_ping_pong_and_auth(tmp_path: Path, certs: CertFiles) -> None:
    async with running_server(
        tmp_path / "data", tls_cert=str(certs.cert), tls_key=str(certs.key)
    ) as srv:
        url = f"wss://127.0.0.1:{srv.app.port}/ws"
        c = await wss_connect(url, trusting(certs.cert))
        pong = await c.request(T.PING, pb.Ping(timestamp=123456789), T.PONG)
        assert pong.timestamp == 123456789
        acct = await register(c, "alice")
        await c.close()

        c = await wss_connect(f"wss://localhost:{srv.app.port}/ws", trusting(certs.cert))
        assert (await resume(c, acct.token)).user_id == acct.user_id
        await c.close()

        session = await handshake(srv.app.port, trusting(certs.cert))
        assert session.version() in ("TLSv1.2", "TLSv1.3")


async def test_plain_ws_is_not_served_on_a_tls_listener(tmp_path: Path, certs: CertFiles) -> None:
    async with running_server(
        tmp_path / "data", tls_cert=str(certs.cert), tls_key=str(certs.key)
    ) as srv:
        # A cleartext upgrade request gets no HTTP answer, only a hang-up.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.app.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sovereign.v1\r\n\r\n"
        )
        try:
            answer = await asyncio.wait_for(reader.read(4096), 5)
        except ConnectionError:
            answer = b""
        assert b"HTTP/1.1" not in answer
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        # An untrusted certificate is refused by a verifying client.
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(srv.app.port, ssl.create_default_context())
        # The server keeps serving after both.
        c = await wss_connect(f"wss://127.0.0.1:{srv.app.port}/ws", trusting(certs.cert))
        assert (await c.request(T.PING, pb.Ping(timestamp=1), T.PONG)).timestamp == 1
        await c.close()


# -- TLS 1.2+ and modern ciphers only ------------------------------------------------------


async def test_tls_1_1_and_1_0_clients_are_refused(tmp_path: Path, certs: CertFiles) -> None:
    # Control: these clients really can speak TLS 1.1 / 1.0 with a permissive server, so
    # the refusal below is the Sovereign server's, not the client's own.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("ALL:@SECLEVEL=0")
    permissive.load_cert_chain(certs.cert, certs.key)

    async def hang_up(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    old = (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1)
    control = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=permissive)
    try:
        port = control.sockets[0].getsockname()[1]
        for version in old:
            session = await handshake(port, legacy_client(certs.cert, version))
            assert session.version() == version.name.replace("_", ".").replace("TLSv1.0", "TLSv1")
    finally:
        control.close()
        await control.wait_closed()

    async with running_server(
        tmp_path / "data", tls_cert=str(certs.cert), tls_key=str(certs.key)
    ) as srv:
        for version in old:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(srv.app.port, legacy_client(certs.cert, version))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, picows.WSError)):
            c = await wss_connect(
                f"wss://127.0.0.1:{srv.app.port}/ws",
                legacy_client(certs.cert, ssl.TLSVersion.TLSv1_1),
            )
            await c.close()
        # TLS 1.2 is accepted, with forward-secret AEAD ciphers only.
        tls12 = legacy_client(certs.cert, ssl.TLSVersion.TLSv1_2)
        session = await handshake(srv.app.port, tls12)
        assert session.version() == "TLSv1.2"
        cipher = session.cipher()
        assert cipher is not None and cipher[0].startswith("ECDHE-")
        assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]
        # A TLS 1.2 client offering only static-RSA / CBC suites finds nothing in common.
        weak = trusting(certs.cert)
        weak.maximum_version = ssl.TLSVersion.TLSv1_2
        weak.set_ciphers("AES128-SHA:AES256-SHA256:ECDHE-ECDSA-AES128-SHA")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(srv.app.port, weak)
        # And the server is still up for a modern client.
        c = await wss_connect(f"wss://127.0.0.1:{srv.app.port}/ws", trusting(certs.cert))
        assert (await c.request(T.PING, pb.Ping(timestamp=2), T.PONG)).timestamp == 2
        await c.close()


# -- the real process ----------------------------------------------------------------------


async def test_serve_process_with_tls_from_the_environment(
    tmp_path: Path, certs: CertFiles
) -> None:
    srv = Server(
        tmp_path / "data",
        env={"SOVEREIGN_TLS_CERT": str(certs.cert), "SOVEREIGN_TLS_KEY": str(certs.key)},
    )
    await srv.start()
    try:
        assert "listening on wss://127.0.0.1:" in srv.output()
        line = await srv.line_starting("setup URL:")
        assert line.split()[-1].startswith("https://localhost:")  # the admin panel under TLS
        assert "http://" not in srv.output()  # nothing advertised as plain http under TLS
        c = await wss_connect(f"wss://127.0.0.1:{srv.port}/ws", trusting(certs.cert))
        assert (await c.request(T.PING, pb.Ping(timestamp=5), T.PONG)).timestamp == 5
        srv.signal()
        assert await c.closed(5) == 4006
        assert await srv.wait(10) == 0
    finally:
        srv.close()


SERVE = [sys.executable, "-m", "sovereign", "serve"]


def serve_once(data_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *SERVE,
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=15,
    )


@pytest.mark.parametrize("case", ["garbage", "missing", "wrong-key", "key-as-cert"])
async def test_a_certificate_that_does_not_load_stops_startup(
    tmp_path: Path, certs: CertFiles, case: str
) -> None:
    cert, key = certs.cert, certs.key
    if case == "garbage":
        cert = tmp_path / "garbage.pem"
        cert.write_text(
            "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
        )
    elif case == "missing":
        cert = tmp_path / "nowhere.pem"
    elif case == "wrong-key":
        key = write_self_signed(tmp_path, "other").key
    else:
        cert = key
    proc = await asyncio.to_thread(
        serve_once,
        tmp_path / "data",
        {"SOVEREIGN_TLS_CERT": str(cert), "SOVEREIGN_TLS_KEY": str(key)},
    )
    assert proc.returncode != 0, proc
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert "tls_cert" in lines[0] and str(cert) in lines[0], out
    assert "listening" not in out and "Traceback" not in out


async def test_cert_without_key_is_a_config_error(tmp_path: Path, certs: CertFiles) -> None:
    proc = await asyncio.to_thread(
        serve_once, tmp_path / "data", {"SOVEREIGN_TLS_CERT": str(certs.cert)}
    )
    assert proc.returncode != 0
    assert "tls_key" in proc.stderr and proc.stderr.count("\n") == 1, proc
