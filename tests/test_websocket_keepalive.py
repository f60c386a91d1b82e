"""WebSocket keepalive (trioproxy.relay.keepalive): trioproxy's pings to a quiet client.

On the tunnel (the fast path), copied on the pump's thread and on the event loop, with raw
sockets at both ends where frame boundaries matter; then through a real trioproxy with real
clients (trio-websocket, wsproto offering permessage-deflate as browsers do) on the fast path
and on the ASGI path (an upgrade after a first request, and ``raw_socket_proxy``).

Intervals are short (0.3 s) and every wait generous: what is asserted is an order of events
(no ping inside a message, a close after a ping), and where a time, half an interval at least
(a ping that came at once, from a clock gone wrong, is caught; a loaded machine is not).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from trioproxy.config import ConfigError, make_server_process
from trioproxy.relay import keepalive
from trioproxy.relay.keepalive import Action, Keepalive, interval_for
from trioproxy.relay.pump import AVAILABLE, TunnelPump
from trioproxy.relay.tunnel import FrameCursor, Tunnel

from .conftest import TOKEN, ProxyProcess, launch_trioproxy, start_proxy, wait_for
from .test_admission import AUTH as AUTH_LINE
from .test_admission import PLAIN, read_response
from .test_tunnel_frames import (
    MIB,
    Ends,
    client_frame,
    close_code,
    frames_in,
    read_exactly,
    read_to_end,
    server_frame,
    socket_pair,
)
from .test_websocket import open_ws, start_raw_server, ws_echo_command
from .test_websocket_fastpath import (
    KEY,
    proxy_port,
    raw_handshake,
    start_wire_backend,
    switching_protocols,
)

INTERVAL = 0.3
PREFIX = b"trioproxy-keepalive-"


@pytest.fixture(params=["pump-thread", "event-loop"])
async def pump(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[TunnelPump | None]:
    """The tunnel copied on the pump's thread, or on the event loop (as over TLS, or portable)."""
    if request.param == "event-loop":
        yield None
        return
    if not AVAILABLE:
        pytest.skip("the tunnel pump runs on CPython on Linux only")
    tunnel_pump = TunnelPump()
    await nursery.start(tunnel_pump.run)
    yield tunnel_pump


# -- the rule, pure ----------------------------------------------------------------------------


def test_a_ping_is_due_after_a_quiet_interval_toward_the_client() -> None:
    state = Keepalive(30, now=100.0)
    assert state.check(129.9) is None
    state.last_from_client = 125.0  # bytes from the client do not make it less quiet
    assert state.check(130.0) is Action.PING
    state.last_to_client = 120.0
    assert state.check(130.0) is None and state.deadline() == 150.0


def test_an_unanswered_ping_expires_after_the_interval_unless_the_client_still_sends() -> None:
    state = Keepalive(30, now=0.0)
    state.pinged(30.0)
    assert state.deadline() == 60.0 and state.check(59.0) is None
    state.last_from_client = 50.0  # in the middle of a long frame, say: it cannot answer yet
    assert state.check(60.0) is None and state.deadline() == 80.0
    assert state.check(80.0) is Action.EXPIRED and state.expired
    answered = Keepalive(30, now=0.0)
    answered.pinged(30.0)
    answered.answered()
    assert answered.check(59.9) is None and answered.check(60.0) is Action.PING  # the ping was bytes too


def test_a_ping_that_cannot_go_is_tried_again_soon_not_at_once() -> None:
    state = Keepalive(30, now=0.0)
    assert state.check(31.0) is Action.PING
    assert state.next_check(31.0) == 32.0  # RETRY
    assert Keepalive(0.3, now=0.0).next_check(1.0) == pytest.approx(1.03)  # a tenth of a short interval


def test_times_move_between_clocks_whole() -> None:
    state = Keepalive(30, now=10.0)
    state.pinged(20.0)
    state.shift(1000.0)
    assert (state.last_to_client, state.last_from_client, state.ping_sent_at) == (1020.0, 1010.0, 1020.0)


