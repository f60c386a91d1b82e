"""Attacks on a running trioproxy: every test sends real requests over real sockets.

What must hold: nothing gets past authentication (and no backend is started for a refused
request); ``proxy/<host>:<port>`` reaches only allowed hosts whatever the spelling; paths and
headers cannot be bent into other routes or extra headers; oversized or slow requests are
refused without harm; cross-origin WebSockets are refused; the login page redirects only
within the site; and secrets stay out of logs, error pages and relayed requests.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from trioproxy.auth import TokenAuth
from trioproxy.cli import TrioProxy, build
from trioproxy.config import ConfigError
from trioproxy.errors import sole_exception
from trioproxy.server import run_app

from .conftest import (
    PY,
    TOKEN,
    Proxy,
    ProxyProcess,
    echo_command,
    launch_trioproxy,
    start_proxy,
)

AUTH = {"Authorization": f"token {TOKEN}"}
WEB = {"web": {"command": echo_command()}}
JSON_ACCEPT = {"Accept": "application/json"}


# -- helpers: raw HTTP, a WebSocket echo backend, a canary ---------------------------------------


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


@dataclass
class RawResponse:
    status: int
    head: bytes
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(port: int, data: bytes, *, timeout: float = 10) -> RawResponse:
    """Send bytes as they are (no client tidies the path up); read the response.

    The response ends at its Content-Length, or else when the server closes.
    """
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            received = b""
            while not _complete(received) and (chunk := await _receive(stream)):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return RawResponse(int(head.split(b" ", 2)[1]), head, body)


def _complete(received: bytes) -> bool:
    head, separator, body = received.partition(b"\r\n\r\n")
    if not separator:
        return False
    length = RawResponse(0, head, b"").header(b"content-length")
    return length is not None and len(body) >= int(length)


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:  # a reset after the server answered and closed
        return b""


def get(target: str | bytes, headers: dict[str, str] | None = None) -> bytes:
    """A GET request head that asks the server to close the connection after answering."""
    lines = [b"GET " + (target.encode() if isinstance(target, str) else target) + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [f"{k}: {v}".encode() for k, v in {**AUTH, **(headers or {})}.items()]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


@dataclass
class WebSocketEcho:
    port: int
    handshakes: list[dict[str, str]] = field(default_factory=list)


async def start_ws_echo(nursery: trio.Nursery) -> WebSocketEcho:
    echo = WebSocketEcho(0)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        echo.handshakes.append({k.decode().lower(): v.decode() for k, v in request.headers})
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed:
            pass

    server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
    echo.port = server.port
    return echo


@dataclass
class Canary:
    """A listener on loopback that must never be connected to."""

    port: int
    hits: list[str] = field(default_factory=list)


async def start_canary(nursery: trio.Nursery) -> Canary:
    canary = Canary(0)

    async def handler(stream: trio.SocketStream) -> None:
        canary.hits.append(str(stream.socket.getsockname()))
        await stream.aclose()

    # Every local address, IPv4 (127.0.0.2 too) and, where there is one, IPv6, on one port.
    listeners = await trio.open_tcp_listeners(0, host="0.0.0.0")
    canary.port = listeners[0].socket.getsockname()[1]
    try:
        listeners += await trio.open_tcp_listeners(canary.port, host="::")
    except OSError:
        pass
    await nursery.start(trio.serve_listeners, handler, listeners)
    return canary


@asynccontextmanager
async def open_ws(
    url: str, headers: list[tuple[bytes, bytes]], local_address: str | None = None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A trio-websocket client on a TCP stream held here: trio-websocket's own
    ``open_websocket_url`` leaves its socket open when the handshake is refused."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    resource = parts.path + ("?" + parts.query if parts.query else "")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(parts.hostname, parts.port, local_address=local_address)
        async with stream, trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, parts.netloc, resource, extra_headers=headers)
            try:
                yield ws
            finally:
                await ws.aclose()
                nursery.cancel_scope.cancel()


async def ws_refusal(url: str, headers: list[tuple[bytes, bytes]] | None = None, local_address: str | None = None) -> int:
    """The HTTP status a WebSocket handshake to ``url`` is refused with."""
    try:
        async with open_ws(url, headers or [], local_address):
            pass
    except BaseExceptionGroup as group:
        sole = sole_exception(group)
        assert isinstance(sole, ConnectionRejected), repr(group)
        return sole.status_code
    except ConnectionRejected as rejected:
        return rejected.status_code
    raise AssertionError(f"the upgrade to {url} was accepted")


async def ws_echoes(url: str, headers: list[tuple[bytes, bytes]], local_address: str | None = None) -> bool:
    async with open_ws(url, headers, local_address) as ws:
        await ws.send_message("ping")
        return await ws.get_message() == "ping"


def ws_url(proxy: Proxy, path: str) -> str:
    return proxy.url.replace("http://", "ws://") + path


def cookie_from(response: httpx.Response) -> tuple[str, str]:
    name, _, rest = response.headers["set-cookie"].partition("=")
    return name, rest.split(";")[0]


# -- authentication ---------------------------------------------------------------------------

def cookie_of(auth: TokenAuth) -> str:
    """A well-formed, signed cookie of ``auth`` (with its own secret), as "name=value"."""
    return auth.make_cookie().decode().split(";")[0]


OTHER = TokenAuth("some-other-token-0123456789", base_url="/")
OURS = TokenAuth(TOKEN, base_url="/")  # same token and cookie name as the proxies, other secret


def basic(credential: str) -> str:
    return "Basic " + base64.b64encode(credential.encode()).decode()


# (query string, headers): credentials in the wrong place, wrong, forged or empty.
BAD_CREDENTIALS: dict[str, tuple[str, dict[str, str]]] = {
    "none": ("", {}),
    "wrong token": ("token=wrong", {}),
    "empty token": ("token=", {}),
    "token minus a character": (f"token={TOKEN[:-1]}", {}),
    "token plus a character": (f"token={TOKEN}x", {}),
    "token in upper case": (f"token={TOKEN.upper()}", {}),
    "token in another parameter": (f"tok={TOKEN}", {}),
    "token in a capitalised parameter": (f"Token={TOKEN}", {}),
    "token inside another parameter's value": (f"next=%26token%3D{TOKEN}", {}),
    "basic authorization": ("", {"Authorization": basic(f"user:{TOKEN}")}),
    "authorization without a scheme": ("", {"Authorization": TOKEN}),
    "authorization with an unknown scheme": ("", {"Authorization": f"Digest {TOKEN}"}),
    "custom token header": ("", {"X-Token": TOKEN, "X-Jupyter-Token": TOKEN}),
    "the token as our cookie": ("", {"Cookie": f"{OURS.cookie_name}={TOKEN}"}),
    "unsigned cookie named like ours": ("", {"Cookie": f"{OURS.cookie_name}=1"}),
    "cookie signed by another run": ("", {"Cookie": cookie_of(OURS)}),
    "another proxy's cookie": ("", {"Cookie": cookie_of(OTHER)}),
}


@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
async def test_bad_credentials_are_refused_before_any_backend_starts(nursery: trio.Nursery, case: str) -> None:
    query, headers = BAD_CREDENTIALS[case]
    proxy = await start_proxy(nursery, WEB)
    suffix = "?" + query if query else ""
    async with httpx.AsyncClient(base_url=proxy.url, headers=headers, timeout=10) as client:
        api = await client.get("web/" + suffix, headers=JSON_ACCEPT)
        assert api.status_code == 403
        assert api.json()["message"].startswith("Authentication required")
        assert (await client.post("web/x" + suffix, content=b"data")).status_code == 403
        browser = await client.get("web/x" + suffix, headers={"Accept": "text/html"})
        assert browser.status_code == 302 and browser.headers["location"].startswith("/login?next=/web/x")
        assert "set-cookie" not in browser.headers
        assert (await client.get("proxy/1234/" + suffix)).status_code == 403
        assert (await client.get("server-proxy/api/servers" + suffix)).status_code == 403
        assert (await client.post("server-proxy/api/servers/web/start" + suffix)).status_code == 403
        assert (await client.get("server-proxy/api/servers/web/logs" + suffix)).status_code == 403
    ws_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    assert await ws_refusal(ws_url(proxy, "web/" + suffix), ws_headers) == 403
    status = proxy.supervisors["web"].status()
    assert status["state"] == "stopped" and status["pid"] is None


async def test_malformed_cookies_are_refused_not_a_crash(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, WEB)
    port = port_of(proxy.url)
    name = OURS.cookie_name.encode()
    # '"\\351t\\351"' unquotes to non-ASCII text, which hmac.compare_digest refuses as str.
    for cookie in (name + b"=\xe9t\xe9", name + b'="\\351t\\351"', name + b'="\\', b';;==;"x'):
        head = b"GET /web/ HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nCookie: " + cookie
        response = await raw_request(port, head + b"\r\nConnection: close\r\n\r\n")
        assert response.status == 403, cookie
    assert proxy.supervisors["web"].state.value == "stopped"


async def test_the_token_works_where_it_belongs(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, WEB)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        for headers in ({"Authorization": f"token {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}"}):
            response = await client.get("web/", headers=headers)
            assert response.status_code == 200 and "set-cookie" not in response.headers

        # A browser presenting the token once gets a cookie, which is not the token.
        response = await client.get(f"web/?token={TOKEN}", headers={"Accept": "text/html"})
        assert response.status_code == 200
        set_cookie = response.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie and "Path=/" in set_cookie
        assert TOKEN not in set_cookie
        name, value = cookie_from(response)
    async with httpx.AsyncClient(base_url=proxy.url, cookies={name: value}, timeout=10) as browser:
        assert (await browser.get("web/")).status_code == 200
        assert (await browser.get("server-proxy/api/servers")).status_code == 200


async def test_a_cookie_does_not_outlive_its_run(nursery: trio.Nursery) -> None:
    # Same token, same cookie name, but each run signs with its own secret.
    first, second = await start_proxy(nursery, WEB), await start_proxy(nursery, WEB)
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as client:
        name, value = cookie_from(await client.get(f"server-proxy/api/servers?token={TOKEN}"))
    async with httpx.AsyncClient(base_url=second.url, cookies={name: value}, timeout=10) as client:
        assert (await client.get("server-proxy/api/servers")).status_code == 403
    async with httpx.AsyncClient(base_url=first.url, cookies={name: value}, timeout=10) as client:
        assert (await client.get("server-proxy/api/servers")).status_code == 200


async def test_trioproxys_credentials_are_not_relayed(nursery: trio.Nursery) -> None:
    echo = await start_ws_echo(nursery)
    proxy = await start_proxy(nursery, WEB)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        name, value = cookie_from(await client.get(f"server-proxy/api/servers?token={TOKEN}"))
    cookies = f"theirs=1; {name}={value}; also=2"
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        seen = (await client.get("web/", headers={**AUTH, "Cookie": cookies})).json()
        headers = dict(seen["headers"])
        assert "authorization" not in headers
        assert name not in headers["cookie"] and headers["cookie"] == "theirs=1; also=2"

        # Another Authorization header is the backend's, and passes, with our cookie as proof.
        seen = (await client.get("web/", headers={"Authorization": "Bearer backend-token", "Cookie": cookies})).json()
        assert dict(seen["headers"])["authorization"] == "Bearer backend-token"

        # ?token= is forwarded by default, as jupyter-server-proxy does.
        seen = (await client.get(f"web/p?a=1&token={TOKEN}&b=2")).json()
        assert seen["target"] == f"/p?a=1&token={TOKEN}&b=2"

    ws_headers = [(b"cookie", cookies.encode()), (b"authorization", f"token {TOKEN}".encode())]
    assert await ws_echoes(ws_url(proxy, f"proxy/{echo.port}/"), ws_headers)
    handshake = echo.handshakes[-1]
    assert "authorization" not in handshake and name not in handshake.get("cookie", "")


async def test_strip_token_query(nursery: trio.Nursery) -> None:
    echo = await start_ws_echo(nursery)
    proxy = await start_proxy(nursery, WEB, strip_token_query=True)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        seen = (await client.get(f"web/p?a=1&token={TOKEN}&b=2")).json()
        assert seen["target"] == "/p?a=1&b=2"
    ws_target = ws_url(proxy, f"proxy/{echo.port}/socket?token={TOKEN}&keep=1")
    assert await ws_echoes(ws_target, [])
    assert len(echo.handshakes) == 1


# -- the allowlist of proxy/<host>:<port> -------------------------------------------------------

# {port} is a canary listening on every local address: if anything connects to it, a
# disallowed spelling of a loopback address got through.
ALLOWLIST_BYPASSES: list[tuple[str, int]] = [
    ("/proxy/evil.example:80/", 403),
    ("/proxy/absolute/evil.example:80/", 403),
    ("/%70roxy/evil.example:80/", 403),
    ("/proxy/127.1:{port}/", 403),
    ("/proxy/2130706433:{port}/", 403),
    ("/proxy/0x7f.0.0.1:{port}/", 403),
    ("/proxy/127.0.0.2:{port}/", 403),
    ("/proxy/LOCALHOST:{port}/", 403),
    ("/proxy/localhost.localdomain:{port}/", 403),
    ("/proxy/127.0.0.1.nip.io:{port}/", 403),
    ("/proxy/[::1]:{port}/", 403),
    ("/proxy/[::ffff:127.0.0.1]:{port}/", 403),
    ("/proxy/[0:0:0:0:0:0:0:1]:{port}/", 403),
    ("/proxy/::1:{port}/", 404),
    ("/proxy/evil.example@127.0.0.1:{port}/", 404),
    ("/proxy/127.0.0.1@evil.example:{port}/", 404),
    ("/proxy/user:pass@evil.example:{port}/", 404),
    ("/proxy/127.0.0.1%40evil.example:{port}/", 404),
    ("/proxy/127.0.0.1%3A{port}/", 404),
    ("/proxy/evil.example%3A{port}/", 404),
    ("/proxy/evil.example%2F..%2F127.0.0.1:{port}/", 404),
    ("/proxy/127.0.0.1:{port}%2F@evil.example/", 404),
    ("/proxy/127.0.0.1:{port}@evil.example/", 404),
    ("/proxy/127.0.0.1:{port}\\@evil.example/", 404),
    ("/proxy/%31%32%37.0.0.1:{port}/", 404),
    ("/proxy/127.0.0.1%253A{port}/", 404),
    ("/proxy/localhost.:{port}/", 404),
    ("/proxy/127.0.0.1:+{port}/", 404),
    ("/proxy/127.0.0.1:{port}0000/", 404),
    ("/proxy/:{port}/", 404),
]


async def test_no_way_around_the_host_allowlist(nursery: trio.Nursery) -> None:
    canary = await start_canary(nursery)
    proxy = await start_proxy(nursery)
    port = port_of(proxy.url)
    for template, status in ALLOWLIST_BYPASSES:
        target = template.format(port=canary.port)
        response = await raw_request(port, get(target, JSON_ACCEPT))
        assert response.status == status, (target, response.body)
        ws = await raw_request(
            port,
            get(target, {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}).replace(b"Connection: close\r\n", b""),
        )
        assert ws.status in (403, 404), (target, ws.head)
    assert canary.hits == []
    # The canary itself is reachable the allowed way, so the table above proves something.
    response = await raw_request(port, get(f"/proxy/{canary.port}/"))
    assert response.status == 502 and canary.hits


async def test_a_callable_allowlist_that_fails_refuses(nursery: trio.Nursery) -> None:
    def broken(handler: Any, host: str) -> bool:
        raise RuntimeError("boom")

    canary = await start_canary(nursery)
    proxy = await start_proxy(nursery, host_allowlist=broken)
    async with proxy.client() as client:
        response = await client.get(f"proxy/127.0.0.1:{canary.port}/")
        assert response.status_code == 403 and "boom" not in response.text
    assert canary.hits == []


async def test_the_relay_never_follows_redirects(nursery: trio.Nursery) -> None:
    canary = await start_canary(nursery)
    proxy = await start_proxy(nursery, WEB)
    async with proxy.client() as client:
        await client.post("server-proxy/api/servers/web/start")
        backend = proxy.supervisors["web"].port
        for location in (f"http://127.0.0.2:{canary.port}/steal", "http://evil.example/", f"http://[::1]:{canary.port}/"):
            response = await client.get(f"proxy/{backend}/redirect", params={"to": location})
            assert response.status_code == 302
            assert response.headers["location"] == location
    assert canary.hits == []


# -- paths and headers --------------------------------------------------------------------------

# (raw target, expected status, path the "web" backend must see or None if it must see nothing)
TRAVERSALS: list[tuple[str, int, str | None]] = [
    ("/web/..%2F..%2Fproxy/{port}/", 200, "/..%2F..%2Fproxy/{port}/"),
    ("/web/../proxy/{port}/", 200, "/../proxy/{port}/"),
    ("/web/%2e%2e/%2e%2e/proxy/{port}/", 200, "/%2e%2e/%2e%2e/proxy/{port}/"),
    ("/web/%252e%252e/proxy/{port}/", 200, "/%252e%252e/proxy/{port}/"),
    ("/web%2F..%2Fproxy/{port}/", 404, None),
    ("/%2e%2e/proxy/{port}/", 404, None),
    ("/%252e%252e/web/", 404, None),
    ("/%2577eb/", 404, None),
    ("/server-proxy/../proxy/{port}/", 404, None),
    ("/server-proxy/..%2Fproxy/{port}/", 404, None),
    ("/login/..%2Fweb/", 404, None),
    ("/login/../web/", 404, None),
]


async def test_path_traversal_and_double_encoding_stay_where_they_are(nursery: trio.Nursery) -> None:
    canary = await start_canary(nursery)
    proxy = await start_proxy(nursery, WEB)
    port = port_of(proxy.url)
    for template, status, seen in TRAVERSALS:
        target = template.format(port=canary.port)
        response = await raw_request(port, get(target, JSON_ACCEPT))
        assert response.status == status, (target, response.body)
        if seen is not None:
            assert response.json()["target"] == seen.format(port=canary.port)
    assert canary.hits == []


async def test_app_routes_cannot_be_used_to_skip_authentication(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, WEB)
    port = port_of(proxy.url)
    for target in ("/login/../web/", "/logout/..%2Fweb/", "/oauth_callback/../web/", "/server-proxy/../web/"):
        response = await raw_request(port, get(target, {"Authorization": "token wrong"}))
        assert response.status in (403, 404), target
    assert proxy.supervisors["web"].state.value == "stopped"


async def test_line_breaks_cannot_inject_headers(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, WEB)
    port = port_of(proxy.url)
    # A raw CR LF in the request line is a malformed request, refused by the HTTP parser.
    response = await raw_request(port, get(b"/web/x\r\nX-Injected: 1\r\nX: y"))
    assert response.status == 400
    response = await raw_request(port, get(b"/web/x\rX-Injected: 1"))
    assert response.status == 400
    assert proxy.supervisors["web"].state.value == "stopped"
    # Encoded, they stay encoded: part of the path or query, never a header.
    for target in ("/web/a%0D%0AX-Injected:%201", "/web/a?q=%0D%0AX-Injected:%201", "/web/a%0AX-Injected:1"):
        seen = (await raw_request(port, get(target))).json()
        assert "\n" not in seen["target"] and "\r" not in seen["target"]
        assert not any(name == "x-injected" for name, _ in seen["headers"])


@pytest.mark.parametrize(
    "override",
    [
        {"X-Who": "me\r\nX-Injected: 1"},
        {"X-Who\r\nX-Injected": "1"},
        {"X-Who": "{{port}}\nX-Injected: {port}"},
        lambda port: {"X-Who": f"{port}\nX-Injected: 1"},
    ],
    ids=["value", "name", "template", "callable"],
)
async def test_request_headers_override_cannot_inject_headers(nursery: trio.Nursery, override: Any) -> None:
    from trioproxy.config import load_server

    # A dict is refused when the configuration is loaded (that server fails: 503), what a
    # callable returns when the request is built (500).
    servers = {"web": load_server("web", {"command": echo_command(), "request_headers_override": override})}
    proxy = await start_proxy(nursery, servers)  # type: ignore[arg-type]
    async with proxy.client() as client:
        response = await client.get("web/")
    assert response.status_code == (500 if callable(override) else 503)
    assert "line break" in response.json()["message"]
    assert "'request_headers_override'" in response.json()["message"]


# -- limits (trioproxy built as the command builds it) -------------------------------------------


@dataclass
class Built:
    url: str
    supervisors: Any
    hconfig: Any

    @property
    def port(self) -> int:
        return port_of(self.url)


async def start_built(
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: list[str],
    tune: Callable[[Any], None] | None = None,
) -> Built:
    for name in list(os.environ):
        if name.startswith("JUPYTERHUB_") or name == "JUPYTER_TOKEN":
            monkeypatch.delenv(name)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"ServerProxy": {"servers": WEB}}))
    app = TrioProxy()
    app.initialize(["--config", str(config), "--port", "0", "--token", TOKEN, *args])
    app.load_file(str(config))
    hconfig, supervisors, asgi_app = build(app)
    hconfig.graceful_timeout = 0.2
    if tune is not None:
        tune(hconfig)
    binds = await nursery.start(run_app, asgi_app, hconfig)
    return Built(binds[0] + "/", supervisors, hconfig)


async def test_request_heads_are_bounded(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    proxy = await start_built(nursery, monkeypatch, tmp_path, [])
    # Too many small headers, within the size limit: 431 from trioproxy, nothing started.
    response = await raw_request(proxy.port, get("/web/", {f"X-H{i}": "1" for i in range(600)}))
    assert response.status == 431 and b"Too many request headers" in response.body
    assert proxy.supervisors["web"].state.value == "stopped"
    # Large cookie jars are normal: 40 KiB of headers pass.
    big_but_fine = await raw_request(proxy.port, get("/web/", {"Cookie": "a=" + "x" * 40_000}))
    assert big_but_fine.status == 200
    # Over 64 KiB: refused by Hypercorn with 431, and trioproxy carries on.
    huge = await raw_request(proxy.port, get("/web/", {"X-Big": "x" * 70_000}))
    assert huge.status in (400, 431)
    many = {f"X-H{i}": "1" for i in range(8000)}
    assert (await raw_request(proxy.port, get("/web/", many))).status in (400, 431)
    assert (await raw_request(proxy.port, get("/web/"))).status == 200


async def test_request_bodies_are_bounded(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    proxy = await start_built(nursery, monkeypatch, tmp_path, ["--TrioProxy.max_body_size=1000"])
    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH, timeout=10) as client:
        # A declared length over the limit is refused before the server is even started.
        response = await client.post("web/upload", content=b"x" * 1001)
        assert response.status_code == 413 and "1000 bytes" in response.json()["message"]
        assert proxy.supervisors["web"].state.value == "stopped"
        response = await client.post("web/upload", content=b"x" * 1000)
        assert response.status_code == 200 and response.json()["length"] == 1000

    # Without a length, the body is counted as it streams and cut off at the limit.
    chunked = (
        b"POST /web/upload HTTP/1.1\r\nHost: x\r\nAuthorization: token " + TOKEN.encode()
        + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"".join(b"200\r\n" + b"y" * 0x200 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    )
    response = await raw_request(proxy.port, chunked)
    assert response.status == 413
    small = chunked.replace(b"".join(b"200\r\n" + b"y" * 0x200 + b"\r\n" for _ in range(4)), b"200\r\n" + b"y" * 0x200 + b"\r\n")
    assert (await raw_request(proxy.port, small)).status == 200


async def test_slow_clients_are_cut_off_but_slow_responses_are_not(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def short_idle(hconfig: Any) -> None:
        hconfig.keep_alive_timeout = 0.5

    echo = await start_ws_echo(nursery)
    proxy = await start_built(nursery, monkeypatch, tmp_path, ["--TrioProxy.body_timeout=0.3"], short_idle)
    assert proxy.hconfig.read_timeout is None  # or long downloads and idle WebSockets would die
    assert proxy.hconfig.h11_max_incomplete_size == 64 * 1024

    # A body that stalls: 408 once body_timeout passes.
    stalled = (
        b"POST /web/upload HTTP/1.1\r\nHost: x\r\nAuthorization: token " + TOKEN.encode()
        + b"\r\nContent-Length: 100\r\n\r\n" + b"z" * 10
    )
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            await stream.send_all(stalled)
            answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 408")

    # A request head that never ends: dropped after keep_alive_timeout.
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            await stream.send_all(b"GET /web/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            assert await _receive(stream) == b""

    async with httpx.AsyncClient(base_url=proxy.url, headers=AUTH, timeout=10) as client:
        # A response slower than both timeouts arrives whole.
        response = await client.get("web/sse", params={"n": 3, "delay": 0.4}, headers={"Accept": "text/event-stream"})
        assert response.status_code == 200 and response.text.count("data: ") == 3

    # An idle WebSocket outlives both timeouts.
    url = proxy.url.replace("http://", "ws://") + f"proxy/{echo.port}/"
    async with open_ws(url, [(b"authorization", f"token {TOKEN}".encode())]) as ws:
        await trio.sleep(1.0)
        await ws.send_message("still here")
        assert await ws.get_message() == "still here"


# -- cross-origin WebSockets --------------------------------------------------------------------


async def test_cross_origin_websockets_are_refused(nursery: trio.Nursery) -> None:
    echo = await start_ws_echo(nursery)
    proxy = await start_proxy(nursery)
    url = ws_url(proxy, f"proxy/{echo.port}/")
    host = urlsplit(proxy.url).netloc
    auth = [(b"authorization", f"token {TOKEN}".encode())]
    for origin in ("http://evil.example", "null", f"http://{host}.evil.example", "http://127.0.0.1", f"http://evil.example/{host}"):
        assert await ws_refusal(url, [*auth, (b"origin", origin.encode())]) == 403, origin
    assert echo.handshakes == []  # refused before the backend was contacted
    assert await ws_echoes(url, [*auth, (b"origin", f"http://{host}".encode())])
    assert await ws_echoes(url, auth)  # no Origin: not a browser; authenticated all the same


async def test_allowed_origins(nursery: trio.Nursery) -> None:
    echo = await start_ws_echo(nursery)
    proxy = await start_proxy(nursery, allow_origin="https://good.example", allow_origin_pat=r"https://[a-z]+\.lab\.example")
    url = ws_url(proxy, f"proxy/{echo.port}/")
    auth = [(b"authorization", f"token {TOKEN}".encode())]
    for origin in ("https://good.example", "https://one.lab.example"):
        assert await ws_echoes(url, [*auth, (b"origin", origin.encode())]), origin
    for origin in ("https://good.example.evil", "http://good.example", "https://one.lab.example.evil", "https://x.y.lab.example"):
        assert await ws_refusal(url, [*auth, (b"origin", origin.encode())]) == 403, origin
    everyone = await start_proxy(nursery, allow_origin="*")
    assert await ws_echoes(ws_url(everyone, f"proxy/{echo.port}/"), [*auth, (b"origin", b"https://anything.example")])


async def test_forwarded_host_counts_for_the_origin_only_from_trusted_proxies(nursery: trio.Nursery) -> None:
    # Behind a proxy on 127.0.0.1 (trusted by default), the browser's Host is in
    # X-Forwarded-Host; any other client could name the attacker's site there.
    echo = await start_ws_echo(nursery)
    proxy = await start_proxy(nursery)
    url = ws_url(proxy, f"proxy/{echo.port}/")
    headers = [
        (b"authorization", f"token {TOKEN}".encode()),
        (b"origin", b"https://public.example"),
        (b"x-forwarded-host", b"public.example"),
    ]
    assert await ws_refusal(url, headers, local_address="127.0.0.2") == 403
    assert await ws_echoes(url, headers, local_address="127.0.0.1")
    trusting = await start_proxy(nursery, forwarded_allow_ips=("127.0.0.0/8",))
    assert await ws_echoes(ws_url(trusting, f"proxy/{echo.port}/"), headers, local_address="127.0.0.2")


def test_an_invalid_origin_pattern_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    app = TrioProxy()
    app.initialize(["--TrioProxy.allow_origin_pat=(unclosed"])
    with pytest.raises(ConfigError, match="allow_origin_pat"):
        build(app)


# -- login redirects ----------------------------------------------------------------------------

OPEN_REDIRECTS = [
    "//evil.com",
    "///evil.com",
    "https://evil.com",
    "http:evil.com",
    "/\\evil.com",
    "\\\\evil.com",
    "/\t/evil.com",
    "/\r\n/evil.com",
    " //evil.com",
    "javascript:alert(1)",
    "evil.com",
    "/other-prefix/",
]


@pytest.mark.parametrize(
    ("next_url", "base_url"),
    [(n, b) for b in ("/", "/base/") for n in OPEN_REDIRECTS if (n, b) != ("/other-prefix/", "/")],
)
async def test_login_never_redirects_off_site(nursery: trio.Nursery, next_url: str, base_url: str) -> None:
    proxy = await start_proxy(nursery, base_url=base_url)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        page = await client.get("login", params={"next": next_url})
        assert page.status_code == 200
        assert f"name='next' value='{base_url}'" in page.text
        response = await client.post("login", data={"token": TOKEN, "next": next_url})
        assert response.status_code == 302
        assert response.headers["location"] == base_url


async def test_login_form(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, WEB)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        refused = await client.post("login", data={"token": "wrong", "next": "/web/"})
        assert refused.status_code == 403 and "set-cookie" not in refused.headers
        assert "wrong" not in refused.text
        response = await client.post("login", data={"token": TOKEN, "next": "/web/x?y=1"})
        assert response.status_code == 302 and response.headers["location"] == "/web/x?y=1"
        assert "HttpOnly" in response.headers["set-cookie"] and TOKEN not in response.headers["set-cookie"]
        assert (await client.get("web/x")).status_code == 200  # the cookie works


# -- secrets in error pages and logs ------------------------------------------------------------


async def test_error_pages_and_logs_api_mask_secrets(nursery: trio.Nursery) -> None:
    leak = (
        "import sys\n"
        f"print('GET /?token={TOKEN} HTTP/1.1'); print('Authorization: Bearer abcdef123456')\n"
        f"print('raw: {TOKEN}'); print('access_token=zzz111 kept'); sys.exit(3)\n"
    )
    proxy = await start_proxy(nursery, {"leaky": {"command": [PY, "-c", leak]}})
    async with proxy.client() as client:
        # A script asking for HTML gets the HTML error page (a browser's navigation gets the
        # start page, checked below).
        for headers in ({"Accept": "application/json"}, {"Accept": "text/html", "Sec-Fetch-Mode": "cors"}):
            response = await client.get("leaky/", headers=headers)
            assert response.status_code == 503
            text = response.text
            assert "token=[secret]" in text and "Bearer [secret]" in text and "raw: [secret]" in text
            assert TOKEN not in text and "abcdef123456" not in text and "zzz111" not in text
        navigation = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
        page = await client.get("leaky/", headers=navigation, follow_redirects=True)
        assert "/server-proxy/start/leaky" in str(page.url)
        text = page.text
        assert "token=[secret]" in text and "Bearer [secret]" in text and "raw: [secret]" in text
        assert TOKEN not in text and "abcdef123456" not in text and "zzz111" not in text
        started = await client.post("server-proxy/api/servers/leaky/start")
        assert started.status_code == 503 and TOKEN not in started.text
        logs = await client.get("server-proxy/api/servers/leaky/logs")
        assert "token=[secret]" in logs.text and TOKEN not in logs.text and "zzz111" not in logs.text


def test_tokens_never_reach_the_log(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    # The default server, Python's http.server, logs each request line, ?token= included.
    env = {"JUPYTER_TOKEN": ""}
    proxy = launch_trioproxy(["--port", "0", "--debug"], env=env, cwd=str(tmp_path))
    proxy_processes.append(proxy)
    token = parse_qs(urlsplit(proxy.url).query)["token"][0]
    assert len(bytes.fromhex(token)) * 8 >= 128  # generated, at least 128 bits
    base = proxy.url.split("?")[0]
    assert httpx.get(base + "files/", timeout=10).status_code == 403
    assert httpx.get(base + f"files/?token={token}", timeout=10).status_code == 200
    assert httpx.get(base + "files/", headers={"Authorization": f"token {token}"}, timeout=10).status_code == 200
    logs = httpx.get(base + "server-proxy/api/servers/files/logs", headers={"Authorization": f"token {token}"})
    assert "token=[secret]" in logs.text and token not in logs.text
    assert proxy.stop() == 0
    output = "".join(proxy.lines)
    assert output.count(token) == 1  # in the start-up URL only
    assert "token=[secret]" in output  # the request line was logged, masked


# -- --no-auth ----------------------------------------------------------------------------------


def test_no_auth_on_loopback_warns_loudly(proxy_processes: list[ProxyProcess]) -> None:
    proxy = launch_trioproxy(["--port", "0", "--no-auth", "--", *echo_command()])
    proxy_processes.append(proxy)
    assert "token=" not in proxy.url
    assert httpx.get(proxy.url + "x", timeout=10).status_code == 200
    assert proxy.stop() == 0
    assert any("AUTHENTICATION IS DISABLED" in line for line in proxy.lines)


def test_no_auth_on_a_public_address_is_refused() -> None:
    result = subprocess.run(
        [PY, "-m", "trioproxy", "--ip", "0.0.0.0", "--port", "0", "--no-auth"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert "refusing --no-auth on non-loopback address '0.0.0.0'" in result.stderr
    assert "--allow-remote-no-auth" in result.stderr


def test_no_auth_on_a_public_address_when_forced(proxy_processes: list[ProxyProcess]) -> None:
    proxy = launch_trioproxy(["--ip", "0.0.0.0", "--port", "0", "--no-auth", "--allow-remote-no-auth"])
    proxy_processes.append(proxy)
    assert proxy.stop() == 0
    warning = next(line for line in proxy.lines if "AUTHENTICATION IS DISABLED" in line)
    assert "0.0.0.0" in warning


def test_mask_patterns() -> None:
    from trioproxy.auth import mask_secrets

    line = f"GET /a?x=1&token={TOKEN}&_xsrf=2 api_token=abc Authorization: token {TOKEN} 'authorization': 'Bearer q1'"
    masked = mask_secrets(line)
    assert TOKEN not in masked and "abc" not in masked and "q1" not in masked
    assert "x=1" in masked and "_xsrf=2" in masked
    assert mask_secrets("this token is not valid") == "this token is not valid"
    assert mask_secrets("short t known", ["t"]) == "short t known"  # too short to mask blindly
    assert re.fullmatch(r"id \[secret\]", mask_secrets("id abcdefgh", ["abcdefgh"]))


async def test_failed_logins_are_throttled_per_address(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for _ in range(10):
            wrong = await client.post("login", data={"token": "guess", "next": "/"})
            assert wrong.status_code == 403
        limited = await client.post("login", data={"token": TOKEN, "next": "/"})
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) > 0
        assert "set-cookie" not in limited.headers  # not even the right token gets in now


def test_login_throttle_window_and_memory() -> None:
    from trioproxy.throttle import LoginThrottle

    throttle = LoginThrottle(limit=3, window=10.0, max_addresses=2)
    for t in (0.0, 1.0, 2.0):
        assert throttle.retry_after("a", t) == 0.0
        throttle.failed("a", t)
    assert throttle.retry_after("a", 3.0) == pytest.approx(7.0)
    assert throttle.retry_after("a", 10.5) == 0.0  # the first failure left the window
    throttle.failed("b", 11.0)
    throttle.failed("c", 11.0)  # only two addresses are remembered: "a" goes
    assert throttle.retry_after("a", 11.0) == 0.0 and "a" not in throttle._failures
    throttle.succeeded("b")
    assert "b" not in throttle._failures
