"""The tunnel pump (trioproxy.relay.pump): WebSocket tunnels copied on a thread of its own.

Through a real trioproxy where a client and a backend are involved, with raw sockets where the
bytes on the wire matter; the other fast-path tests (tests/test_websocket_fastpath.py) run once
with the pump and once without.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
import trio

from trioproxy.relay.pump import AVAILABLE, READ_SIZE, THREAD_NAME, TunnelPump
from trioproxy.relay.tunnel import FrameCursor, Tunnel

from .conftest import TOKEN, ProxyProcess, launch_trioproxy, start_proxy, wait_for
from .test_tunnel_frames import (
    Ends,
    client_frame,
    close_code,
    frames_in,
    open_tunnel,
    read_exactly,
    read_to_end,
    server_frame,
)
from .test_websocket import (
    RawServer,
    open_ws,
    read_request_head,
    start_echo_backend,
    start_raw_server,
    ws_echo_command,
)
from .test_websocket_fastpath import proxy_port, raw_handshake, switching_protocols

pytestmark = pytest.mark.skipif(
    not AVAILABLE, reason="the tunnel pump runs on CPython on Linux only; elsewhere tunnels run on the event loop"
)

MIB = 1024 * 1024


def binary_frame(payload: bytes) -> bytes:
    """A client's binary frame (masked; the key is fixed, the payload passes as it is)."""
    return bytes([0x82, 0x80 | 127]) + len(payload).to_bytes(8, "big") + b"\x01\x02\x03\x04" + payload


def pump_of(proxy: object) -> TunnelPump:
    pump = proxy.app.extensions["trioproxy"].tunnel_pump  # type: ignore[attr-defined]
    assert pump is not None
    return pump


def pump_loops_running() -> int:
    """Threads whose stack is inside the pump's loop now."""
    return sum(
        1
        for frame in sys._current_frames().values()
        if any(f.f_code.co_name == "_loop" and f.f_code.co_filename.endswith("pump.py") for f in _stack(frame))
    )


def _stack(frame):  # type: ignore[no-untyped-def]
    while frame is not None:
        yield frame
        frame = frame.f_back