def test_the_payload_is_trioproxys_and_the_ping_a_servers_frame() -> None:
    one, other = Keepalive(1, now=0), Keepalive(1, now=0)
    assert one.payload.startswith(PREFIX) and one.payload != other.payload  # random per WebSocket
    assert frames_in(one.frame) == [(0x9, one.payload)] and not one.frame[1] & 0x80  # unmasked
    assert len(one.payload) <= 125


def test_the_cursor_drops_our_pong_only_whole_and_split_anywhere() -> None:
    state = Keepalive(1, now=0)
    ours = client_frame(0xA, state.payload)
    theirs = client_frame(0xA, b"x" * len(state.payload))  # the same length, another payload
    before, after = client_frame(0x1, b"before"), client_frame(0x2, b"after")
    stream = before + ours + theirs + after
    for cut in range(len(stream) + 1):
        cursor = FrameCursor(MIB)
        cursor.keepalive = state
        state.ping_sent_at = 1.0
        passed = cursor.advance(stream[:cut]) + cursor.advance(stream[cut:])
        assert passed == before + theirs + after, cut
        assert state.ping_sent_at is None, cut
    unmasked = server_frame(0xA, state.payload)  # a client breaking the rules: still ours
    cursor = FrameCursor(MIB)
    cursor.keepalive = state
    assert cursor.advance(unmasked + after) == after


def test_the_cursor_knows_when_it_is_inside_a_fragmented_message() -> None:
    cursor = FrameCursor(MIB)
    cursor.advance(server_frame(0x1, b"", fin=False))  # an empty first fragment too
    assert cursor.in_message and cursor.at_boundary
    cursor.advance(server_frame(0x9, b"ping between fragments"))
    assert cursor.in_message
    cursor.advance(server_frame(0x0, b"end"))
    assert not cursor.in_message


def test_the_option_defaults_and_limits() -> None:
    raw = make_server_process("vnc", {"command": ["x"], "raw_socket_proxy": True})
    plain = make_server_process("app", {"command": ["x"]})
    assert interval_for(raw) == keepalive.RAW_SOCKET_DEFAULT == 30.0
    assert interval_for(plain) is None and interval_for(None) is None
    off = make_server_process("vnc", {"command": ["x"], "raw_socket_proxy": True, "websocket_keepalive": 0})
    assert interval_for(off) is None
    assert interval_for(make_server_process("app", {"command": ["x"], "websocket_keepalive": 45})) == 45.0
    for bad, said in [(0.05, "at least 0.1 s"), (-1, "0 or more"), (math.nan, "0 or more"), ("30", "expected a float")]:
        with pytest.raises(ConfigError) as failed:
            make_server_process("app", {"command": ["x"], "websocket_keepalive": bad})
        assert "websocket_keepalive" in str(failed.value) and said in str(failed.value)


# -- the tunnel, on both copiers ------------------------------------------------------------------


async def open_tunnel(
    nursery: trio.Nursery, pump: TunnelPump | None, interval: float = INTERVAL, **options: object
) -> Ends:
    client, near = await socket_pair()
    far, backend = await socket_pair()
    tunnel = Tunnel(near, far, max_message_size=MIB, pump=pump, close_timeout=2, keepalive=interval, name="kept", **options)  # type: ignore[arg-type]
    ends = Ends(client, backend, tunnel)

    async def run() -> None:
        async with near, far:
            await tunnel.run()
        ends.ended.set()

    nursery.start_soon(run)
    if pump is not None and pump.running:
        await wait_for(lambda: pump.carried > 0)
    return ends


