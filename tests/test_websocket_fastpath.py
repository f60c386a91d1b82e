"""The WebSocket fast path (trioproxy.fastpath, relay/tunnel.py, listener.py), through a real
trioproxy, with raw-socket clients and backends that record what reaches them on the wire.

The backend here is wsproto driven by hand, so that a test sees the pings, close frames and
extension offers that arrive, not what a library answered for them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from .conftest import TOKEN, echo_command, start_proxy, wait_for
from .test_websocket import (
    AUTH,
    RawServer,
    no_task_left,
    open_ws,
    read_request_head,
    running_tasks,
    start_echo_backend,
    start_raw_server,
)

KEY = base64.b64encode(b"0123456789abcdef").decode()


@pytest.fixture(params=[True, False], ids=["pump-thread", "event-loop"])
def pump(request: pytest.FixtureRequest) -> bool:
    """Tunnels copied on the pump's thread (the default), or on the event loop (as over TLS)."""
    from trioproxy.relay.pump import AVAILABLE

    if request.param and not AVAILABLE:
        pytest.skip("no tunnel pump here (portable paths): tunnels run on the event loop")
    return bool(request.param)
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"


@dataclass
class WireBackend:
    """A WebSocket echo backend on wsproto; ``events`` are what it received, in order."""

    port: int
    deflate: bool
    events: list[Any] = field(default_factory=list)
    connections: int = 0
    ended: int = 0  # connections whose stream ended (EOF or error)
    ping_on_open: bytes | None = None


async def start_wire_backend(nursery: trio.Nursery, *, deflate: bool, ping_on_open: bytes | None = None) -> WireBackend:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    backend = WireBackend(listeners[0].socket.getsockname()[1], deflate, ping_on_open=ping_on_open)

    async def serve(stream: trio.SocketStream) -> None:
        backend.connections += 1
        ws = WSConnection(ConnectionType.SERVER)
        async with stream:
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    ws.receive_data(data)
                    for event in ws.events():
                        backend.events.append(event)
                        out = _answer(ws, event, backend)
                        if out:
                            await stream.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                backend.ended += 1

    await nursery.start(trio.serve_listeners, serve, listeners)
    return backend


def _answer(ws: WSConnection, event: Any, backend: WireBackend) -> bytes:
    if isinstance(event, Request):
        extensions = [PerMessageDeflate()] if backend.deflate else []
        out = ws.send(AcceptConnection(extensions=extensions))
        if backend.ping_on_open is not None:
            out += ws.send(Ping(backend.ping_on_open))
        return out
    if isinstance(event, (TextMessage, BytesMessage)):
        return ws.send(event)
    if isinstance(event, Ping):
        return ws.send(event.response())
    if isinstance(event, CloseConnection):
        return ws.send(event.response())
    return b""


