"""The admission pipeline (trioproxy.admission.Gate) as both transports meet it.

A WebSocket reaches the gate by the fast path (the first request of a connection) or through
Hypercorn and ASGI (an upgrade after a first request): the same limits, the same accounting
and the same answers either way, checked with raw sockets against a real trioproxy.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable

import pytest
import trio

from .conftest import BACKENDS, TOKEN, echo_command, start_proxy, wait_for
from .test_websocket import RawServer, read_request_head, start_raw_server
from .test_websocket_fastpath import KEY

UPGRADE = (
    "GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: " + KEY + "\r\nSec-WebSocket-Version: 13\r\nAccept: application/json\r\n{extra}\r\n"
)
PLAIN = "GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n"
AUTH = f"Authorization: token {TOKEN}\r\n"


def switched(head: bytes) -> bytes:
    """A backend's 101 to the upgrade ``head`` (RFC 6455 4.2.2: the accept from the key)."""
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )

# The two ways an upgrade reaches the gate: as a connection's first request (the fast path),
# or after an ordinary request on the same connection (Hypercorn, then the ASGI relay).
PATHS = ["fast-path", "asgi"]


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def read_response(stream: trio.SocketStream) -> tuple[int, bytes, bytes]:
    """Status, head and body of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        assert chunk
        body += chunk
    return int(head.split(b" ", 2)[1]), head, body


async def upgrade(port: int, path: str, way: str, extra: str = AUTH) -> trio.SocketStream:
    """A connection that has sent an upgrade to ``path`` the ``way`` asked."""
    stream = await connect(port)
    if way == "asgi":
        await stream.send_all(PLAIN.format(path="server-proxy/api/servers", extra=AUTH).encode())
        status, _, _ = await read_response(stream)
        assert status == 200
    await stream.send_all(UPGRADE.format(path=path, extra=extra).encode())
    return stream


def held_handshake(release: trio.Event) -> Callable[[trio.SocketStream, RawServer], Awaitable[None]]:
    """A backend that answers an upgrade only once ``release`` is set, then holds the line."""

    async def handle(stream: trio.SocketStream, server: RawServer) -> None:
        head = await read_request_head(stream)
        server.requests.append(head)
        await release.wait()
        await stream.send_all(switched(head))
        while await stream.receive_some(65536):
            continue

    return handle


@pytest.mark.parametrize("way", PATHS)
async def test_a_websocket_is_in_use_from_admission_on_either_path(nursery: trio.Nursery, way: str) -> None:
    release = trio.Event()
    backend = await start_raw_server(nursery, held_handshake(release))
    proxy = await start_proxy(nursery, {"slow": {"port": backend.port}})
    supervisor = proxy.supervisors["slow"]
    stream = await upgrade(int(proxy.url.split(":")[2].split("/")[0]), "slow/", way)
    with trio.fail_after(10):
        await wait_for(lambda: backend.requests)
    # The backend has not answered: the WebSocket is being set up, and already counts.
    assert supervisor.active == 1
    release.set()
    with trio.fail_after(10):
        status, _, _ = await read_response_head_only(stream)
    assert status == 101
    assert supervisor.active == 1
    await stream.aclose()
    with trio.fail_after(10):
        await wait_for(lambda: supervisor.active == 0)


async def read_response_head_only(stream: trio.SocketStream) -> tuple[int, bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, rest


@pytest.mark.parametrize("way", PATHS)
async def test_an_idle_reload_waits_for_a_websocket_being_set_up(nursery: trio.Nursery, way: str) -> None:
    from trioproxy.config import make_server_process

    release = trio.Event()
    backend = await start_raw_server(nursery, held_handshake(release))
    proxy = await start_proxy(nursery, {"slow": {"port": backend.port}})
    stream = await upgrade(int(proxy.url.split(":")[2].split("/")[0]), "slow/", way)
    with trio.fail_after(10):
        await wait_for(lambda: backend.requests)
    old = proxy.supervisors["slow"]
    await proxy.supervisors.replace(make_server_process("slow", {"port": backend.port, "timeout": 7}), when_idle=True)
    await trio.sleep(0.3)
    assert proxy.supervisors["slow"] is old, "replaced while a WebSocket was being set up"
    release.set()
    with trio.fail_after(10):
        status, _, _ = await read_response_head_only(stream)
    assert status == 101
    await stream.aclose()
    with trio.fail_after(10):
        await wait_for(lambda: proxy.supervisors["slow"] is not old)


@pytest.mark.parametrize("way", PATHS)
async def test_websockets_count_against_max_websockets_not_the_http_pool(nursery: trio.Nursery, way: str) -> None:
    release = trio.Event()
    release.set()

    async def websocket_or_http(stream: trio.SocketStream, server: RawServer) -> None:
        head = await read_request_head(stream)
        server.requests.append(head)
        if b"upgrade: websocket" not in head.lower():
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return
        await stream.send_all(switched(head))
        while await stream.receive_some(65536):
            continue

    backend = await start_raw_server(nursery, websocket_or_http)
    options = {"port": backend.port, "max_websockets": 1, "max_connections": 1, "connect_timeout": 0.5}
    proxy = await start_proxy(nursery, {"one": options})
    port = int(proxy.url.split(":")[2].split("/")[0])
    first = await upgrade(port, "one/", way)
    with trio.fail_after(10):
        status, _, _ = await read_response_head_only(first)
    assert status == 101
    second = await upgrade(port, "one/", way)
    with trio.fail_after(10):
        status, _, body = await read_response(second)
    assert status == 504
    assert "all 1 WebSocket connections in use" in json.loads(body)["message"]
    await second.aclose()
    # The open WebSocket holds no room in the HTTP pool: a request still gets through.
    async with proxy.client() as client:
        assert (await client.get("one/x")).status_code == 200
    await first.aclose()
    # Its slot is free again once the first WebSocket has ended.
    with trio.fail_after(10):
        while True:
            third = await upgrade(port, "one/", way)
            status, _, _ = await read_response_head_only(third)
            await third.aclose()
            if status == 101:
                break
            await trio.sleep(0.1)


async def test_a_client_that_leaves_during_the_handshake_ends_both_connections(nursery: trio.Nursery) -> None:
    backend_closed = trio.Event()

    async def never_answer(stream: trio.SocketStream, server: RawServer) -> None:
        server.requests.append(await read_request_head(stream))
        while await stream.receive_some(65536):
            continue
        backend_closed.set()

    backend = await start_raw_server(nursery, never_answer)
    proxy = await start_proxy(nursery, {"silent": {"port": backend.port}})
    stream = await upgrade(int(proxy.url.split(":")[2].split("/")[0]), "silent/", "fast-path")
    with trio.fail_after(10):
        await wait_for(lambda: backend.requests)
    await stream.aclose()
    # Long before the handshake timeout (30 s), the backend's connection is closed too.
    with trio.fail_after(10):
        await backend_closed.wait()
    with trio.fail_after(10):
        await wait_for(lambda: proxy.supervisors["silent"].active == 0)


@pytest.mark.parametrize(
    ("path", "extra", "status"),
    [
        ("echo/", "", 403),  # no credentials
        ("echo/", AUTH + "Origin: http://evil.example\r\n", 403),
        ("echo/", AUTH + "Origin: http://[\r\n", 403),  # not a URL: no origin that is allowed
        ("proxy/evil.example:80/", AUTH, 403),  # not on the host allowlist
    ],
)
async def test_refusals_are_the_same_on_both_paths(nursery: trio.Nursery, path: str, extra: str, status: int) -> None:
    backend = await start_raw_server(nursery, held_handshake(trio.Event()))
    proxy = await start_proxy(nursery, {"echo": {"port": backend.port}})
    port = int(proxy.url.split(":")[2].split("/")[0])
    answers = []
    for way in PATHS:
        stream = await upgrade(port, path, way, extra)
        with trio.fail_after(10):
            got, _, body = await read_response(stream)
        await stream.aclose()
        answers.append((got, json.loads(body)["message"]))
    assert answers[0] == answers[1] == (status, answers[0][1])
    assert not backend.requests


@pytest.mark.parametrize("way", PATHS)
async def test_mappath_maps_http_requests_not_websockets(nursery: trio.Nursery, way: str) -> None:
    # As jupyter-server-proxy (xprahtml5 and trame map "/" to a page with a query; their
    # clients' WebSockets at "/" must reach the backend at "/").
    release = trio.Event()
    release.set()
    backend = await start_raw_server(nursery, held_handshake(release))
    proxy = await start_proxy(nursery, {"app": {"port": backend.port, "mappath": {"/": "/index.html?user=me"}}})
    stream = await upgrade(int(proxy.url.split(":")[2].split("/")[0]), "app/", way)
    with trio.fail_after(10):
        status, _, _ = await read_response_head_only(stream)
    await stream.aclose()
    assert status == 101
    assert backend.requests[0].startswith(b"GET / HTTP/1.1\r\n")


async def test_a_server_removed_while_its_request_authenticates_is_a_404(nursery: trio.Nursery) -> None:
    from trioproxy.auth import TokenAuth

    arrived, release = trio.Event(), trio.Event()

    class SlowAuth(TokenAuth):  # as the Hub's check can take a while
        async def authenticate(self, scope: dict[str, object]):  # type: ignore[no-untyped-def]
            arrived.set()
            await release.wait()
            return await super().authenticate(scope)

    backend = await start_raw_server(nursery, held_handshake(trio.Event()))
    proxy = await start_proxy(nursery, {"gone": {"port": backend.port}})
    proxy.app.extensions["trioproxy"].settings.auth = SlowAuth(TOKEN)
    async with proxy.client() as client:
        async with trio.open_nursery() as requests:
            answers = []

            async def ask() -> None:
                answers.append(await client.get("gone/x", headers={"Accept": "application/json"}))

            requests.start_soon(ask)
            with trio.fail_after(10):
                await arrived.wait()
            await proxy.supervisors.remove("gone")
            release.set()
    assert answers[0].status_code == 404
    assert "no server named 'gone'" in answers[0].json()["message"]
    assert not backend.requests


async def test_a_request_waiting_for_a_start_is_served_by_the_server_a_reload_put_in_its_place(
    nursery: trio.Nursery,
) -> None:
    from trioproxy.config import make_server_process

    from .conftest import PY

    echo = str(BACKENDS / "echo.py")
    # The echo backend, listening only after a second: long enough for a reload to come.
    code = f"import runpy, sys, time; time.sleep(1); sys.argv = [{echo!r}, sys.argv[1]]; runpy.run_path({echo!r}, run_name='__main__')"
    slow = [PY, "-c", code, "{port}"]
    proxy = await start_proxy(nursery, {"app": {"command": slow, "timeout": 20}})
    old = proxy.supervisors["app"]
    async with proxy.client() as client:
        answers = []
        async with trio.open_nursery() as requests:

            async def ask() -> None:
                answers.append(await client.get("app/x"))

            requests.start_soon(ask)
            with trio.fail_after(10):
                await wait_for(lambda: old.state.value == "starting")
            await proxy.supervisors.replace(make_server_process("app", {"command": echo_command(), "timeout": 20}))
    assert proxy.supervisors["app"] is not old
    assert answers[0].status_code == 200, answers[0].text


@pytest.mark.parametrize("way", PATHS)
@pytest.mark.parametrize("header", ["Sec-WebSocket-Protocol: ch\xffat", "Sec-WebSocket-Extensions: permessage-deflate\xe9"])
async def test_a_handshake_header_that_is_not_ascii_is_a_400_on_either_path(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, way: str, header: str
) -> None:
    backend = await start_raw_server(nursery, held_handshake(trio.Event()))
    proxy = await start_proxy(nursery, {"echo": {"port": backend.port}})
    port = int(proxy.url.split(":")[2].split("/")[0])
    stream = await connect(port)
    if way == "asgi":
        await stream.send_all(PLAIN.format(path="server-proxy/api/servers", extra=AUTH).encode())
        assert (await read_response(stream))[0] == 200
    await stream.send_all(UPGRADE.format(path="echo/", extra=AUTH + header + "\r\n").encode("latin-1"))
    with trio.fail_after(10):
        status, _, body = await read_response(stream)
    await stream.aclose()
    assert status == 400
    name = header.split(":")[0].lower()
    assert f"the {name} header of a WebSocket handshake must be ASCII" in body.decode()
    assert not backend.requests
    assert "a client connection failed" not in caplog.text