class Wire:
    """One end's frames as they arrive, parsed at boundaries (what came after the last is kept)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.data = b""
        self.frames: list[tuple[int, bytes]] = []

    async def next_frame(self, within: float = 10) -> tuple[int, bytes]:
        with trio.fail_after(within):
            while not self.frames:
                chunk = await self.stream.receive_some(MIB)
                assert chunk, f"the connection ended; unparsed: {self.data[:80]!r}"
                self.data += chunk
                self._parse()
        return self.frames.pop(0)

    def _parse(self) -> None:
        while len(data := self.data) >= 2:
            size, end = data[1] & 0x7F, 2
            if size >= 126:
                end = 4 if size == 126 else 10
                if len(data) < end:
                    return
                size = int.from_bytes(data[2:end], "big")
            end += size + (4 if data[1] & 0x80 else 0)
            if len(data) < end:
                return
            self.frames += frames_in(data[:end])
            self.data = data[end:]

    async def after_pings(self, since: float) -> tuple[int, bytes]:
        """The next frame but our pings, each answered; one may come only an interval after
        ``since``, a time before the last bytes toward the client that could have preceded it
        (a loaded machine may stall the test that long; a ping on a tunnel that was not quiet
        is caught)."""
        while True:
            opcode, payload = await self.next_frame()
            if opcode != 0x9:
                return opcode, payload
            assert trio.current_time() - since >= INTERVAL / 2, "a ping on a tunnel that was not quiet"
            await self.stream.send_all(client_frame(0xA, payload))

    async def part_of_a_frame(self, size: int, since: float) -> bytes:
        """The first ``size`` bytes of a frame not whole yet, after any pings of ours before
        it (answered, as in :meth:`after_pings`)."""
        with trio.fail_after(10):
            while True:
                while len(self.data) < 2 or (self.data[0] == 0x89 and len(self.data) < 2 + (self.data[1] & 0x7F)):
                    chunk = await self.stream.receive_some(MIB)
                    assert chunk
                    self.data += chunk
                if self.data[0] != 0x89:
                    break
                ping = 2 + (self.data[1] & 0x7F)
                ((opcode, payload),) = frames_in(self.data[:ping])
                self.data = self.data[ping:]
                assert trio.current_time() - since >= INTERVAL / 2, "a ping on a tunnel that was not quiet"
                await self.stream.send_all(client_frame(0xA, payload))
            while len(self.data) < size:
                chunk = await self.stream.receive_some(size - len(self.data))
                assert chunk
                self.data += chunk
        part, self.data = self.data[:size], self.data[size:]
        return part

    async def ended(self, within: float = 10) -> bytes:
        """What else came before the connection ended."""
        rest = self.data
        with trio.fail_after(within):
            while True:
                try:
                    chunk = await self.stream.receive_some(MIB)
                except trio.BrokenResourceError:
                    return rest
                if not chunk:
                    return rest
                rest += chunk


async def test_a_quiet_client_gets_our_pings_and_its_pongs_never_reach_the_backend(
    nursery: trio.Nursery, pump: TunnelPump | None
) -> None:
    activity: list[float] = []
    ends = await open_tunnel(nursery, pump, on_activity=lambda: activity.append(trio.current_time()))
    client = Wire(ends.client)
    async with ends:
        began = trio.current_time()
        for _ in range(4):  # several intervals: answered each time, it stays open
            opcode, payload = await client.next_frame()
            assert opcode == 0x9 and payload.startswith(PREFIX)
            await ends.client.send_all(client_frame(0xA, payload))
        assert trio.current_time() - began >= 3 * INTERVAL  # not one ping after another
        # A pong of its own (and any other frame) still passes, byte for byte.
        theirs = client_frame(0xA, b"the client's own pong") + client_frame(0x1, b"hello")
        await ends.client.send_all(theirs)
        assert await read_exactly(ends.backend, len(theirs)) == theirs
        assert not ends.ended.is_set()
        if pump is not None:
            assert pump.carried == 1  # the pings went from the thread, which still carries it
        await trio.sleep(0.2)
        counted = len(activity)
        assert counted >= 1  # the client's own frames count as activity...
        for _ in range(2):  # ...our pings' pongs do not
            opcode, payload = await client.next_frame()
            await ends.client.send_all(client_frame(0xA, payload))
        await trio.sleep(0.3)
        if pump is not None:
            ends.tunnel.report_activity()
        assert len(activity) == counted
    with trio.fail_after(10):
        await ends.ended.wait()
    await ends.__aexit__()


async def test_a_silent_client_is_closed_with_1011_and_the_backend_told(
    nursery: trio.Nursery, pump: TunnelPump | None, caplog: pytest.LogCaptureFixture
) -> None:
    ends = await open_tunnel(nursery, pump)
    client, backend = Wire(ends.client), Wire(ends.backend)
    with caplog.at_level(logging.INFO, logger="trioproxy.tunnel"):
        async with ends:
            opcode, payload = await client.next_frame()
            pinged = trio.current_time()
            assert opcode == 0x9 and payload.startswith(PREFIX)
            # It never answers: after the bound, 1011 to it, 1001 to the backend.
            opcode, payload = await client.next_frame()
            assert trio.current_time() - pinged >= INTERVAL / 2
            assert opcode == 0x8 and close_code(payload) == 1011
            assert payload[2:] == keepalive.CLIENT_REASON.encode()
            opcode, payload = await backend.next_frame()
            assert opcode == 0x8 and close_code(payload) == 1001
            assert payload[2:] == keepalive.BACKEND_REASON.encode()
            await ends.backend.send_all(server_frame(0x8, payload[:2]))  # the backend answers and closes
            await ends.backend.aclose()
            with trio.fail_after(10):
                await ends.ended.wait()  # without waiting for the silent client
    assert "kept: WebSocket client silent for 0.3 s after a keepalive ping: closing it with 1011" in caplog.text


async def test_a_client_that_keeps_sending_a_long_frame_is_not_closed(
    nursery: trio.Nursery, pump: TunnelPump | None
) -> None:
    """It cannot put the pong before its frame's end: its bytes count as an answer meanwhile."""
    ends = await open_tunnel(nursery, pump)
    client = Wire(ends.client)
    async with ends:
        opcode, payload = await client.next_frame()
        assert opcode == 0x9
        frame = client_frame(0x2, os.urandom(40_000))
        pieces = [frame[at : at + 2000] for at in range(0, len(frame), 2000)]
        for piece in pieces:  # ~3 intervals long, a piece every sixth of one
            await ends.client.send_all(piece)
            await trio.sleep(INTERVAL / 6)
        assert not ends.ended.is_set()
        await ends.client.send_all(client_frame(0xA, payload))  # now it answers
        assert await read_exactly(ends.backend, len(frame)) == frame
        await trio.sleep(INTERVAL * 1.5)
        assert not ends.ended.is_set()