def upgrade_request(path: str, host: str, *extra: str) -> bytes:
    lines = [
        f"GET /{path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def switching_protocols(request_head: bytes) -> bytes:
    """A backend's ``101`` answer to ``request_head``, with its Sec-WebSocket-Accept."""
    key = header(request_head.partition(b"\r\n\r\n")[0], b"sec-websocket-key") or b""
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


async def raw_handshake(port: int, path: str, *extra: str) -> tuple[trio.SocketStream, bytes, bytes]:
    """Open a connection and send an upgrade; (stream, answer head, bytes after it)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(upgrade_request(path, f"127.0.0.1:{port}", *extra))
    data = await read_request_head(stream)
    head, _, rest = data.partition(b"\r\n\r\n")
    return stream, head, rest


def proxy_port(url: str) -> int:
    return int(url.split("/")[2].rsplit(":", 1)[1])


# -- extensions, pings, close frames -------------------------------------------------------------


@pytest.mark.parametrize("deflate", [True, False], ids=["backend-deflates", "backend-does-not"])
async def test_extensions_are_the_backends_answer_on_the_wire(nursery: trio.Nursery, pump: bool, deflate: bool) -> None:
    backend = await start_wire_backend(nursery, deflate=deflate)
    proxy = await start_proxy(nursery, websocket_pump=pump)
    auth = f"Authorization: token {TOKEN}"
    with trio.fail_after(10):
        direct, direct_head, _ = await raw_handshake(backend.port, "x", f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}")
        await direct.aclose()
        stream, head, _ = await raw_handshake(
            proxy_port(proxy.url), f"proxy/{backend.port}/x", f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}", auth
        )
        await stream.aclose()
    assert head.startswith(b"HTTP/1.1 101")
    expected = header(direct_head, b"sec-websocket-extensions")
    assert header(head, b"sec-websocket-extensions") == expected
    assert (expected is not None and expected.startswith(b"permessage-deflate")) == deflate
    # The backend got the client's offer as the client made it.
    request = next(event for event in backend.events if isinstance(event, Request))
    assert request.extensions == [DEFLATE_OFFER]


async def test_compressed_frames_pass_unchanged(nursery: trio.Nursery, pump: bool) -> None:
    backend = await start_wire_backend(nursery, deflate=True)
    proxy = await start_proxy(nursery, websocket_pump=pump)
    port = proxy_port(proxy.url)
    client = WSConnection(ConnectionType.CLIENT)
    message = "all work and no play " * 5000  # compresses well
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(
                client.send(
                    Request(
                        host=f"127.0.0.1:{port}",
                        target=f"/proxy/{backend.port}/z",
                        extra_headers=AUTH,
                        extensions=[PerMessageDeflate()],
                    )
                )
            )
            client.receive_data(await stream.receive_some(65536))
            accepted = next(client.events())
            assert isinstance(accepted, AcceptConnection)
            assert [type(e) for e in accepted.extensions] == [PerMessageDeflate]
            await stream.send_all(client.send(TextMessage(message)))
            wire = b""
            echoed = ""
            while True:
                data = await stream.receive_some(65536)
                assert data
                wire += data
                client.receive_data(data)
                for event in client.events():
                    assert isinstance(event, TextMessage)
                    echoed += event.data
                if len(echoed) == len(message):
                    break
    assert echoed == message
    assert wire[0] & 0x40  # RSV1: the backend's compressed frame, as it sent it
    assert len(wire) < len(message) // 10
    received = next(event for event in backend.events if isinstance(event, TextMessage))
    assert received.data == message


async def test_pings_and_pongs_reach_the_other_end(nursery: trio.Nursery, pump: bool) -> None:
    backend = await start_wire_backend(nursery, deflate=False, ping_on_open=b"backend-ping")
    proxy = await start_proxy(nursery, websocket_pump=pump)
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/p") as ws:
            await ws.ping(b"client-ping")  # returns when the backend's pong comes back
            await wait_for(lambda: any(isinstance(e, Pong) for e in backend.events))
    assert Ping(b"client-ping") in backend.events  # the backend itself saw the client's ping
    assert Pong(b"backend-ping") in backend.events  # and the client's answer to its own


@pytest.mark.parametrize("who", ["client", "backend"])
async def test_close_codes_and_reasons_pass_both_ways(nursery: trio.Nursery, pump: bool, who: str) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery, websocket_pump=pump)
    path = f"proxy/{backend.port}/" + ("echo" if who == "client" else "close?code=4123")
    with trio.fail_after(10):
        async with open_ws(proxy.url, path) as ws:
            await ws.send_message("hi")
            if who == "client":
                assert await ws.get_message() == "hi"
                await ws.aclose(4321, "client's reason")
                await wait_for(lambda: backend.closes)
                assert backend.closes == ["closed /echo 4321 client's reason"]
            else:
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert (closed.value.reason.code, closed.value.reason.reason) == (4123, "backend says bye")


# -- refusals before the backend --------------------------------------------------------------


async def _count_only(stream: trio.SocketStream, server: RawServer) -> None:
    await stream.receive_some(65536)


@pytest.mark.parametrize(
    "extra",
    [[], ["Authorization: token wrong"], [f"Authorization: token {TOKEN}", "Origin: http://evil.example"]],
    ids=["no-token", "wrong-token", "cross-origin"],
)
async def test_refused_upgrades_never_reach_the_backend(nursery: trio.Nursery, extra: list[str]) -> None:
    server = await start_raw_server(nursery, _count_only)
    proxy = await start_proxy(nursery)
    with trio.fail_after(10):
        stream, head, body = await raw_handshake(proxy_port(proxy.url), f"proxy/{server.port}/x", *extra)
        rest = body
        while data := await stream.receive_some(65536):  # the proxy closes after its answer
            rest += data
        await stream.aclose()
    assert head.startswith(b"HTTP/1.1 403 ")
    assert header(head, b"connection") == b"close"
    assert int(header(head, b"content-length") or -1) == len(rest)
    assert server.connections == 0


# -- failures mid-stream --------------------------------------------------------------------


async def test_an_upgrade_to_a_server_backing_off_says_when_to_retry(nursery: trio.Nursery) -> None:
    crash = {"command": [sys.executable, "-c", "import sys; sys.exit(3)"], "timeout": 1, "max_failures": 10}
    proxy = await start_proxy(nursery, {"crash": crash})
    stream, head, _ = await raw_handshake(proxy_port(proxy.url), "crash/ws", f"Authorization: token {TOKEN}")
    await stream.aclose()
    assert head.startswith(b"HTTP/1.1 503"), head
    assert header(head, b"retry-after") == b"2"


async def test_a_client_that_vanishes_mid_message_ends_the_backend_connection(nursery: trio.Nursery, pump: bool) -> None:
    backend = await start_wire_backend(nursery, deflate=False)
    proxy = await start_proxy(nursery, websocket_pump=pump)
    await trio.sleep(0.05)
    baseline = running_tasks()
    with trio.fail_after(10):
        stream, head, _ = await raw_handshake(
            proxy_port(proxy.url), f"proxy/{backend.port}/v", f"Authorization: token {TOKEN}"
        )
        assert head.startswith(b"HTTP/1.1 101")
        # A binary frame announcing 100,000 bytes (masked), then only 10,000 of them.
        await stream.send_all(bytes([0x82, 0x80 | 127]) + (100_000).to_bytes(8, "big") + os.urandom(4 + 10_000))
        await trio.sleep(0.1)
        await stream.aclose()
        await wait_for(lambda: backend.ended == 1)
        await no_task_left(baseline)
    # What arrived of the frame was passed on, and the connection ended: no message
    # completed, and no close frame of ours in the middle of the client's frame.
    partial = [e for e in backend.events if isinstance(e, BytesMessage)]
    assert partial and not any(e.message_finished for e in partial)
    assert sum(len(e.data) for e in partial) == 10_000
    assert not any(isinstance(e, CloseConnection) for e in backend.events)


async def test_a_backend_that_dies_mid_message_ends_the_client_connection(nursery: trio.Nursery, pump: bool) -> None:
    async def dies_mid_message(stream: trio.SocketStream, server: RawServer) -> None:
        head = await read_request_head(stream)
        await stream.send_all(
            switching_protocols(head) + bytes([0x82, 127]) + (100_000).to_bytes(8, "big") + b"x" * 10_000
        )
        await trio.sleep(0.1)  # then the connection just ends

    server = await start_raw_server(nursery, dies_mid_message)
    proxy = await start_proxy(nursery, websocket_pump=pump)
    with trio.fail_after(10):
        stream, head, rest = await raw_handshake(
            proxy_port(proxy.url), f"proxy/{server.port}/d", f"Authorization: token {TOKEN}"
        )
        assert head.startswith(b"HTTP/1.1 101")
        received = len(rest)
        while data := await stream.receive_some(65536):
            received += len(data)
        await stream.aclose()
    assert received == 10 + 10_000  # what the backend sent, then the end: no close frame mid-frame


# -- first requests that are not for the fast path ---------------------------------------------


async def test_malformed_and_oversized_heads_get_a_prompt_400(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery)
    port = proxy_port(proxy.url)
    malformed = b"GET /proxy/1/x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nno colon here\r\n\r\n"
    oversized = upgrade_request("proxy/1/x", "a", "X-Big: " + "b" * 70_000)
    for request in (malformed, oversized):
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                try:
                    await stream.send_all(request)
                except trio.BrokenResourceError:
                    pass  # answered and closed before all of it was sent
                answer = await read_request_head(stream)
        # Hypercorn's own answers, as before the fast path: 400, and 431 for a head too large.
        expected = b"HTTP/1.1 400" if request is malformed else b"HTTP/1.1 431"
        assert answer.startswith(expected), answer[:100]


async def test_ordinary_requests_are_hypercorns_with_keep_alive_and_pipelining(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"echo": {"command": echo_command(), "timeout": 20}})
    port = proxy_port(proxy.url)
    request = f"GET /echo/small HTTP/1.1\r\nHost: a\r\nAuthorization: token {TOKEN}\r\n\r\n".encode()
    with trio.fail_after(20):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request * 3)  # pipelined, in one write
            data = b""
            while data.count(b"HTTP/1.1 200") < 3:
                chunk = await stream.receive_some(65536)
                assert chunk, data
                data += chunk
            await stream.send_all(request)  # and the connection is kept alive
            data = b""
            while b"HTTP/1.1 200" not in data:
                data += await stream.receive_some(65536)


async def test_an_upgrade_after_a_request_takes_the_asgi_path(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    port = proxy_port(proxy.url)
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(
                f"GET /server-proxy/servers-info HTTP/1.1\r\nHost: a\r\nAuthorization: token {TOKEN}\r\n\r\n".encode()
            )
            answer = await read_request_head(stream)
            assert answer.startswith(b"HTTP/1.1 200")
            head, _, body = answer.partition(b"\r\n\r\n")
            while len(body) < int(header(head, b"content-length") or 0):
                body += await stream.receive_some(65536)
            async with trio.open_nursery() as inner:
                ws = await trio_websocket.wrap_client_stream(
                    inner, stream, f"127.0.0.1:{port}", f"/proxy/{backend.port}/echo", extra_headers=AUTH
                )
                await ws.send_message("second request")
                assert await ws.get_message() == "second request"
                await ws.aclose(4000, "bye")
                inner.cancel_scope.cancel()
        await wait_for(lambda: backend.closes)
    # Hypercorn's ASGI WebSocket loses the client's code (pgjones/hypercorn#127); the fast
    # path would have passed 4000 on. That difference shows which path served it.
    assert backend.closes == ["closed /echo 1001 None"]
    assert not proxy.app.extensions["trioproxy"].metrics.websockets_tunnelled


# -- graceful shutdown -------------------------------------------------------------------------


async def test_shutdown_closes_tunnels_with_1001_at_both_ends(nursery: trio.Nursery, pump: bool) -> None:
    from trioproxy.relay.pump import TunnelPump
    from trioproxy.relay.tunnel import Tunnel

    pump_thread = TunnelPump() if pump else None
    if pump_thread is not None:
        await nursery.start(pump_thread.run)

    backend = await start_echo_backend(nursery)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    tunnels: list[Tunnel] = []

    async def tunnel_to_backend(client: trio.SocketStream) -> None:
        # A client stream and a backend stream after their handshakes, as the fast path has them.
        async with client, await trio.open_tcp_stream("127.0.0.1", backend.port) as to_backend:
            head = await read_request_head(client)
            await to_backend.send_all(head)
            answer = await read_request_head(to_backend)
            await client.send_all(answer)
            tunnel = Tunnel(client, to_backend, max_message_size=1 << 20, close_timeout=2, pump=pump_thread)
            tunnels.append(tunnel)
            await tunnel.run()

    await nursery.start(trio.serve_listeners, tunnel_to_backend, listeners)
    with trio.fail_after(10):
        async with open_ws(f"http://127.0.0.1:{port}/", "echo", headers=[]) as ws:
            await ws.send_message("before")
            assert await ws.get_message() == "before"
            if pump_thread is not None:
                assert pump_thread.carried == 1  # the shutdown takes it back from the thread
            tunnels[0].shut_down()
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
        await wait_for(lambda: backend.closes)
    assert closed.value.reason is not None and closed.value.reason.code == 1001
    assert backend.closes == ["closed /echo 1001 the proxy is shutting down"]


def test_frame_cursor_finds_boundaries_across_reads() -> None:
    from trioproxy.relay.tunnel import FrameCursor, close_frame

    frame = bytes([0x82, 0x80 | 126]) + (300).to_bytes(2, "big") + b"k" * 4 + b"p" * 300
    stream = frame + close_frame(1000, "", masked=True)
    cursor = FrameCursor(limit=1 << 20)
    passed = b""
    for start in range(0, len(stream), 3):  # three bytes at a time: headers split
        passed += cursor.advance(stream[start : start + 3])
    assert passed == stream
    assert cursor.close_passed and cursor.at_boundary
    # Asked to stop, it stops at the next boundary and no earlier.
    cursor = FrameCursor(limit=1 << 20)
    assert cursor.advance(frame[:100]) == frame[:100]
    assert cursor.advance(frame[100:] + frame, stop=True) == frame[100:]
    # A message over the limit stops before its first byte.
    cursor = FrameCursor(limit=200)
    assert cursor.advance(b"\x81\x05hello" + frame) == b"\x81\x05hello"
    assert cursor.too_big