async def test_a_tunnel_is_carried_by_the_thread_while_open(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    pump = pump_of(proxy)
    assert pump.running
    with trio.fail_after(10):
        await wait_for(lambda: pump_loops_running() == 1)  # the thread gets going soon after
        async with open_ws(proxy.url, f"proxy/{backend.port}/echo") as ws:
            for n in range(50):
                await ws.send_message(f"message {n}")
                assert await ws.get_message() == f"message {n}"
            assert pump.carried == 1
        await wait_for(lambda: pump.carried == 0)
        await wait_for(lambda: backend.closes)
    assert backend.closes == ["closed /echo 1000 None"]


async def test_a_stalled_backend_holds_the_client_back_without_memory_or_cpu(nursery: trio.Nursery) -> None:
    """32 MiB towards a backend that does not read for a while: the pump holds at most one
    read, does not spin while it waits, and every byte arrives in order once it reads."""
    reading = trio.Event()
    received = hashlib.sha256()
    counted: list[int] = [0]

    async def slow_reader(stream: trio.SocketStream, server: RawServer) -> None:
        head = await read_request_head(stream)
        await stream.send_all(switching_protocols(head))
        await reading.wait()
        while data := await stream.receive_some(MIB):
            received.update(data)
            counted[0] += len(data)

    server = await start_raw_server(nursery, slow_reader)
    proxy = await start_proxy(nursery)
    pump = pump_of(proxy)
    frames = b"".join(binary_frame(os.urandom(MIB)) for _ in range(32))
    with trio.fail_after(30):
        stream, head, _ = await raw_handshake(
            proxy_port(proxy.url), f"proxy/{server.port}/slow", f"Authorization: token {TOKEN}"
        )
        assert head.startswith(b"HTTP/1.1 101")
        rss_before = _rss()
        async with trio.open_nursery() as sending:
            sending.start_soon(stream.send_all, frames)
            await trio.sleep(0.5)  # buffers fill up
            ((tunnel, carriage),) = pump._carried.items()
            cpu_before = _cpu_seconds()
            await trio.sleep(1.0)
            stalled_cpu = _cpu_seconds() - cpu_before
            held = len(carriage.flows[0].unsent)  # client to backend
            grown = _rss() - rss_before
            reading.set()
        await wait_for(lambda: counted[0] == len(frames), timeout=20)
        await stream.aclose()
    assert held <= READ_SIZE
    assert grown < 16 * MIB, f"memory grew by {grown / MIB:.1f} MiB while 32 MiB waited"
    assert stalled_cpu < 0.3, f"{stalled_cpu:.2f} s of CPU in one second of waiting"
    assert received.digest() == hashlib.sha256(frames).digest()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def tunnel_pair(nursery: trio.Nursery, backend_port: int) -> tuple[trio.SocketStream, trio.SocketStream, trio.SocketStream]:
    """(client's end, the proxy's client-side end, the proxy's backend-side end) after an
    upgrade to the echo backend, as the fast path has them."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    accepted: list[trio.SocketStream] = []
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    accepted.append(await listeners[0].accept())
    await listeners[0].aclose()
    to_backend = await trio.open_tcp_stream("127.0.0.1", backend_port)
    key = base64.b64encode(os.urandom(16))
    await to_backend.send_all(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    assert (await read_request_head(to_backend)).startswith(b"HTTP/1.1 101")
    return client, accepted[0], to_backend


def text_frame(text: str) -> bytes:
    payload = text.encode()
    masked = bytes(b ^ b"\x01\x02\x03\x04"[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + b"\x01\x02\x03\x04" + masked


async def echo_round_trip(client: trio.SocketStream, text: str) -> bytes:
    await client.send_all(text_frame(text))
    answer = b""
    while len(answer) < 2 + len(text):
        answer += await client.receive_some(4096)
    return answer


async def test_a_cancelled_tunnel_is_handed_back_before_its_sockets_close(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    pump = TunnelPump()
    await nursery.start(pump.run)
    with trio.fail_after(10):
        for _ in range(3):  # each time the pump carries a fresh tunnel, then lets it go
            client, near, far = await tunnel_pair(nursery, backend.port)
            async with client, near, far:
                tunnel = Tunnel(near, far, max_message_size=MIB, pump=pump)
                scope, ended = trio.CancelScope(), trio.Event()
                nursery.start_soon(_run_within, tunnel, scope, ended)
                await wait_for(lambda: pump.carried == 1)
                assert await echo_round_trip(client, "hello") == b"\x81\x05hello"
                scope.cancel()
                await ended.wait()
                assert pump.carried == 0  # back before the sockets close (next line)
        assert pump.running and pump_loops_running() == 1


async def _run_within(tunnel: Tunnel, scope: trio.CancelScope, ended: trio.Event) -> None:
    with scope:
        await tunnel.run()
    ended.set()


class _FailsOnce(FrameCursor):
    __slots__ = ("failed",)

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.failed = False

    def advance(self, data: bytes, stop: bool = False) -> bytes:
        if not self.failed and threading.current_thread() is not threading.main_thread():
            self.failed = True
            raise RuntimeError("a fault on the pump's thread")
        return super().advance(data, stop)


async def test_an_unexpected_error_on_the_thread_ends_that_tunnel_only(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure of the thread's on one tunnel is logged and ends that tunnel's connections
    (where its frames stand is unknown: no guessing); the pump goes on carrying the others."""
    backend = await start_echo_backend(nursery)
    pump = TunnelPump()
    await nursery.start(pump.run)
    with trio.fail_after(10):
        client, near, far = await tunnel_pair(nursery, backend.port)
        async with client:
            tunnel = Tunnel(near, far, max_message_size=MIB, pump=pump)
            assert tunnel.client_to_backend.flow is not None
            tunnel.client_to_backend.flow.cursor = _FailsOnce(MIB)

            async def run_then_close() -> None:
                async with near, far:  # as the fast path does after a tunnel's end
                    await tunnel.run()

            with caplog.at_level(logging.ERROR, logger="trioproxy.pump"):
                nursery.start_soon(run_then_close)
                await wait_for(lambda: pump.carried == 1)
                await client.send_all(text_frame("fault"))
                assert await client.receive_some(4096) == b""  # ended, not left hanging
        assert tunnel.broken and pump.carried == 0
        assert "ending a tunnel after an unexpected error" in caplog.text
        await wait_for(lambda: backend.closes)  # the backend's connection ended too
        client, near, far = await tunnel_pair(nursery, backend.port)
        async with client, near, far:
            nursery.start_soon(Tunnel(near, far, max_message_size=MIB, pump=pump).run)
            await wait_for(lambda: pump.carried == 1)
            assert await echo_round_trip(client, "carried") == b"\x81\x07carried"


async def test_the_thread_ends_with_the_app_and_open_websockets_are_closed(nursery: trio.Nursery) -> None:
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    pump = pump_of(proxy)
    with trio.fail_after(10):
        stream, head, _ = await raw_handshake(
            proxy_port(proxy.url), f"proxy/{backend.port}/echo", f"Authorization: token {TOKEN}"
        )
        assert head.startswith(b"HTTP/1.1 101")
        await wait_for(lambda: pump.carried == 1)
        proxy.cancel_scope.cancel()
        assert await stream.receive_some(65536) == b""  # the connection ends
        await wait_for(lambda: not pump.running)
        await wait_for(lambda: pump_loops_running() == 0)
        await stream.aclose()


def thread_names(pid: int) -> list[str]:
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/task/{task}/comm") as comm:
                names.append(comm.read().strip())
    return names


@pytest.mark.parametrize("option, pumped", [([], True), (["--TrioProxy.websocket_pump=False"], False)])
async def test_the_command_copies_on_its_pump_thread_unless_told_not_to(
    nursery: trio.Nursery, proxy_processes: list[ProxyProcess], option: list[str], pumped: bool
) -> None:
    backend = await start_echo_backend(nursery)
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, *option])
    proxy_processes.append(proxy)
    with trio.fail_after(10):
        async with open_ws(proxy.base, f"proxy/{backend.port}/echo") as ws:
            await ws.send_message("through the command")
            assert await ws.get_message() == "through the command"
            assert (THREAD_NAME in thread_names(proxy.process.pid)) is pumped


