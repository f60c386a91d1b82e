"""The WebSocket and raw-socket relay, through a real trioproxy, against real backends.

Backends are tests/backends/ws_echo.py (served in this trio run on port 0, or run as a
configured server) and tests/backends/ws_raw.py; clients are trio-websocket's, or raw sockets
where a client must misbehave.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio_websocket
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from trioproxy.backend import Backend
from trioproxy.errors import sole_exception
from trioproxy.relay.websocket import (
    WebSocketTarget,
    close_for_backend,
    close_for_client,
    relay_websocket,
)

from .conftest import BACKENDS, PY, TOKEN, free_port, panel_server, start_proxy, wait_for

AUTH = [(b"authorization", f"token {TOKEN}".encode())]
MB = 1024 * 1024


def _load_backend_module() -> Any:
    spec = importlib.util.spec_from_file_location("ws_echo", BACKENDS / "ws_echo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ws_echo = _load_backend_module()


def ws_echo_command(*args: str) -> list[str]:
    return [PY, str(BACKENDS / "ws_echo.py"), *args]


def ws_raw_command(*args: str) -> list[str]:
    return [PY, str(BACKENDS / "ws_raw.py"), *args]


# -- helpers -------------------------------------------------------------------------------


@dataclass
class EchoBackend:
    """ws_echo served in this trio run, with what its connections recorded."""

    port: int
    events: list[str] = field(default_factory=list)

    @property
    def closes(self) -> list[str]:
        return [event for event in self.events if event.startswith("closed ")]


async def start_echo_backend(nursery: trio.Nursery) -> EchoBackend:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    backend = EchoBackend(listeners[0].socket.getsockname()[1])
    await nursery.start(ws_echo.serve, listeners, backend.events.append)
    return backend


@dataclass
class RawServer:
    """A plain TCP server whose handler does whatever a test needs; counts connections."""

    port: int
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0


async def start_raw_server(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream, RawServer], Awaitable[None]]
) -> RawServer:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = RawServer(listeners[0].socket.getsockname()[1])

    async def serve(stream: trio.SocketStream) -> None:
        server.connections += 1
        async with stream:
            await handler(stream, server)

    await nursery.start(trio.serve_listeners, serve, listeners)
    return server


async def read_request_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://", 1) + path


@asynccontextmanager
async def open_ws(
    base: str,
    path: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: list[str] | None = None,
    max_message_size: int = MB,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A trio-websocket client through the proxy, authenticated unless ``headers`` say otherwise.

    It holds its TCP stream itself: trio-websocket's own clients leave the socket open when
    refused or when the server closes first.
    """
    address = base.split("/")[2]
    host, port = address.rsplit(":", 1)
    resource = "/" + base.split("/", 3)[3] + path
    async with await trio.open_tcp_stream(host, int(port)) as stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            stream,
            address,
            resource,
            subprotocols=subprotocols,
            extra_headers=AUTH if headers is None else headers,
            max_message_size=max_message_size,
        )
        try:
            yield ws
        finally:
            with trio.move_on_after(5):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def closed_with(ws: trio_websocket.WebSocketConnection) -> CloseReason:
    """Read until the proxy closes the connection; the reason it gave."""
    with trio.fail_after(10):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as closed:
                assert closed.reason is not None
                return closed.reason


async def refused(base: str, path: str, **kwargs: Any) -> ConnectionRejected:
    """Attempt an upgrade through the proxy that must be refused; the refusal."""
    with trio.fail_after(10):
        try:
            async with open_ws(base, path, **kwargs):
                pass
        except BaseExceptionGroup as group:
            sole = sole_exception(group)
            assert isinstance(sole, ConnectionRejected), repr(group)
            return sole
    raise AssertionError(f"the upgrade to {path} was accepted")


