"""What trioproxy.transport relies on inside Hypercorn, checked against the installed Hypercorn.

A new Hypercorn release that renames, re-signs or rewrites what trioproxy overrides or calls
fails here, by name, before it fails a user. Three kinds of check:

- names and signatures of everything the adapter calls, subclasses or reads;
- the source of every Hypercorn method the adapter *replaces* (rather than extends with
  ``super()``), fingerprinted: when one changes, read Hypercorn's new version, carry what
  changed over to trioproxy/transport.py, then record the new fingerprint here;
- behaviours, through real sockets: the last part of a response closes a connection whose
  client left, a closed idle connection is let go, heads over the incomplete-size limit.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import socket
from typing import Any

import h2.events
import pytest
import trio
from hypercorn.config import Config

from tests.conftest import wait_for
from trioproxy import transport
from trioproxy.listener import serve
from trioproxy.server import HeadLimit

pytestmark = pytest.mark.timeout(60)


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


# -- names and signatures ------------------------------------------------------------------


def test_the_pieces_the_worker_composes() -> None:
    from hypercorn.trio.lifespan import Lifespan
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

    assert parameters(Lifespan.__init__) == ["self", "app", "config", "state"]
    for name in ("handle_lifespan", "wait_for_startup", "wait_for_shutdown"):
        assert inspect.iscoroutinefunction(getattr(Lifespan, name)), name
    assert parameters(WorkerContext.__init__) == ["self", "max_requests"]
    context = WorkerContext(None)
    assert hasattr(context, "terminated") and hasattr(context, "event_class")
    assert parameters(wrap_app) == ["app", "wsgi_max_body_size", "mode"]
    assert parameters(parse_socket_addr) == ["family", "address"]
    assert parameters(repr_socket_addr) == ["family", "address"]


def test_tcp_server_as_connection_uses_it() -> None:
    from hypercorn.trio.tcp_server import TCPServer

    assert parameters(TCPServer.__init__) == ["self", "app", "config", "context", "state", "stream"]
    # Overridden (run, _read_data, _close, protocol_send) or called by Connection.
    for name in ("run", "_read_data", "_close", "protocol_send", "_idle_timeout", "_initiate_server_close"):
        assert inspect.iscoroutinefunction(getattr(TCPServer, name)), name
    source = inspect.getsource(TCPServer)
    for attribute in ("self.idle_task", "self.send_lock", "self._task_group", "self.protocol.handle"):
        assert attribute in source, attribute
    # protocol_send's events.
    from hypercorn.events import Closed, RawData, Updated

    assert Updated(idle=True).idle and RawData(data=b"x").data == b"x" and Closed() is not None


def test_the_protocol_classes_transport_subclasses() -> None:
    from hypercorn.protocol import ProtocolWrapper
    from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BUFFER_LOW_WATER, H2Protocol, StreamBuffer
    from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
    from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
    from hypercorn.protocol.ws_stream import WSStream

    protocol = ["self", "app", "config", "context", "task_group", "connection_state", "ssl", "client", "server", "send"]
    assert parameters(H2Protocol.__init__) == protocol
    assert parameters(H11Protocol.__init__) == protocol
    # transport.Protocols stands in for ProtocolWrapper: the same arguments, in the same order.
    wrapper = parameters(ProtocolWrapper.__init__)
    assert wrapper == ["self", "app", "config", "context", "task_group", "state", "ssl", "client", "server", "send", "alpn_protocol"]
    assert parameters(transport.Protocols.__init__) == wrapper
    stream = ["self", "app", "config", "context", "task_group", "ssl", "client", "server", "send", "stream_id"]
    assert parameters(HTTPStream.__init__) == stream and parameters(WSStream.__init__) == stream
    assert parameters(H2Protocol.initiate) == ["self", "headers", "settings"]
    assert ASGIHTTPState.CLOSED is not None
    for name in ("handle", "send_task", "_handle_events", "_create_stream", "_priority_updated", "stream_send",
                 "_send_data", "_close_stream", "_flush", "_window_updated"):  # fmt: skip
        assert inspect.iscoroutinefunction(getattr(H2Protocol, name)), name
    h2_source = inspect.getsource(H2Protocol)
    for attribute in ("self.streams", "self.stream_buffers", "self.priority", "self.has_data", "self.connection",
                      "self.closed", "self.keep_alive_requests", "self.connection_state", "self.task_group"):  # fmt: skip
        assert attribute in h2_source, attribute
    for name in ("handle", "initiate", "_check_protocol", "_send_h11_event"):
        assert inspect.iscoroutinefunction(getattr(H11Protocol, name)), name
    assert parameters(H2CProtocolRequiredError.__init__) == ["self", "data", "request"]
    assert parameters(H2ProtocolAssumedError.__init__) == ["self", "data"]
    # StreamBuffer's insides, which transport._StreamBuffer's push and pop use.
    assert parameters(StreamBuffer.__init__) == ["self", "event_class"]
    from hypercorn.trio.worker_context import WorkerContext

    buffer = StreamBuffer(WorkerContext(None).event_class)
    assert {"buffer", "_complete", "_paused", "_is_empty"} <= set(vars(buffer))
    assert BUFFER_LOW_WATER < BUFFER_HIGH_WATER <= 64 * 1024


def test_what_websocket_control_uses_of_a_websocket_stream() -> None:
    # transport.WebSocketControl pings through a WSStream and watches its wsproto connection:
    # Hypercorn must still send each app message as one frame made before it awaits, feed the
    # connection with receive_data, read it with events(), and drop pongs (none reach the app).
    from hypercorn.protocol.h11 import H11Protocol
    from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream

    assert inspect.iscoroutinefunction(WSStream._send_wsproto_event)
    assert parameters(WSStream._send_wsproto_event) == ["self", "event"]
    send = inspect.getsource(WSStream._send_wsproto_event)
    assert send.index("self.connection.send(event)") < send.index("await self.send(")
    source = inspect.getsource(WSStream)
    for used in ("self.closed", "self.state", "self.scope = {", "self.connection.receive_data(", "self.connection.events()"):
        assert used in source, used
    assert "Pong" not in inspect.getsource(WSStream._handle_events)
    assert ASGIWebsocketState.CONNECTED is not None
    assert "self.stream: HTTPStream | WSStream | None" in inspect.getsource(H11Protocol.__init__)


def test_the_h2_events_handled_are_those_hypercorn_handles() -> None:
    # transport.H2._handle_events replaces Hypercorn's: a newly handled event would be missed.
    from hypercorn.protocol.h2 import H2Protocol

    def handled(function: Any) -> set[str]:
        source = inspect.getsource(function)
        return {name for name in dir(h2.events) if f"h2.events.{name})" in source or f"h2.events.{name}," in source}

    ignored = {"PriorityUpdated"}  # on purpose (transport's docstring)
    assert handled(H2Protocol._handle_events) - ignored == handled(transport.H2._handle_events)


# The Hypercorn methods transport.py replaces outright, by the fingerprint of their source in
# the release it was written against (0.18.0). See the module docstring when one fails.
REPLACED = {
    "hypercorn.trio.tcp_server.TCPServer.run": "fd34b021d1a86c98",
    "hypercorn.trio.tcp_server.TCPServer._read_data": "7ca747d922c65cf1",
    "hypercorn.trio.tcp_server.TCPServer._close": "bc73c4ae25a1ceec",
    "hypercorn.protocol.ProtocolWrapper.__init__": "df25e181b9e2e64d",
    "hypercorn.protocol.ProtocolWrapper.handle": "b03e2962872c85e8",
    "hypercorn.protocol.h11.H11Protocol._check_protocol": "f95f6b38f43c62aa",
    "hypercorn.protocol.h2.H2Protocol.initiate": "fc365390735cd1b9",
    "hypercorn.protocol.h2.H2Protocol._handle_events": "3378aef0a2348f0d",
    "hypercorn.protocol.h2.H2Protocol._create_stream": "91eb123ddf247ede",
    "hypercorn.protocol.h2.H2Protocol._send_data": "a89ce4286f369820",
    "hypercorn.protocol.h2.H2Protocol._priority_updated": "a02ffc3670a3292e",
    "hypercorn.protocol.h2.StreamBuffer.pop": "9eb73c8833891346",
    "hypercorn.protocol.h2.StreamBuffer.push": "4ca8ee7b0fec5200",
}


def fingerprint(qualified: str) -> str:
    import importlib

    module_name, class_name, method = qualified.rsplit(".", 2)
    function = getattr(getattr(importlib.import_module(module_name), class_name), method)
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


@pytest.mark.parametrize("qualified", sorted(REPLACED))
def test_a_replaced_method_is_the_one_transport_was_written_against(qualified: str) -> None:
    assert fingerprint(qualified) == REPLACED[qualified], (
        f"Hypercorn's {qualified} changed: compare it with its replacement in trioproxy/transport.py, "
        "carry the change over, then record the new fingerprint in tests/test_hypercorn_contract.py"
    )


# -- ReplayStream --------------------------------------------------------------------------


async def test_replay_stream_honours_max_bytes() -> None:
    left, right = trio.socket.socketpair()
    reader, writer = trio.SocketStream(left), trio.SocketStream(right)
    async with reader, writer:
        stream = transport.ReplayStream(reader, b"0123456789")
        assert await stream.receive_some(4) == b"0123"
        assert await stream.receive_some(4) == b"4567"
        await writer.send_all(b"abcdef")
        assert await stream.receive_some(100) == b"89"  # what was read before comes first, alone
        assert await stream.receive_some(3) == b"abc"
        assert await stream.receive_some() == b"def"
        whole = transport.ReplayStream(reader, b"all of it")
        assert await whole.receive_some() == b"all of it"


# -- behaviours through real sockets --------------------------------------------------------


class _App:
    """An ASGI app that answers every request 200 after ``delay`` seconds, with the head size."""

    def __init__(self, delay: float = 0) -> None:
        self.delay = delay
        self.heads: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.heads.append(sum(len(name) + len(value) for name, value in scope["headers"]))
        await trio.sleep(self.delay)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _config(**settings: Any) -> Config:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.keep_alive_timeout = 75  # far beyond any test: the connection must go for other reasons
    config.graceful_timeout = 0.5
    for name, value in settings.items():
        setattr(config, name, value)
    return config


async def _serving(nursery: trio.Nursery, app: Any, config: Config) -> tuple[str, int]:
    binds = await nursery.start(serve, app, config)
    host, port = binds[0].split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


async def _read_all(stream: trio.SocketStream, limit: float = 10) -> bytes:
    data = b""
    with trio.fail_after(limit):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_the_last_part_closes_a_connection_whose_client_has_left(nursery: trio.Nursery) -> None:
    address = await _serving(nursery, _App(delay=0.3), _config())
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await stream.send_eof()  # gone before the answer: the keep-alive timer must not hold it
    answer = await _read_all(stream)  # ends with EOF well before keep_alive_timeout
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
    await stream.aclose()


async def test_an_idle_connection_the_client_closed_is_let_go(nursery: trio.Nursery) -> None:
    address = await _serving(nursery, _App(), _config())
    before = _open_fds()
    streams = []
    for _ in range(20):
        stream = await trio.open_tcp_stream(*address)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
        streams.append(stream)
    for stream in streams:
        await stream.aclose()
    await wait_for(lambda: _open_fds() <= before + 2, timeout=20)


async def test_heads_over_the_incomplete_size_limit(nursery: trio.Nursery) -> None:
    app = _App()
    limit = 4096
    address = await _serving(nursery, HeadLimit(app, limit), _config(h11_max_incomplete_size=limit))
    big = b"x-big: " + b"a" * (limit + 100) + b"\r\n"
    # Incomplete past the limit: Hypercorn's h11 refuses it itself.
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n" + big)
    assert (await _read_all(stream)).startswith(b"HTTP/1.1 431 ")
    await stream.aclose()
    # Complete within one read: Hypercorn lets it through, HeadLimit answers it.
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    answer = await _read_all(stream)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"exceed 4096 bytes" in answer
    assert app.heads == []  # never reached the app
    await stream.aclose()


async def test_hypercorn_reads_at_most_what_transport_asks(nursery: trio.Nursery) -> None:
    # Uploads arrive in READ_SIZE reads (Hypercorn asks for 64 KiB): one body part per read.
    sizes: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _App()(scope, receive, send)
            return
        while (message := await receive()).get("more_body"):
            sizes.append(len(message["body"]))
        sizes.append(len(message["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    address = await _serving(nursery, app, _config())
    body = b"b" * (4 * transport.READ_SIZE)
    with socket.create_connection(address) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * transport.READ_SIZE)
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        await trio.to_thread.run_sync(sock.sendall, head + body)
        answer = await trio.to_thread.run_sync(sock.recv, 65536)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert sum(sizes) == len(body) and max(sizes) <= transport.READ_SIZE