@dataclass
class _RoundTrips:
    """What a blocking client on its own thread saw: when it sent each echo and got it back."""

    ready: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    sends: list[float] = field(default_factory=list)
    trips: list[tuple[float, float]] = field(default_factory=list)

    def run(self, port: int, path: str) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                f"Authorization: token {TOKEN}\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 101"), head
            self.ready.set()
            self.go.wait(30)
            while not self.stop.is_set():
                sent = time.monotonic()
                self.sends.append(sent)
                sock.sendall(text_frame("hello"))
                answer = b""
                while len(answer) < 7:
                    chunk = sock.recv(4096)
                    assert chunk, "the connection ended"
                    answer += chunk
                self.trips.append((sent, time.monotonic()))


@pytest.mark.parametrize("pump", [True, False], ids=["pump-thread", "event-loop"])
async def test_the_pump_keeps_websockets_moving_while_the_event_loop_is_busy(nursery: trio.Nursery, pump: bool) -> None:
    """A CPU-bound moment on the event loop (a slow callable, a big JSON document) stops what
    the loop relays; tunnels carried by the pump go on.

    Only round trips wholly inside the busy window count, as the event loop itself measures
    it; it stays busy until what it waits for happened (ten round trips through the pump, or
    one echo sent without an answer on the event loop), however slow the machine.
    """
    proxy = await start_proxy(nursery, {"ws": {"command": ws_echo_command("{port}"), "timeout": 20}}, websocket_pump=pump)
    client = _RoundTrips()
    thread = threading.Thread(target=client.run, args=(proxy_port(proxy.url), "ws/echo"))
    thread.start()
    try:
        assert await trio.to_thread.run_sync(client.ready.wait, 20)
        client.go.set()
        busy_from = time.monotonic()
        give_up = busy_from + 20
        while time.monotonic() < give_up:  # the event loop is busy: nothing else runs on it
            if pump and sum(1 for sent, _ in client.trips[-10:] if sent >= busy_from) >= 10:
                break
            if not pump and any(sent >= busy_from for sent in client.sends[-1:]) and time.monotonic() > busy_from + 0.5:
                break
        busy_until = time.monotonic()
    finally:
        client.stop.set()
        await trio.to_thread.run_sync(thread.join, 30)
    inside = [(sent, back) for sent, back in client.trips if sent >= busy_from and back <= busy_until]
    if pump:
        assert len(inside) >= 10, f"{len(inside)} round trips in {busy_until - busy_from:.1f} s"
    else:
        assert any(busy_from <= sent < busy_until for sent in client.sends), "the client sent nothing meanwhile"
        assert inside == [], f"{len(inside)} round trips while the event loop was busy"