async def test_no_ping_inside_a_fragmented_message_or_a_frame_relayed_in_part(
    nursery: trio.Nursery, pump: TunnelPump | None
) -> None:
    since = trio.current_time()
    ends = await open_tunnel(nursery, pump)
    client = Wire(ends.client)
    async with ends:
        # A message in fragments, quiet for three intervals between them.
        await ends.backend.send_all(server_frame(0x1, b"first part ", fin=False))
        assert await client.after_pings(since) == (0x1, b"first part ")
        await trio.sleep(3 * INTERVAL)
        assert not client.frames and not client.data  # nothing came meanwhile
        since = trio.current_time()
        await ends.backend.send_all(server_frame(0x0, b"last part"))
        assert await client.next_frame() == (0x0, b"last part")
        opcode, payload = await client.next_frame()  # the message over, the ping may come
        assert opcode == 0x9
        await ends.client.send_all(client_frame(0xA, payload))
        # A large frame whose second half comes three intervals after its first.
        big = server_frame(0x2, os.urandom(300_000))
        await ends.backend.send_all(big[:150_000])
        assert await client.part_of_a_frame(150_000, since) == big[:150_000]
        await trio.sleep(3 * INTERVAL)
        await ends.backend.send_all(big[150_000:])
        rest, client.data = client.data, b""
        rest += await read_exactly(ends.client, len(big) - 150_000 - len(rest))
        assert rest == big[150_000:]  # not a byte of ours inside it
        opcode, payload = await client.next_frame()
        assert opcode == 0x9 and payload.startswith(PREFIX)
        assert not ends.ended.is_set()


class PingReturnsLate(trio.abc.Stream):
    """The client's side of a tunnel whose ``send_all`` of a ping returns only once ``released``
    is set: as on a busy event loop, where the client's pong may be read before the task that
    wrote the ping runs again."""

    def __init__(self, inner: trio.SocketStream, released: trio.Event) -> None:
        self.inner = inner
        self.released = released

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        if bytes(data[:1]) == b"\x89":
            await self.released.wait()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def tunnel_with_late_pings(nursery: trio.Nursery) -> tuple[trio.SocketStream, trio.SocketStream, trio.Event, trio.Event]:
    """A tunnel (keepalive on, event loop) whose pings' ``send_all`` waits for the event returned
    first; the second is set when the tunnel's run has returned."""
    client, near = await socket_pair()
    far, backend = await socket_pair()
    released = trio.Event()
    tunnel = Tunnel(PingReturnsLate(near, released), far, max_message_size=MIB, close_timeout=2, keepalive=INTERVAL)
    ended = trio.Event()

    async def run() -> None:
        async with near, far:
            await tunnel.run()
        ended.set()

    nursery.start_soon(run)
    return client, backend, released, ended


