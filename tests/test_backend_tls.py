"""Backends that speak HTTPS (``backend_tls``, trioproxy.backend_tls): real TLS backends
(tests/backends/tls_backend.py) with a CA, server and client certificates made at test time;
HTTP streaming both ways, WebSockets on both paths, readiness and health checks over TLS, a
client certificate the backend requires, and every failure a one-line 502 naming TLS."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trioproxy import backend_tls
from trioproxy.config import ServerOptionError, make_server_process

from .conftest import BACKENDS, PY, TOKEN, echo_command, start_proxy, wait_for
from .test_websocket import AUTH, open_ws, read_request_head

pytestmark = pytest.mark.timeout(90)
TLS_BACKEND = str(BACKENDS / "tls_backend.py")
JSON = {"Accept": "application/json"}


@dataclass
class PKI:
    ca: Path
    cert: Path  # the backend's, for 127.0.0.1 and localhost
    key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of them


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, server: bool = False, client: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signing_key = issuer if issuer is not None else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def make_pki(directory: Path) -> PKI:
    """A CA, a server certificate it signed, a client certificate it signed, and another CA."""
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("trioproxy test CA", ca_key, None)
    issuer = (ca.subject, ca_key)
    server_key, client_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {
        "ca.pem": ca.public_bytes(pem),
        "server.pem": _issue("backend", server_key, issuer, server=True).public_bytes(pem),
        "server-key.pem": _key_pem(server_key),
        "client.pem": _issue("trioproxy", client_key, issuer, client=True).public_bytes(pem),
        "client-key.pem": _key_pem(client_key),
        "other-ca.pem": _issue("another CA", other_key, None).public_bytes(pem),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    d = directory
    return PKI(d / "ca.pem", d / "server.pem", d / "server-key.pem", d / "client.pem", d / "client-key.pem", d / "other-ca.pem")


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path)


def tls_server(pki: PKI, kind: str = "http", *, require_client: bool = False, **options: Any) -> dict[str, Any]:
    command = [PY, TLS_BACKEND, kind, "{port}", str(pki.cert), str(pki.key)]
    if require_client:
        command.append(str(pki.ca))
    return {"command": command, "timeout": 20, "backend_tls": options.pop("tls", {"ca_file": str(pki.ca)}), **options}


def proxy_port(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


# -- the option ------------------------------------------------------------------------------


def test_backend_tls_values_that_cannot_work_fail_their_server_with_one_line(pki: PKI, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    cases = [
        ("yes", "expected a boolean or a dict"),
        ({"verfy": False}, "unknown backend_tls option 'verfy'"),
        ({"verify": "no"}, "verify must be true or false"),
        ({"ca_file": str(tmp_path / "missing.pem")}, "ca_file not found"),
        ({"ca_file": str(junk)}, f"ca_file {junk}: not a CA bundle"),
        ({"client_key": str(pki.client_key)}, "client_key needs client_cert"),
        ({"client_cert": str(tmp_path / "nope.pem")}, "client_cert not found"),
        ({"client_cert": str(pki.client_cert), "client_key": str(pki.key)}, "cannot use client_cert"),
        ({"hostname": "a b"}, "hostname must be a host name"),
    ]
    for value, message in cases:
        with pytest.raises(ServerOptionError) as raised:
            make_server_process("app", {"command": ["x"], "backend_tls": value})
        assert raised.value.option == "backend_tls"
        assert message in str(raised.value)
        assert "\n" not in str(raised.value)
    assert backend_tls.parse(False) is None
    assert backend_tls.parse(True, {}) == backend_tls.BackendTLS()


def test_under_jupyterhub_internal_ssl_the_hubs_files_are_the_defaults(pki: PKI) -> None:
    environ = {
        "JUPYTERHUB_SSL_CLIENT_CA": str(pki.ca),
        "JUPYTERHUB_SSL_CERTFILE": str(pki.client_cert),
        "JUPYTERHUB_SSL_KEYFILE": str(pki.client_key),
    }
    tls = backend_tls.parse(True, environ)
    assert tls is not None
    assert (tls.ca_file, tls.client_cert, tls.client_key) == (str(pki.ca), str(pki.client_cert), str(pki.client_key))
    # An option given overrides the Hub's, and "" turns one off.
    tls = backend_tls.parse({"ca_file": str(pki.other_ca), "client_cert": ""}, environ)
    assert tls is not None
    assert (tls.ca_file, tls.client_cert) == (str(pki.other_ca), "")
    assert tls.client_key == ""  # the Hub's key goes with the Hub's certificate
    with pytest.raises(ValueError, match="client_key needs client_cert"):
        backend_tls.parse({"client_cert": None, "client_key": str(pki.client_key)}, environ)


# -- through a real trioproxy ------------------------------------------------------------------


async def test_http_over_tls_streams_both_ways_and_is_ready_and_healthy_over_tls(nursery: trio.Nursery, pki: PKI) -> None:
    # ready_check_path and a health check that fetch a path: over plain HTTP the TLS backend
    # could never answer them, so the server being ready and healthy says they spoke TLS.
    server = tls_server(pki, ready_check_path="/ready", health_check={"path": "/health", "interval": 0.2, "timeout": 5})
    proxy = await start_proxy(nursery, {"secure": server})
    async with proxy.client() as client:
        answer = await client.get("secure/hello?x=1")
        assert answer.status_code == 200, answer.text
        assert answer.json()["target"] == "/hello?x=1"

        body = b"0123456789abcdef" * 65536 * 3  # 3 MiB, sent as it comes

        async def parts() -> Any:
            for offset in range(0, len(body), 100_000):
                yield body[offset : offset + 100_000]
                await trio.lowlevel.checkpoint()

        upload = await client.post("secure/upload", content=parts())
        assert upload.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}

        size, received = 5_000_000, 0
        async with client.stream("GET", f"secure/bytes?size={size}&chunked=1") as download:
            assert download.status_code == 200
            async for part in download.aiter_bytes():
                received += len(part)
        assert received == size

        supervisor = proxy.supervisors["secure"]
        await wait_for(lambda: supervisor.health_failures == 0 and supervisor.status()["uptime"] > 0.5, timeout=20)
        status = (await client.get("server-proxy/api/servers/secure")).json()
        assert status["state"] == "ready" and status["health"]["checks_failed"] == 0
        assert status["backend_tls"] == {
            "verify": True, "ca_file": str(pki.ca), "client_cert": None, "client_key": None, "hostname": None,
        }  # fmt: skip


async def ws_echo_via(url: str, path: str, way: str) -> str:
    """One message echoed through a WebSocket reached by the fast path or the ASGI path."""
    if way == "fast-path":
        async with open_ws(url, path) as ws:
            await ws.send_message("over tls")
            return str(await ws.get_message())
    port = proxy_port(url)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"GET /server-proxy/servers-info HTTP/1.1\r\nHost: a\r\nAuthorization: token {TOKEN}\r\n\r\n".encode())
        answer = await read_request_head(stream)
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += await stream.receive_some(65536)
        async with trio.open_nursery() as inner:
            ws = await trio_websocket.wrap_client_stream(inner, stream, f"127.0.0.1:{port}", "/" + path, extra_headers=AUTH)
            await ws.send_message("over tls")
            message = str(await ws.get_message())
            await ws.aclose()
            inner.cancel_scope.cancel()
        return message


@pytest.mark.parametrize("way", ["fast-path", "asgi"])
async def test_websocket_echo_over_tls_on_either_path(nursery: trio.Nursery, pki: PKI, way: str) -> None:
    proxy = await start_proxy(nursery, {"wss": tls_server(pki, "ws")})
    with trio.fail_after(30):
        assert await ws_echo_via(proxy.url, "wss/echo", way) == "over tls"
    tunnelled = proxy.app.extensions["trioproxy"].metrics.websockets_tunnelled
    assert tunnelled == ({"wss": 1} if way == "fast-path" else {})


async def test_a_backend_that_requires_a_client_certificate_gets_it(nursery: trio.Nursery, pki: PKI) -> None:
    with_cert = {"ca_file": str(pki.ca), "client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    servers = {
        "mtls": tls_server(pki, require_client=True, tls=with_cert),
        "mtls-ws": tls_server(pki, "ws", require_client=True, tls=with_cert),
        "nocert": tls_server(pki, require_client=True),
        "nocert-ws": tls_server(pki, "ws", require_client=True),
    }
    proxy = await start_proxy(nursery, servers)
    async with proxy.client(headers=JSON) as client:
        answer = await client.get("mtls/who")
        assert answer.status_code == 200 and answer.json()["target"] == "/who"
        refused = await client.get("nocert/who")
    assert refused.status_code == 502
    message = refused.json()["message"]
    # The alert when it is read in time, else the reset after it: either way, named.
    assert "TLS" in message and "certificate" in message, message
    with trio.fail_after(30):
        assert await ws_echo_via(proxy.url, "mtls-ws/echo", "fast-path") == "over tls"
        assert await ws_echo_via(proxy.url, "mtls-ws/echo", "asgi") == "over tls"
        for way in ("fast-path", "asgi"):
            status, body = await refused_upgrade(proxy.url, "nocert-ws/echo", way)
            assert status == 502 and "TLS" in body["message"] and "certificate" in body["message"], (way, body)


async def test_over_a_unix_socket_the_certificate_is_checked_for_localhost(nursery: trio.Nursery, pki: PKI) -> None:
    command = [PY, TLS_BACKEND, "http", "unix:{unix_socket}", str(pki.cert), str(pki.key)]
    server = {"command": command, "unix_socket": True, "timeout": 20, "backend_tls": {"ca_file": str(pki.ca)}, "ready_check_path": "/ready"}
    wrong = {**server, "backend_tls": {"ca_file": str(pki.ca), "hostname": "elsewhere.example"}, "ready_check_path": None}
    proxy = await start_proxy(nursery, {"local": server, "wrong": wrong})
    async with proxy.client(headers=JSON) as client:
        answer = await client.get("local/over-unix")
        assert answer.status_code == 200 and answer.json()["target"] == "/over-unix"
        refused = await client.get("wrong/x")
    assert refused.status_code == 502 and "TLS verification of unix:" in refused.json()["message"], refused.text


async def test_verify_false_accepts_any_certificate(nursery: trio.Nursery, pki: PKI) -> None:
    proxy = await start_proxy(nursery, {"any": tls_server(pki, tls={"verify": False, "ca_file": str(pki.other_ca)})})
    async with proxy.client() as client:
        assert (await client.get("any/x")).status_code == 200


async def refused_upgrade(url: str, path: str, way: str) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of an upgrade the proxy refuses, by either path."""
    port = proxy_port(url)
    upgrade = (
        f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n"
        f"Accept: application/json\r\nAuthorization: token {TOKEN}\r\n\r\n"
    ).encode()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        if way == "asgi":
            await stream.send_all(f"GET /server-proxy/api/servers HTTP/1.1\r\nHost: a\r\nAuthorization: token {TOKEN}\r\n\r\n".encode())
            first = await read_request_head(stream)
            head, _, rest = first.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                rest += await stream.receive_some(65536)
        await stream.send_all(upgrade)
        data = await read_request_head(stream)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += await stream.receive_some(65536)
    return int(head.split(b" ")[1]), json.loads(body)


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ("system CAs", "unable to get local issuer certificate"),
        ("another CA", "unable to get local issuer certificate"),
        ("wrong name", "Hostname mismatch"),
    ],
)
async def test_a_certificate_that_does_not_verify_is_a_502_naming_tls_verification(
    nursery: trio.Nursery, pki: PKI, tls: str, expected: str
) -> None:
    options = {
        "system CAs": True,
        "another CA": {"ca_file": str(pki.other_ca)},
        "wrong name": {"ca_file": str(pki.ca), "hostname": "elsewhere.example"},
    }[tls]
    proxy = await start_proxy(nursery, {"bad": tls_server(pki, tls=options), "badws": tls_server(pki, "ws", tls=options)})
    async with proxy.client(headers=JSON) as client:
        answer = await client.get("bad/x")
    assert answer.status_code == 502
    message = answer.json()["message"]
    assert "TLS verification of 127.0.0.1:" in message and expected in message, message
    assert "Traceback" not in answer.text
    for way in ("fast-path", "asgi"):
        with trio.fail_after(30):
            status, body = await refused_upgrade(proxy.url, "badws/echo", way)
        assert status == 502, (way, body)
        assert "TLS verification of 127.0.0.1:" in body["message"] and expected in body["message"], (way, body)
    assert proxy.supervisors["bad"].state.value == "ready"  # the process is fine; its certificate is not


async def test_backend_tls_to_a_backend_that_speaks_plain_http_says_so(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"plain": {"command": echo_command(), "backend_tls": {"verify": False}}})
    async with proxy.client(headers=JSON) as client:
        answer = await client.get("plain/x")
    assert answer.status_code == 502
    message = answer.json()["message"]
    assert "TLS handshake with 127.0.0.1:" in message and "is the backend speaking TLS?" in message, message


async def test_a_readiness_check_that_fails_tls_says_why_once(
    nursery: trio.Nursery, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    server = tls_server(pki, ready_check_path="/ready", tls={"ca_file": str(pki.other_ca)}, timeout=2)
    proxy = await start_proxy(nursery, {"unready": server})
    async with proxy.client(headers=JSON) as client:
        answer = await client.get("unready/x")
    assert answer.status_code in (502, 503, 504)
    warnings = [r.getMessage() for r in caplog.records if r.name == "trioproxy.health"]
    assert len(warnings) == 1, warnings
    assert "GET /ready failed TLS verification (unable to get local issuer certificate)" in warnings[0]