# -- the thread's death ---------------------------------------------------------------------------


class _Fault:
    """The pump's fault seam: once armed, raises at ``point`` on the thread."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.armed = threading.Event()
        self.raised = 0

    def __call__(self, point: str) -> None:
        if point == self.point and self.armed.is_set():
            self.raised += 1
            raise RuntimeError(f"injected: the pump's thread fails at {point!r}")


async def _dying_pump(nursery: trio.Nursery, point: str) -> tuple[TunnelPump, _Fault]:
    pump = TunnelPump()
    fault = _Fault(point)
    pump.fault = fault
    await nursery.start(pump.run)
    return pump, fault


async def _exchange(ends: Ends, text: str) -> None:
    """One frame each way, checked byte for byte at the other end."""
    up, down = client_frame(0x1, text.encode()), server_frame(0x1, text.encode())
    await ends.client.send_all(up)
    assert await read_exactly(ends.backend, len(up)) == up
    await ends.backend.send_all(down)
    assert await read_exactly(ends.client, len(down)) == down


def _closed_with(data: bytes, code: int) -> None:
    ((opcode, payload),) = frames_in(data)
    assert opcode == 0x8 and close_code(payload) == code, (opcode, payload)


async def _the_pump_steps_aside(nursery: trio.Nursery, pump: TunnelPump) -> None:
    """After its thread died, tunnels run on the event loop."""
    assert not pump.running and pump_loops_running() == 0
    async with await open_tunnel(nursery, pump) as ends:
        await _exchange(ends, "on the event loop now")
        assert pump.carried == 0


async def test_a_thread_that_dies_ends_every_tunnel_it_carried_with_1011(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Death outside any tunnel's bytes: each tunnel's state is whole, each end at rest gets
    1011 and its connection ends; nothing more is copied; the pump steps aside, logged."""
    pump, fault = await _dying_pump(nursery, "turn")
    with trio.fail_after(20), caplog.at_level(logging.ERROR, logger="trioproxy.pump"):
        tunnels = [await open_tunnel(nursery, pump) for _ in range(3)]
        for number, ends in enumerate(tunnels):
            await _exchange(ends, f"tunnel {number}")
        assert pump.carried == 3
        fault.armed.set()
        pump.release(tunnels[0].tunnel)  # wakes the thread, which fails before it looks
        for ends in tunnels:
            async with ends:
                _closed_with(await read_to_end(ends.client), 1011)
                _closed_with(await read_to_end(ends.backend), 1011)
                await ends.ended.wait()
                assert ends.tunnel.broken
        await _the_pump_steps_aside(nursery, pump)
    assert fault.raised == 1
    assert "the WebSocket tunnel pump failed" in caplog.text
    assert "RuntimeError: injected: the pump's thread fails at 'turn'" in caplog.text  # with its traceback
    assert "ended while carrying 3 tunnel(s)" in caplog.text