async def test_a_pong_read_before_the_ping_write_returns_answers_the_ping(nursery: trio.Nursery) -> None:
    client, backend, released, ended = await tunnel_with_late_pings(nursery)
    async with client, backend:
        wire, backend_wire = Wire(client), Wire(backend)
        opcode, payload = await wire.next_frame()
        assert opcode == 0x9
        await client.send_all(client_frame(0xA, payload) + client_frame(0x1, b"after the pong"))
        # The message behind it reached the backend: the tunnel has read the pong.
        assert await backend_wire.next_frame() == (0x1, b"after the pong")
        released.set()
        # Answered: the next frame is the next ping, an interval on, not a close for silence.
        opcode, second = await wire.next_frame()
        assert (opcode, second) == (0x9, payload)
        assert not ended.is_set()


async def test_a_client_that_resets_while_its_ping_is_written_ends_only_its_tunnel(nursery: trio.Nursery) -> None:
    client, backend, released, ended = await tunnel_with_late_pings(nursery)
    async with backend:
        opcode, _ = await Wire(client).next_frame()
        assert opcode == 0x9
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()  # a reset, while the ping's send_all has not returned
        released.set()
        with trio.fail_after(10):
            await ended.wait()
            # The backend is told as a WebSocket would tell it (1001), then the connection
            # ends; the test's nursery, where the tunnel ran, got no error.
            frames = frames_in(await read_to_end(backend))
            assert [(opcode, close_code(payload)) for opcode, payload in frames] == [(0x8, 1001)]
    other_client, other_backend, other_released, _ = await tunnel_with_late_pings(nursery)
    other_released.set()
    async with other_client, other_backend:
        await other_backend.send_all(server_frame(0x1, b"still relaying"))
        assert await Wire(other_client).next_frame() == (0x1, b"still relaying")


async def test_bytes_toward_the_client_postpone_the_ping(nursery: trio.Nursery, pump: TunnelPump | None) -> None:
    since = trio.current_time()
    ends = await open_tunnel(nursery, pump)
    client = Wire(ends.client)
    async with ends:
        for number in range(16):  # ~2.7 intervals of messages a sixth of an interval apart
            sent_at = trio.current_time()
            await ends.backend.send_all(server_frame(0x1, b"tick %d" % number))
            # (a ping before it may only follow the tick before it by an interval)
            assert await client.after_pings(since) == (0x1, b"tick %d" % number)
            since = sent_at
            await trio.sleep(INTERVAL / 6)
        opcode, _ = await client.next_frame()
        assert opcode == 0x9  # only once they stopped