def running_tasks() -> Counter[str]:
    """The names of every task alive in this trio run."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    names: Counter[str] = Counter()
    pending = [root]
    while pending:
        task = pending.pop()
        names[task.name] += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return names


async def no_task_left(baseline: Counter[str]) -> None:
    """Wait until no task is alive beyond those of ``baseline``; name any left over.

    Tasks of the baseline may have ended meanwhile (trioproxy's start-up finishing), which
    is not a leak.
    """
    with trio.move_on_after(5):
        while running_tasks() - baseline:  # noqa: ASYNC110  # a task's end has no event to wait on
            await trio.sleep(0.02)
    assert not running_tasks() - baseline, f"left over: {running_tasks() - baseline}"


async def serve_relay(
    nursery: trio.Nursery, target: WebSocketTarget, *, http_response_extension: bool = True
) -> str:
    """Hypercorn serving an ASGI app that hands every WebSocket to ``relay_websocket``.

    For failure paths the dispatcher cannot reach: timeouts shorter than its defaults, a
    server without the HTTP response extension, a failing ``on_activity``.
    """
    import hypercorn.trio
    from hypercorn.config import Config

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if not http_response_extension:
            scope = {**scope, "extensions": {}}
        await relay_websocket(scope, receive, send, target)

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    binds = await nursery.start(hypercorn.trio.serve, app, config)
    return str(binds[0]) + "/"


# -- routes and messages -------------------------------------------------------------------


ROUTES = {
    "proxy/<port>": ("proxy/{port}/", "/"),
    "proxy/<host>:<port>": ("proxy/127.0.0.1:{port}/", "/"),
    "proxy/localhost:<port>": ("proxy/localhost:{port}/", "/"),
    "proxy/absolute/<port>": ("proxy/absolute/{port}/", "/proxy/absolute/{port}/"),
    "proxy/absolute/<host>:<port>": ("proxy/absolute/127.0.0.1:{port}/", "/proxy/absolute/127.0.0.1:{port}/"),
}


@pytest.mark.parametrize("route", list(ROUTES))
async def test_proxy_routes_echo_text_and_binary(nursery: trio.Nursery, route: str) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    prefix, upstream = (part.format(port=backend.port) for part in ROUTES[route])
    with trio.fail_after(10):
        async with open_ws(proxy.url, prefix + "deep/info?x=1") as ws:
            info = json.loads(await ws.get_message())
            assert info["path"] == upstream + "deep/info?x=1"
            await ws.send_message("hello")
            await ws.send_message(b"\x00\x01binary\xff")
            assert await ws.get_message() == "hello"
            assert await ws.get_message() == b"\x00\x01binary\xff"


@pytest.mark.parametrize("listen", ["tcp", "unix"])
async def test_named_server_starts_lazily_and_echoes(nursery: trio.Nursery, listen: str) -> None:
    command = ws_echo_command("{port}") if listen == "tcp" else ws_echo_command("--unix", "{unix_socket}")
    config: dict[str, Any] = {"command": command, "timeout": 20}
    if listen == "unix":
        config["unix_socket"] = True
    proxy = await start_proxy(nursery, {"ws": config})
    assert proxy.supervisors["ws"].pid is None
    with trio.fail_after(20):
        async with open_ws(proxy.url, "ws/sub/echo") as ws:
            for message in ("one", b"two", "three"):
                await ws.send_message(message)
                assert await ws.get_message() == message
    assert proxy.supervisors["ws"].pid is not None


async def test_messages_keep_their_order_both_ways(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    sent = [f"message {i}" if i % 2 else f"message {i}".encode() for i in range(300)]
    with trio.fail_after(20):
        async with open_ws(proxy.url, f"proxy/{backend.port}/echo") as ws:
            async with trio.open_nursery() as inner:

                async def send_all() -> None:
                    for message in sent:
                        await ws.send_message(message)

                inner.start_soon(send_all)
                received = [await ws.get_message() for _ in sent]
    assert received == sent


# -- handshake: headers, subprotocols, refusals ---------------------------------------------


async def test_backend_sees_forwarded_and_override_headers(nursery: trio.Nursery) -> None:
    config = {
        "command": ws_echo_command("{port}"),
        "timeout": 20,
        "request_headers_override": {"X-Injected": "port-{port}"},
    }
    proxy = await start_proxy(nursery, {"ws": config})
    extra = [*AUTH, (b"cookie", b"session=abc"), (b"x-custom", b"kept")]
    with trio.fail_after(20):
        async with open_ws(proxy.url, "ws/info", headers=extra) as ws:
            info = json.loads(await ws.get_message())
    headers = dict(info["headers"])
    port = proxy.supervisors["ws"].port
    assert headers["x-injected"] == f"port-{port}"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "ws"
    assert headers["x-forwarded-host"] == proxy.url.split("/")[2]
    assert headers["x-forwarded-prefix"] == headers["x-forwarded-context"] == "/ws"
    assert headers["cookie"] == "session=abc"
    assert headers["x-custom"] == "kept"
    assert "authorization" not in headers  # the proxy's own token stays with the proxy


async def test_backend_gets_the_clients_host_or_its_override(nursery: trio.Nursery) -> None:
    async def capture_then_refuse(stream: trio.SocketStream, server: RawServer) -> None:
        server.requests.append(await read_request_head(stream))
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")

    capture = await start_raw_server(nursery, capture_then_refuse)
    servers = {
        "plain": {"command": [], "port": capture.port},
        "override": {
            "command": [],
            "port": capture.port,
            "request_headers_override": {"Host": "inside.example"},
        },
    }
    proxy = await start_proxy(nursery, servers)
    host = proxy.url.split("/")[2]
    for name in servers:
        assert (await refused(proxy.url, f"{name}/path", subprotocols=["a", "b"])).status_code == 403
    plain, override = (request.decode("latin-1").lower() for request in capture.requests)
    assert plain.startswith("get /path http/1.1\r\n")
    assert f"\r\nhost: {host}\r\n" in plain
    assert "\r\nsec-websocket-protocol: a, b\r\n" in plain
    assert "\r\nhost: inside.example\r\n" in override
    assert override.count("\r\nhost:") == 1


@pytest.mark.parametrize("served_by", ["fast path", "ASGI relay"])
async def test_handshake_header_names_are_written_as_jupyter_server_proxy_writes_them(
    nursery: trio.Nursery, served_by: str
) -> None:
    async def capture_then_refuse(stream: trio.SocketStream, server: RawServer) -> None:
        server.requests.append(await read_request_head(stream))
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")

    capture = await start_raw_server(nursery, capture_then_refuse)
    config = {"command": [], "port": capture.port, "request_headers_override": {"x-CUSTOM-header": "v"}}
    proxy = await start_proxy(nursery, {"named": config})
    host = proxy.url.split("/")[2]
    upgrade = (
        f"GET /named/path HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: token {TOKEN}\r\nx-client-thing: kept\r\n\r\n"
    ).encode()
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", int(host.rsplit(":", 1)[1])) as stream:
            if served_by == "ASGI relay":  # an upgrade after a first request is Hypercorn's
                await stream.send_all(f"GET /named/first HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                first = await read_request_head(stream)
                assert first.startswith(b"HTTP/1.1 403"), first  # no token: refused, connection kept
                head, _, body = first.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
                while len(body) < length:
                    body += await stream.receive_some(65536)
            await stream.send_all(upgrade)
            answer = await read_request_head(stream)
    assert answer.startswith(b"HTTP/1.1 403"), answer
    (sent,) = capture.requests
    for line in [
        "X-Forwarded-Context: /named",
        "X-Proxycontextpath: /named",
        "X-Custom-Header: v",
        "X-Client-Thing: kept",
    ]:
        assert f"\r\n{line}\r\n" in sent.decode("latin-1"), sent


SUBPROTOCOL_TABLE = {
    "none requested": ([], None, None),
    "one, chosen": (["chat"], 0, "chat"),
    "several, backend picks the second": (["v1.x", "v2.x", "v3.x"], 1, "v2.x"),
    "several, backend picks none": (["v1.x", "v2.x"], None, None),
}


@pytest.mark.parametrize("case", list(SUBPROTOCOL_TABLE))
async def test_subprotocols_are_the_backends_choice(nursery: trio.Nursery, case: str) -> None:
    requested, choose, expected = SUBPROTOCOL_TABLE[case]
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    query = "" if choose is None else f"?choose={choose}"
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/info{query}", subprotocols=requested) as ws:
            assert ws.subprotocol == expected
            info = json.loads(await ws.get_message())
    assert info["subprotocols"] == requested


@pytest.mark.parametrize("status", [403, 404])
async def test_backend_refusal_reaches_the_client(nursery: trio.Nursery, status: int) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    await trio.sleep(0.05)
    baseline = running_tasks()
    rejection = await refused(proxy.url, f"proxy/{backend.port}/reject?status={status}")
    assert rejection.status_code == status
    assert rejection.body == b"refused by the backend"
    await no_task_left(baseline)


async def test_backend_set_cookie_reaches_the_client(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/info?cookie=1") as ws:
            assert (b"set-cookie", b"backend=1; Path=/") in ws.handshake_headers


async def test_unreachable_backend_is_a_502(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery)
    rejection = await refused(proxy.url, f"proxy/{free_port()}/echo")
    assert rejection.status_code == 502
    assert b"cannot connect" in (rejection.body or b"")


async def _close_at_once(stream: trio.SocketStream, server: RawServer) -> None:
    await read_request_head(stream)


async def _answer_garbage(stream: trio.SocketStream, server: RawServer) -> None:
    await read_request_head(stream)
    await stream.send_all(b"this is not HTTP\r\n\r\n")
    await trio.sleep(30)  # the relay must notice the garbage, not wait for the close


@pytest.mark.parametrize("backend_behaviour", [_close_at_once, _answer_garbage])
async def test_backend_failing_the_handshake_is_a_prompt_502(
    nursery: trio.Nursery, backend_behaviour: Callable[[trio.SocketStream, RawServer], Awaitable[None]]
) -> None:
    server = await start_raw_server(nursery, backend_behaviour)
    proxy = await start_proxy(nursery)
    rejection = await refused(proxy.url, f"proxy/{server.port}/echo")
    assert rejection.status_code == 502
    assert b"handshake" in (rejection.body or b"")


async def test_silent_backend_is_a_504_after_the_handshake_timeout(nursery: trio.Nursery) -> None:
    async def never_answer(stream: trio.SocketStream, server: RawServer) -> None:
        await trio.sleep_forever()

    server = await start_raw_server(nursery, never_answer)
    target = WebSocketTarget("silent", Backend(port=server.port), b"/", [], handshake_timeout=0.3)
    url = await serve_relay(nursery, target)
    rejection = await refused(url, "")
    assert rejection.status_code == 504
    assert b"within 0.3 s" in (rejection.body or b"")


async def test_refusal_without_the_http_response_extension_is_a_close(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    target = WebSocketTarget("t", Backend(port=backend.port), b"/reject?status=404", [])
    url = await serve_relay(nursery, target, http_response_extension=False)
    rejection = await refused(url, "")
    assert rejection.status_code == 403  # what Hypercorn answers a close before accepting


# -- closing -------------------------------------------------------------------------------


async def test_backend_close_code_and_reason_reach_the_client(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    await trio.sleep(0.05)
    baseline = running_tasks()
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/close?code=4001") as ws:
            for message in ("a", "b", "c"):  # the later ones race the backend's close
                await ws.send_message(message)
            reason = await closed_with(ws)
        await no_task_left(baseline)
    assert (reason.code, reason.reason) == (4001, "backend says bye")


async def test_client_close_reaches_the_backend_and_leaves_no_task(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    await trio.sleep(0.05)
    baseline = running_tasks()
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/echo") as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            await ws.aclose(1000, "client done")
        await wait_for(lambda: backend.closes, timeout=5)
        await no_task_left(baseline)
    # The fast path passes the client's own close frame on (the ASGI path could not:
    # Hypercorn reports every client closure as 1006, pgjones/hypercorn#127).
    assert backend.closes == ["closed /echo 1000 client done"]


async def test_client_close_code_reaches_the_backend(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/echo") as ws:
            await ws.aclose(4000, "client done")
        await wait_for(lambda: backend.closes, timeout=5)
    assert backend.closes == ["closed /echo 4000 client done"]


async def test_vanishing_client_closes_the_backend_and_leaves_no_task(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    await trio.sleep(0.05)
    baseline = running_tasks()
    host = proxy.url.split("/")[2]
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", int(host.split(":")[1]))
        await stream.send_all(
            f"GET /proxy/{backend.port}/echo HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: token {TOKEN}\r\n\r\n".encode()
        )
        assert (await read_request_head(stream)).startswith(b"HTTP/1.1 101")
        await stream.aclose()  # no close frame: the client just goes
        await wait_for(lambda: backend.closes, timeout=5)
        await no_task_left(baseline)
    assert backend.closes == ["closed /echo 1001 None"]


async def test_backend_crash_closes_the_client_promptly(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"ws": {"command": ws_echo_command("{port}"), "timeout": 20}})
    with trio.fail_after(20):
        async with open_ws(proxy.url, "ws/crash") as ws:
            await ws.send_message("die")
            with trio.fail_after(5):
                reason = await closed_with(ws)
    assert reason.code == 1011
    assert "abruptly" in (reason.reason or "")


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1000, "done", (1000, "done")),
        (4321, None, (4321, "")),
        (1005, None, (1000, "")),
        (1006, None, (1011, "the backend closed the connection abruptly")),
    ],
)
def test_close_for_client(code: int, reason: str | None, expected: tuple[int, str]) -> None:
    assert close_for_client(CloseReason(code, reason)) == expected


def test_close_for_client_without_a_reason() -> None:
    assert close_for_client(None)[0] == 1011


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"code": 1006}, (1001, None)),
        ({"code": 1005}, (1001, None)),
        ({}, (1001, None)),
        ({"code": 4000, "reason": "bye"}, (4000, "bye")),
        ({"code": 1000, "reason": ""}, (1000, None)),
    ],
)
def test_close_for_backend(message: dict[str, Any], expected: tuple[int, str | None]) -> None:
    assert close_for_backend(message) == expected


# -- ping, sizes, activity -----------------------------------------------------------------


async def test_pings_are_answered_on_both_sides(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/ping") as ws:
            assert await ws.get_message() == "pong received"  # the backend's ping was answered
            await ws.ping(b"client-ping")  # returns once the pong arrives


async def test_large_messages_pass_both_ways(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    size = 6 * MB
    binary, text = os.urandom(size), "é" * (size // 2)
    with trio.fail_after(30):
        async with open_ws(proxy.url, f"proxy/{backend.port}/big?size={size}", max_message_size=8 * MB) as ws:
            assert await ws.get_message() == b"b" * size
            await ws.send_message(binary)
            assert await ws.get_message() == binary
            await ws.send_message(text)
            assert await ws.get_message() == text


async def test_a_client_that_does_not_read_holds_the_backend_back(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    size = 64 * 1024

    def sent() -> int:
        return backend.events.count("flooded")

    with trio.fail_after(20):
        async with open_ws(proxy.url, f"proxy/{backend.port}/flood?size={size}") as ws:
            await trio.sleep(0.5)  # socket buffers fill up, then every hop waits for the next
            stalled = sent()
            await trio.sleep(0.3)
            assert sent() == stalled
            assert stalled * size < 64 * MB
            for number in range(stalled + 10):
                message = await ws.get_message()
                assert isinstance(message, bytes)
                assert int.from_bytes(message[:8], "big") == number


async def test_client_message_over_the_limit_is_a_1009(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery, websocket_max_message_size=MB)
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/echo") as ws:
            await ws.send_message(b"x" * MB)  # exactly the limit passes
            assert len(await ws.get_message()) == MB
            await ws.send_message(b"x" * (MB + 1))
            reason = await closed_with(ws)
        await wait_for(lambda: backend.closes, timeout=5)
    assert reason.code == 1009
    assert backend.closes == ["closed /echo 1001 the client sent a message over the size limit"]


async def test_backend_message_over_the_limit_is_a_1009(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery, websocket_max_message_size=MB)
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/big?size={MB + 1}") as ws:
            reason = await closed_with(ws)
        await wait_for(lambda: backend.closes, timeout=5)
    assert reason.code == 1009
    assert backend.closes[0].startswith("closed /big 1009 ")


@pytest.mark.parametrize("pump", [True, False], ids=["pump-thread", "event-loop"])
async def test_traffic_counts_as_activity(nursery: trio.Nursery, pump: bool) -> None:
    config = {"command": ws_echo_command("{port}"), "timeout": 20, "update_last_activity": True}
    proxy = await start_proxy(nursery, {"ws": config}, websocket_pump=pump)
    supervisor = proxy.supervisors["ws"]
    with trio.fail_after(20):
        async with open_ws(proxy.url, "ws/echo") as ws:
            for message in ("one", "two"):
                before = supervisor.last_activity
                await trio.sleep(0.05)
                await ws.send_message(message)
                await ws.get_message()
                # The pump's thread reports what it moved once a second.
                await wait_for(lambda: supervisor.last_activity > before, timeout=3)  # noqa: B023
            await trio.sleep(1.5)  # past the last report
            quiet = supervisor.last_activity
            await trio.sleep(1.5)
            assert supervisor.last_activity == quiet  # an open, silent WebSocket is not activity


async def test_a_failing_relay_closes_the_client_with_1011(nursery: trio.Nursery) -> None:
    def broken() -> None:
        raise RuntimeError("activity hook broke")

    backend = await start_echo_backend(nursery)
    target = WebSocketTarget("t", Backend(port=backend.port), b"/echo", [], on_activity=broken)
    url = await serve_relay(nursery, target)
    with trio.fail_after(10):
        async with open_ws(url, "") as ws:
            await ws.send_message("hi")
            reason = await closed_with(ws)
    assert reason.code == 1011
    assert "Traceback" not in (reason.reason or "")


# -- raw sockets ---------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["tcp", "unix"])
async def test_raw_socket_relays_bytes_both_ways(nursery: trio.Nursery, listen: str) -> None:
    command = ws_raw_command("{port}") if listen == "tcp" else ws_raw_command("--unix", "{unix_socket}")
    config: dict[str, Any] = {"command": command, "timeout": 20, "raw_socket_proxy": True}
    if listen == "unix":
        config["unix_socket"] = True
    proxy = await start_proxy(nursery, {"raw": config})
    output = proxy.supervisors["raw"].output
    with trio.fail_after(20):
        async with open_ws(proxy.url, "raw/", subprotocols=["ignored"]) as ws:
            assert ws.subprotocol is None
            await ws.send_message("hello")
            assert await ws.get_message() == b"HELLO"
            await ws.send_message(b"bytes\x00")
            assert await ws.get_message() == b"BYTES\x00"
        # The client's close reached the backend as the end of its stream.
        await wait_for(lambda: any("eof" in line for line in output.tail()), timeout=5)

        baseline = running_tasks()  # the server's own tasks are running by now
        async with open_ws(proxy.url, "raw/") as ws:
            await ws.send_message("bye")  # now the backend closes first
            reason = await closed_with(ws)
        await no_task_left(baseline)
    assert reason.code == 1000


async def test_raw_socket_to_an_unreachable_backend_is_a_502(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(
        nursery, {"raw": {"command": [], "port": free_port(), "raw_socket_proxy": True}}
    )
    rejection = await refused(proxy.url, "raw/")
    assert rejection.status_code == 502


async def test_raw_socket_message_over_the_limit_is_a_1009(nursery: trio.Nursery) -> None:
    async def echo(stream: trio.SocketStream, server: RawServer) -> None:
        while data := await stream.receive_some():
            await stream.send_all(data)

    server = await start_raw_server(nursery, echo)
    servers = {"raw": {"command": [], "port": server.port, "raw_socket_proxy": True}}
    proxy = await start_proxy(nursery, servers, websocket_max_message_size=1000)
    with trio.fail_after(10):
        async with open_ws(proxy.url, "raw/") as ws:
            await ws.send_message(b"y" * 1000)
            received = 0
            while received < 1000:
                received += len(await ws.get_message())
            await ws.send_message(b"y" * 1001)
            reason = await closed_with(ws)
    assert reason.code == 1009


async def test_raw_socket_backend_breaking_closes_the_client(nursery: trio.Nursery) -> None:
    async def reset(stream: trio.SocketStream, server: RawServer) -> None:
        await stream.receive_some()
        # SO_LINGER 0: close with a reset, as a crashing process's socket does.
        stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    server = await start_raw_server(nursery, reset)
    proxy = await start_proxy(
        nursery, {"raw": {"command": [], "port": server.port, "raw_socket_proxy": True}}
    )
    with trio.fail_after(10):
        async with open_ws(proxy.url, "raw/") as ws:
            await ws.send_message("x")
            reason = await closed_with(ws)
    assert reason.code == 1011


# -- many connections, auth, origin ---------------------------------------------------------


async def test_a_hundred_concurrent_websockets(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"ws": {"command": ws_echo_command("{port}"), "timeout": 20}})
    done: list[int] = []

    async def one_client(index: int) -> None:
        async with open_ws(proxy.url, "ws/echo") as ws:
            for turn in range(5):
                await ws.send_message(f"{index}:{turn}")
                assert await ws.get_message() == f"{index}:{turn}"
            done.append(index)

    with trio.fail_after(40):
        async with open_ws(proxy.url, "ws/echo"):
            pass  # start the server once, before the crowd arrives
        async with trio.open_nursery() as clients:
            for index in range(100):
                clients.start_soon(one_client, index)
    assert sorted(done) == list(range(100))


@pytest.mark.parametrize("credentials", [[], [(b"authorization", b"token wrong")]], ids=["none", "wrong"])
async def test_unauthenticated_websocket_never_reaches_the_backend(
    nursery: trio.Nursery, credentials: list[tuple[bytes, bytes]]
) -> None:
    server = await start_raw_server(nursery, _close_at_once)
    proxy = await start_proxy(nursery, {"ws": {"command": [], "port": server.port}})
    for path in ("ws/echo", f"proxy/{server.port}/echo"):
        rejection = await refused(proxy.url, path, headers=credentials)
        assert rejection.status_code == 403
    assert server.connections == 0


async def test_cross_origin_websocket_is_refused(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    path = f"proxy/{backend.port}/echo"
    rejection = await refused(proxy.url, path, headers=[*AUTH, (b"origin", b"http://evil.example")])
    assert rejection.status_code == 403
    same_origin = "http://" + proxy.url.split("/")[2]
    with trio.fail_after(10):
        async with open_ws(proxy.url, path, headers=[*AUTH, (b"origin", same_origin.encode())]) as ws:
            await ws.send_message("same origin")
            assert await ws.get_message() == "same origin"


async def test_websocket_to_a_server_that_cannot_start_gets_503_with_its_output(nursery: trio.Nursery) -> None:
    crash = [PY, "-c", "print('no such database: app.db'); raise SystemExit(4)"]
    proxy = await start_proxy(nursery, {"broken": {"command": crash}})
    rejection = await refused(proxy.url, "broken/socket", headers=AUTH)
    assert rejection.status_code == 503
    document = json.loads(rejection.body)
    assert "exit code 4" in document["message"]
    assert "no such database: app.db" in document["output"]
    missing = await refused(proxy.url, "nothing-here/socket", headers=AUTH)
    assert missing.status_code == 404


# -- end to end: a Bokeh server (panel) --------------------------------------------------------

PANEL_APP = """
import panel as pn

pn.panel("Hello from panel through trioproxy").servable()
"""


async def bokeh_message(ws: trio_websocket.WebSocketConnection) -> tuple[dict[str, Any], dict[str, Any]]:
    """One Bokeh protocol message: its header and content (header, metadata, content frames)."""
    header = json.loads(await ws.get_message())
    await ws.get_message()  # metadata
    content = json.loads(await ws.get_message())
    for _ in range(header.get("num_buffers", 0)):
        await ws.get_message()
    return header, content


@pytest.mark.e2e
async def test_panel_document_loads_through_the_proxy(nursery: trio.Nursery, tmp_path: Any) -> None:
    proxy = await start_proxy(nursery, panel_server(tmp_path, PANEL_APP))
    with trio.fail_after(28):
        async with proxy.client() as client:
            page = await client.get("panel/app")
        assert page.status_code == 200
        token = re.search(r'"token":"([^"]+)"', page.text)
        assert token is not None, page.text[:500]

        # What Bokeh's page script does: the session token travels as the second subprotocol.
        origin = [(b"origin", ("http://" + proxy.url.split("/")[2]).encode())]
        async with open_ws(
            proxy.url, "panel/app/ws", headers=[*AUTH, *origin], subprotocols=["bokeh", token[1]]
        ) as ws:
            assert ws.subprotocol == "bokeh"
            header, _ = await bokeh_message(ws)
            assert header["msgtype"] == "ACK"
            for frame in ({"msgid": "1", "msgtype": "PULL-DOC-REQ"}, {}, {}):
                await ws.send_message(json.dumps(frame))
            header, content = await bokeh_message(ws)
    assert header["msgtype"] == "PULL-DOC-REPLY"
    assert "Hello from panel through trioproxy" in json.dumps(content)