async def test_a_dead_threads_partial_write_is_never_resumed(nursery: trio.Nursery) -> None:
    """The thread dies while a backend that stopped reading holds part of a write: the bytes
    it got are exactly a prefix of what the client sent (none again), then its connection ends
    without a frame of ours in the middle of one; the client, at rest, gets 1011."""
    pump, fault = await _dying_pump(nursery, "turn")
    message = binary_frame(os.urandom(32 * MIB))  # more than loopback buffers hold
    with trio.fail_after(30):
        async with await open_tunnel(nursery, pump, limit=64 * MIB) as ends:
            await _exchange(ends, "before")
            nursery.start_soon(_send_quietly, ends.client, message)
            carriage = pump._carried[ends.tunnel]
            await wait_for(lambda: 0 < carriage.flows[0].written < len(carriage.flows[0].unsent))
            fault.armed.set()
            pump.release(ends.tunnel)
            received = await read_to_end(ends.backend, within=20)
            _closed_with(await read_to_end(ends.client), 1011)
            await ends.ended.wait()
    assert 0 < len(received) < len(message)
    assert received == message[: len(received)], "bytes were sent twice or out of place"
    await _the_pump_steps_aside(nursery, pump)


async def _send_quietly(stream: trio.SocketStream, data: bytes) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)