async def test_a_tunnel_the_pump_hands_back_keeps_its_keepalive_on_the_event_loop(nursery: trio.Nursery) -> None:
    """The state travels with the flows, between the thread's clock and trio's: after the pump
    stops, the next ping still comes an interval after the last bytes, not at once, not never."""
    if not AVAILABLE:
        pytest.skip("the tunnel pump runs on CPython on Linux only")
    tunnel_pump = TunnelPump()
    pump_scope = trio.CancelScope()

    async def run_pump(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with pump_scope:
            await tunnel_pump.run(task_status=task_status)

    await nursery.start(run_pump)
    ends = await open_tunnel(nursery, tunnel_pump)
    client = Wire(ends.client)
    async with ends:
        opcode, payload = await client.next_frame()  # from the thread
        pinged_at = trio.current_time()
        assert opcode == 0x9
        await ends.client.send_all(client_frame(0xA, payload))
        pump_scope.cancel()  # every tunnel handed back whole; this one goes on on the event loop
        with trio.fail_after(10):
            await wait_for(lambda: tunnel_pump.carried == 0)
        opcode, payload = await client.next_frame()  # timed from the thread's ping
        assert opcode == 0x9 and trio.current_time() - pinged_at >= INTERVAL / 2
        await ends.client.send_all(client_frame(0xA, payload))
        sent = server_frame(0x1, b"from the event loop")
        await ends.backend.send_all(sent)
        assert await client.next_frame() == (0x1, b"from the event loop")
        quiet_from = trio.current_time()  # (our pings count as bytes to it: quiet from each)
        for _ in range(2):
            opcode, payload = await client.next_frame()
            assert opcode == 0x9 and payload.startswith(PREFIX)
            assert trio.current_time() - quiet_from >= INTERVAL / 2
            quiet_from = trio.current_time()
            await ends.client.send_all(client_frame(0xA, payload))
        assert not ends.ended.is_set()


async def test_a_pump_that_fails_in_a_keepalive_ends_that_tunnel(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    if not AVAILABLE:
        pytest.skip("the tunnel pump runs on CPython on Linux only")
    tunnel_pump = TunnelPump()
    await nursery.start(tunnel_pump.run)

    def fault(where: str) -> None:
        if where == "keepalive":
            raise RuntimeError("injected keepalive failure")

    tunnel_pump.fault = fault
    with caplog.at_level(logging.ERROR, logger="trioproxy.pump"):
        ends = await open_tunnel(nursery, tunnel_pump)
        async with ends:
            with trio.fail_after(10):
                await ends.ended.wait()
            assert await Wire(ends.client).ended() == b""  # just closed: where it stood is unknown
    assert "ending a tunnel after an unexpected error" in caplog.text
    assert "injected keepalive failure" in caplog.text
    assert tunnel_pump.running  # the thread goes on


# -- through trioproxy: the fast path and the ASGI path ------------------------------------------


async def test_the_api_shows_each_servers_keepalive(nursery: trio.Nursery) -> None:
    servers = {
        "vnc": {"port": 1, "raw_socket_proxy": True},
        "quiet-vnc": {"port": 2, "raw_socket_proxy": True, "websocket_keepalive": 0},
        "app": {"port": 3},
        "kept": {"port": 4, "websocket_keepalive": 45},
    }
    proxy = await start_proxy(nursery, servers)
    async with proxy.client() as client:
        listed = (await client.get("server-proxy/api/servers")).json()["servers"]
        one = (await client.get("server-proxy/api/servers/kept")).json()
    assert {server["name"]: server["websocket_keepalive"] for server in listed} == {
        "vnc": 30.0,
        "quiet-vnc": None,
        "app": None,
        "kept": 45.0,
    }
    assert one["websocket_keepalive"] == 45.0


async def test_a_server_with_keepalive_pings_real_clients_on_the_fast_path(nursery: trio.Nursery) -> None:
    """trio-websocket answers pings itself: several intervals later it is open and echoes; the
    backend never saw a pong of ours."""
    backend = await start_wire_backend(nursery, deflate=False)
    proxy = await start_proxy(nursery, {"kept": {"port": backend.port, "websocket_keepalive": INTERVAL}})
    with trio.fail_after(20):
        async with open_ws(proxy.url, "kept/ws") as ws:
            await trio.sleep(5 * INTERVAL)
            await ws.send_message("still here")
            assert await ws.get_message() == "still here"
    assert not [event for event in backend.events if isinstance(event, Pong)]


@pytest.mark.parametrize("way", ["fast-path", "asgi"])
async def test_a_browser_like_client_offering_deflate_is_pinged_and_kept(nursery: trio.Nursery, way: str) -> None:
    backend = await start_wire_backend(nursery, deflate=True)
    proxy = await start_proxy(nursery, {"kept": {"port": backend.port, "websocket_keepalive": INTERVAL}})
    port = proxy_port(proxy.url)
    ws = WSConnection(ConnectionType.CLIENT)
    pings = 0
    with trio.fail_after(20):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            if way == "asgi":
                await stream.send_all(PLAIN.format(path="server-proxy/api/servers", extra=AUTH_LINE).encode())
                assert (await read_response(stream))[0] == 200
            request = Request(host=f"127.0.0.1:{port}", target="/kept/ws", extra_headers=[(b"authorization", f"token {TOKEN}".encode())], extensions=[PerMessageDeflate()])
            await stream.send_all(ws.send(request))
            events: list[object] = []
            while not any(isinstance(event, AcceptConnection) for event in events):
                ws.receive_data(await stream.receive_some(65536))
                events += list(ws.events())
            accepted = next(event for event in events if isinstance(event, AcceptConnection))
            assert [type(extension) for extension in accepted.extensions] == [PerMessageDeflate]
            message = "compressible " * 2000
            await stream.send_all(ws.send(TextMessage(message)))
            echoed = ""
            while pings < 3 or len(echoed) < len(message):
                data = await stream.receive_some(65536)
                assert data
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Ping):
                        assert event.payload.startswith(PREFIX)
                        pings += 1
                        await stream.send_all(ws.send(event.response()))  # as a browser does
                    elif isinstance(event, TextMessage):
                        echoed += event.data
                    else:
                        raise AssertionError(f"unexpected {event!r}")
            assert echoed == message
            await stream.send_all(ws.send(CloseConnection(1000)))
    assert not [event for event in backend.events if isinstance(event, Pong)]
    assert [event.data for event in backend.events if isinstance(event, TextMessage)] == [message]


@pytest.mark.parametrize("way", ["fast-path", "asgi", "raw-socket"])
async def test_a_silent_client_through_trioproxy_is_closed_with_1011(
    nursery: trio.Nursery, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A raw-socket client that never answers; the backend (a raw server) sees the end."""
    seen: list[bytes] = []
    backend_done = trio.Event()

    async def backend_handler(stream: trio.SocketStream, server: object) -> None:
        data = b""
        if way != "raw-socket":
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            await stream.send_all(switching_protocols(data))
            data = data.partition(b"\r\n\r\n")[2]
        try:
            while chunk := await stream.receive_some(65536):
                seen.append(chunk)
                if way != "raw-socket" and b"".join(seen)[:1] == b"\x88":  # a close: answer it
                    await stream.send_all(server_frame(0x8, (1001).to_bytes(2, "big")))
                    break
        except trio.BrokenResourceError:
            pass
        backend_done.set()

    backend = await start_raw_server(nursery, backend_handler)
    options: dict[str, object] = {"port": backend.port, "websocket_keepalive": INTERVAL}
    if way == "raw-socket":
        options["raw_socket_proxy"] = True
    proxy = await start_proxy(nursery, {"kept": options})
    port = proxy_port(proxy.url)
    auth = f"Authorization: token {TOKEN}"
    with caplog.at_level(logging.INFO), trio.fail_after(20):
        if way == "fast-path":
            stream, head, rest = await raw_handshake(port, "kept/ws", auth)
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(PLAIN.format(path="server-proxy/api/servers", extra=AUTH_LINE).encode())
            assert (await read_response(stream))[0] == 200
            await stream.send_all(
                (
                    "GET /kept/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n\r\n"
                ).encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        async with stream:
            client = Wire(stream)
            client.data = rest
            client._parse()
            opcode, payload = await client.next_frame()
            assert opcode == 0x9 and payload.startswith(PREFIX)
            opcode, payload = await client.next_frame()
            assert opcode == 0x8 and close_code(payload) == 1011, payload
            assert payload[2:] == keepalive.CLIENT_REASON.encode()
            await backend_done.wait()
    if way == "raw-socket":
        assert seen == []  # its stream just ended
    else:
        (opcode, payload), *_ = frames_in(b"".join(seen))
        assert opcode == 0x8 and close_code(payload) == 1001 and payload[2:] == keepalive.BACKEND_REASON.encode()
    assert "kept: WebSocket client silent for 0.3 s after a keepalive ping: closing it with 1011" in caplog.text


async def test_a_raw_socket_server_keeps_a_real_client_open_and_relays_bytes(nursery: trio.Nursery) -> None:
    async def echo(stream: trio.SocketStream, server: object) -> None:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    backend = await start_raw_server(nursery, echo)
    proxy = await start_proxy(
        nursery, {"vnc": {"port": backend.port, "raw_socket_proxy": True, "websocket_keepalive": INTERVAL}}
    )
    with trio.fail_after(20):
        async with open_ws(proxy.url, "vnc/") as ws:
            await trio.sleep(5 * INTERVAL)
            await ws.send_message(b"RFB 003.008\n")
            assert await ws.get_message() == b"RFB 003.008\n"  # no pong of ours among the bytes


async def test_a_slow_client_on_the_asgi_path_is_not_closed_while_a_message_waits_for_it(nursery: trio.Nursery) -> None:
    """32 MiB toward a client that reads nothing for three intervals: the relay's message send
    waits, and so does the ping (it would queue behind it); then every byte arrives, no close."""
    size = 32 * MIB

    async def flood(stream: trio.SocketStream, server: object) -> None:
        await stream.send_all(os.urandom(size))
        await trio.sleep_forever()

    backend = await start_raw_server(nursery, flood)
    proxy = await start_proxy(
        nursery, {"vnc": {"port": backend.port, "raw_socket_proxy": True, "websocket_keepalive": INTERVAL}}
    )
    with trio.fail_after(60):
        stream, head, rest = await raw_handshake(proxy_port(proxy.url), "vnc/", f"Authorization: token {TOKEN}")
        async with stream:
            assert head.startswith(b"HTTP/1.1 101")
            await trio.sleep(4 * INTERVAL)  # not reading
            client = Wire(stream)
            client.data = rest
            received = 0
            while received < size:
                opcode, payload = await client.next_frame()
                assert opcode in (0x2, 0x9), (opcode, payload[:40])
                if opcode == 0x2:
                    received += len(payload)
                else:
                    await stream.send_all(client_frame(0xA, payload))
            assert received == size
            opcode, payload = await client.next_frame()  # quiet now: a ping, not a close
            assert opcode == 0x9 and payload.startswith(PREFIX)


async def test_keepalive_is_off_by_default_for_other_servers(nursery: trio.Nursery) -> None:
    backend = await start_wire_backend(nursery, deflate=False)
    proxy = await start_proxy(nursery, {"plain": {"port": backend.port}})
    with trio.fail_after(10):
        stream, head, rest = await raw_handshake(proxy_port(proxy.url), "plain/ws", f"Authorization: token {TOKEN}")
        async with stream:
            assert head.startswith(b"HTTP/1.1 101") and rest == b""
            with trio.move_on_after(1.0):
                assert await stream.receive_some(100) == b"", "something came on a quiet tunnel"


def test_over_http2_a_client_is_pinged_kept_while_it_answers_then_closed_with_1011(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    """RFC 8441 WebSockets take the ASGI path: the pings go as DATA on the client's stream."""
    from . import test_http2_faults as h2

    config = tmp_path / "config.py"
    servers = {"kept": {"command": ws_echo_command("{port}"), "websocket_keepalive": INTERVAL}}
    config.write_text(f"c.ServerProxy.servers = {servers!r}\n")
    proxy = launch_trioproxy(["--port", "0", "--token", h2.TOKEN, "--config", str(config)])
    proxy_processes.append(proxy)
    host, port = proxy.base.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    client = h2.H2Client.open((host, int(port)), "prior")
    stream_id = h2.websocket_connect(client, b"/kept/ws", auth=True)
    client.wait(lambda: client.status(stream_id) is not None)
    assert client.status(stream_id) == 200

    def received() -> list[tuple[int, bytes]]:
        wire = Wire.__new__(Wire)
        wire.data, wire.frames = client.body(stream_id), []
        wire._parse()
        return wire.frames

    for answered in range(3):
        client.wait(lambda: len([f for f in received() if f[0] == 0x9]) > answered)  # noqa: B023
        payload = [f for f in received() if f[0] == 0x9][answered][1]
        assert payload.startswith(PREFIX)
        client.connection.send_data(stream_id, client_frame(0xA, payload))
        client.flush()
    client.wait(lambda: any(f[0] == 0x8 for f in received()))
    opcode, close = received()[-1]
    assert opcode == 0x8 and close_code(close) == 1011 and close[2:] == keepalive.CLIENT_REASON.encode()
    assert [f[0] for f in received()] == [0x9, 0x9, 0x9, 0x9, 0x8]  # the last ping went unanswered
    client.close()
    proxy.stop()
    assert "kept: WebSocket client silent for 0.3 s after a keepalive ping: closing it with 1011" in proxy.output()