async def test_a_thread_that_dies_inside_a_tunnels_bytes_just_closes_that_one(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """It fails handing a tunnel back, and again handling that failure: where that tunnel's
    frames stand is unknown, so its connections just close; the others get 1011."""
    pump, fault = await _dying_pump(nursery, "hand back")
    with trio.fail_after(20), caplog.at_level(logging.ERROR, logger="trioproxy.pump"):
        failing, other = await open_tunnel(nursery, pump), await open_tunnel(nursery, pump)
        await _exchange(failing, "one")
        await _exchange(other, "two")
        fault.armed.set()
        await failing.client.send_eof()  # the thread reads the end and hands the tunnel back
        async with failing, other:
            assert await read_to_end(failing.backend) == b""
            assert await read_to_end(failing.client) == b""
            _closed_with(await read_to_end(other.client), 1011)
            _closed_with(await read_to_end(other.backend), 1011)
            await failing.ended.wait()
            await other.ended.wait()
        await _the_pump_steps_aside(nursery, pump)
    assert fault.raised == 2
    assert "ending a tunnel after an unexpected error" in caplog.text
    assert "the WebSocket tunnel pump failed" in caplog.text


async def test_a_stopping_thread_hands_its_tunnels_back_whole(nursery: trio.Nursery) -> None:
    """The pump stops (its service is cancelled) while a write is half done: the tunnel goes
    on on the event loop from where the thread was, and every byte arrives once, in order."""
    pump = TunnelPump()
    scope = trio.CancelScope()

    async def run_pump(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await pump.run(task_status=task_status)

    await nursery.start(run_pump)
    message = binary_frame(os.urandom(32 * MIB))  # more than loopback buffers hold
    with trio.fail_after(30):
        async with await open_tunnel(nursery, pump, limit=64 * MIB) as ends:
            nursery.start_soon(_send_quietly, ends.client, message)
            carriage = pump._carried[ends.tunnel]
            flow = carriage.flows[0]
            # The thread holds bytes the backend has not taken (the backend reads nothing yet):
            # mostly a write half done, sometimes a read whose write has not begun, depending
            # on where the socket buffers filled up; either way they must arrive once, in order.
            await wait_for(lambda: len(flow.unsent) > flow.written)
            await trio.sleep(0.2)  # let the buffers fill: the thread is stalled mid-message
            scope.cancel()
            await wait_for(lambda: pump.carried == 0)
            assert await read_exactly(ends.backend, len(message), within=20) == message
            await _exchange(ends, "after")
    assert not ends.tunnel.broken


# -- SIGPIPE --------------------------------------------------------------------------------------

_SEND_TO_A_VANISHED_PEER = """
import ctypes, errno, os, signal, socket, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a program embedding trioproxy might have it
from trioproxy.relay import pump
mine, peer = socket.socketpair()
peer.close()
data = b"x" * 4096
if sys.argv[1] == "pump":
    sent = pump._libc_send(mine.fileno(), data, len(data), pump._NO_SIGNAL)
    assert sent == -1 and ctypes.get_errno() == errno.EPIPE, (sent, ctypes.get_errno())
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    sent = pump._libc_send_at(mine.fileno(), address + 10, len(data) - 10, pump._NO_SIGNAL)
    assert sent == -1 and ctypes.get_errno() == errno.EPIPE, (sent, ctypes.get_errno())
else:
    os.write(mine.fileno(), data)  # write(2), as the pump once did
print("alive")
"""


@pytest.mark.parametrize("how, survives", [("pump", True), ("write", False)])
def test_the_pumps_sends_to_a_vanished_peer_fail_with_epipe_not_sigpipe(how: str, survives: bool) -> None:
    """With SIGPIPE at its default (the process would die of it), the pump's two sends fail
    with EPIPE; write(2), as a control, kills the process."""
    done = subprocess.run([sys.executable, "-c", _SEND_TO_A_VANISHED_PEER, how], capture_output=True, text=True, timeout=60)
    if survives:
        assert (done.returncode, done.stdout) == (0, "alive\n"), done.stderr
    else:
        assert done.returncode == -signal.SIGPIPE


def _ignored_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                return int(line.split()[1], 16)
    raise AssertionError("no SigIgn line")


async def _reset(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@pytest.mark.parametrize("vanishing", ["backend", "client"])
async def test_a_peer_that_vanishes_mid_write_leaves_the_command_alive(
    nursery: trio.Nursery, proxy_processes: list[ProxyProcess], vanishing: str
) -> None:
    """The ``trioproxy`` command keeps SIGPIPE ignored (as Python sets it), and a backend or a
    client that resets while 32 MiB are being written to it ends that WebSocket only."""

    async def backend_side(stream: trio.SocketStream, server: RawServer) -> None:
        head = await read_request_head(stream)
        await stream.send_all(switching_protocols(head))
        if vanishing == "backend":
            await stream.receive_some(65536)  # the flood has begun
            await _reset(stream)
        else:
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(32):
                    await stream.send_all(bytes([0x82, 127]) + MIB.to_bytes(8, "big") + os.urandom(MIB))

    server = await start_raw_server(nursery, backend_side)
    echo = await start_echo_backend(nursery)
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN])
    proxy_processes.append(proxy)
    assert _ignored_signals(proxy.process.pid) & 1 << (signal.SIGPIPE - 1)
    with trio.fail_after(30):
        for _ in range(3):
            stream, head, _ = await raw_handshake(
                proxy_port(proxy.base), f"proxy/{server.port}/flood", f"Authorization: token {TOKEN}"
            )
            async with stream:
                assert head.startswith(b"HTTP/1.1 101")
                if vanishing == "backend":
                    await _send_quietly(stream, binary_frame(os.urandom(32 * MIB)))
                    await read_to_end(stream)
                else:
                    await stream.receive_some(65536)
                    await _reset(stream)
        assert proxy.process.poll() is None
        async with open_ws(proxy.base, f"proxy/{echo.port}/echo") as ws:
            await ws.send_message("still here")
            assert await ws.get_message() == "still here"
