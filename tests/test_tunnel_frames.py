"""Malformed WebSocket frames through the tunnel (trioproxy.relay.tunnel), on the pump and on
the event loop; and the upgrade request it cannot build.

The tunnel reads frame headers only. What no endpoint may send whatever the two ends
negotiated (a 64-bit length with its top bit set, a control frame over 125 bytes or
fragmented) ends the tunnel at the boundary before it, with 1002 to the end that sent it and a
close to the other; what only the ends can judge (reserved opcodes and RSV bits, which an
extension may define; a client frame without a mask; a continuation out of place) passes end to
end, byte for byte, and the frames after it stay in step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

import pytest
import trio

from trioproxy.relay.pump import AVAILABLE, TunnelPump
from trioproxy.relay.tunnel import BackendFailed, Tunnel, open_backend

from .conftest import wait_for

MIB = 1024 * 1024
KEY = b"\x01\x02\x03\x04"


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool, rsv: int = 0, length: int | None = None) -> bytes:
    """A frame on the wire; ``length`` overrides the length field (the payload stays as given)."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = bytes([first, mask_bit | size])
    elif size < 1 << 16:
        head = bytes([first, mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([first, mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + KEY + bytes(byte ^ KEY[index % 4] for index, byte in enumerate(payload))


def client_frame(opcode: int, payload: bytes, **options: object) -> bytes:
    return frame(opcode, payload, masked=True, **options)  # type: ignore[arg-type]


def server_frame(opcode: int, payload: bytes, **options: object) -> bytes:
    return frame(opcode, payload, masked=False, **options)  # type: ignore[arg-type]


def frames_in(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of each frame in ``data``, which must end at a boundary."""
    frames = []
    at = 0
    while at < len(data):
        opcode, second = data[at] & 0x0F, data[at + 1]
        size, at = second & 0x7F, at + 2
        if size == 126:
            size, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif size == 127:
            size, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        key = b"\0\0\0\0"
        if second & 0x80:
            key, at = data[at : at + 4], at + 4
        payload = bytes(byte ^ key[index % 4] for index, byte in enumerate(data[at : at + size]))
        assert len(payload) == size, "the bytes end inside a frame"
        frames.append((opcode, payload))
        at += size
    return frames


async def read_until_close(stream: trio.SocketStream, within: float = 10) -> list[tuple[int, bytes]]:
    """The frames up to and including a close frame, then close the connection, as an end does."""
    data = b""
    with trio.fail_after(within):
        while True:
            try:
                frames = frames_in(data)
            except (AssertionError, IndexError):
                frames = []  # the bytes end inside a frame
            if frames and frames[-1][0] == 0x8:
                await stream.aclose()
                return frames
            chunk = await stream.receive_some(MIB)
            assert chunk, f"the connection ended without a close frame after {data!r}"
            data += chunk


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big")


async def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    one = await trio.open_tcp_stream("127.0.0.1", port)
    other = await listener.accept()
    await listener.aclose()
    return one, other


async def read_to_end(stream: trio.SocketStream, within: float = 10) -> bytes:
    """Everything until the other side closes (or resets: what came before still counts)."""
    data = b""
    with trio.fail_after(within):
        while True:
            try:
                chunk = await stream.receive_some(MIB)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


async def read_exactly(stream: trio.SocketStream, size: int, within: float = 10) -> bytes:
    data = b""
    with trio.fail_after(within):
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            assert chunk, f"the connection ended after {len(data)} of {size} bytes"
            data += chunk
    return data


class Ends:
    """A tunnel between a client and a backend whose sockets the test holds."""

    def __init__(self, client: trio.SocketStream, backend: trio.SocketStream, tunnel: Tunnel) -> None:
        self.client = client
        self.backend = backend
        self.tunnel = tunnel
        self.ended = trio.Event()

    async def __aenter__(self) -> Ends:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.aclose()
        await self.backend.aclose()


async def open_tunnel(nursery: trio.Nursery, pump: TunnelPump | None, limit: int = MIB) -> Ends:
    """Start a tunnel as the fast path runs one: both of its connections close when it ends."""
    client, near = await socket_pair()
    far, backend = await socket_pair()
    tunnel = Tunnel(near, far, max_message_size=limit, pump=pump, close_timeout=2)
    ends = Ends(client, backend, tunnel)

    async def run() -> None:
        async with near, far:
            await tunnel.run()
        ends.ended.set()

    nursery.start_soon(run)
    if pump is not None and pump.running:  # carried soon
        await wait_for(lambda: pump.carried > 0)
    return ends


@pytest.fixture(params=["pump-thread", "event-loop"])
async def pump(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[TunnelPump | None]:
    if request.param == "event-loop":
        yield None
        return
    if not AVAILABLE:
        pytest.skip("the tunnel pump runs on CPython on Linux only")
    tunnel_pump = TunnelPump()
    await nursery.start(tunnel_pump.run)
    yield tunnel_pump


# -- frames that pass end to end -------------------------------------------------------------------

PASSING = {
    "reserved data opcode": client_frame(0x3, b"abc"),
    "reserved control opcode": client_frame(0xB, b"abc"),
    "RSV bits set": client_frame(0x1, b"compressed?", rsv=0b111),
    "unmasked client frame": server_frame(0x2, b"no mask"),
    "continuation out of place": client_frame(0x0, b"orphan"),
    "non-minimal length": client_frame(0x2, b"x" * 5, length=None)[:1] + b"\xfe\x00\x05" + KEY + b"x" * 5,
    "empty frames": client_frame(0x2, b"") + client_frame(0x9, b""),
}


@pytest.mark.parametrize("case", list(PASSING))
async def test_frames_only_the_ends_can_judge_pass_byte_for_byte(
    nursery: trio.Nursery, pump: TunnelPump | None, case: str
) -> None:
    async with await open_tunnel(nursery, pump) as ends:
        await _passes(ends, pump, case)


async def _passes(ends: Ends, pump: TunnelPump | None, case: str) -> None:
    after = client_frame(0x1, b"the next frame")
    odd = PASSING[case]
    with trio.fail_after(10):
        await ends.client.send_all(odd + after)
        assert await read_exactly(ends.backend, len(odd + after)) == odd + after
        # And the other way, as a backend would send it.
        back = odd if case == "unmasked client frame" else server_frame(0x3, b"reserved") + server_frame(0x2, b"ok")
        await ends.backend.send_all(back)
        assert await read_exactly(ends.client, len(back)) == back
        if pump is not None:
            assert pump.carried == 1  # nothing made the pump let it go
        # The closing handshake; then the backend, a server, closes the connection first.
        await ends.client.send_all(client_frame(0x8, (1000).to_bytes(2, "big")))
        close = await read_exactly(ends.backend, 8)
        assert frames_in(close) == [(0x8, (1000).to_bytes(2, "big"))]
        await ends.backend.send_all(server_frame(0x8, (1000).to_bytes(2, "big")))
        await ends.backend.aclose()
        assert frames_in(await read_to_end(ends.client)) == [(0x8, (1000).to_bytes(2, "big"))]
        await ends.ended.wait()


# -- frames no endpoint may send --------------------------------------------------------------------

INVALID = {
    "2^63 length": (lambda frame_of: frame_of(0x2, b"", length=1 << 63), "a frame length with its most significant bit set"),
    "2^64-1 length": (lambda frame_of: frame_of(0x2, b"", length=(1 << 64) - 1), "a frame length with its most significant bit set"),
    "control over 125 bytes": (lambda frame_of: frame_of(0x9, b"p" * 126), "a control frame over 125 bytes"),
    "close over 125 bytes": (lambda frame_of: frame_of(0x8, b"\x03\xe8" + b"r" * 200), "a control frame over 125 bytes"),
    "fragmented control frame": (lambda frame_of: frame_of(0xA, b"pong", fin=False), "a fragmented control frame"),
}


@pytest.mark.parametrize("sender", ["client", "backend"])
@pytest.mark.parametrize("case", list(INVALID))
async def test_a_frame_no_endpoint_may_send_ends_the_tunnel_with_1002(
    nursery: trio.Nursery, pump: TunnelPump | None, case: str, sender: str
) -> None:
    """The frames before it pass; nothing of it does; the client gets 1002, the backend a
    close saying who sent what (1002 if it did, 1001 if the client did); both connections end."""
    async with await open_tunnel(nursery, pump) as ends:
        await _refused(ends, case, sender)


async def _refused(ends: Ends, case: str, sender: str) -> None:
    make, problem = INVALID[case]
    from_client = sender == "client"
    frame_of = client_frame if from_client else server_frame
    before = frame_of(0x1, b"before") + frame_of(0x2, b"\0" * 70000, fin=False) + frame_of(0x0, b"end")
    bad = make(frame_of) + os.urandom(300)  # what follows is never read as frames
    source, sink = (ends.client, ends.backend) if from_client else (ends.backend, ends.client)
    with trio.fail_after(10):
        await source.send_all(before + bad)
        assert await read_exactly(sink, len(before)) == before
        to_sink = await read_until_close(sink)
        to_source = await read_until_close(source)
        await ends.ended.wait()
    ((sink_opcode, sink_close),) = to_sink
    ((source_opcode, source_close),) = to_source
    assert sink_opcode == source_opcode == 0x8
    to_client, to_backend = (source_close, sink_close) if from_client else (sink_close, source_close)
    assert close_code(to_client) == 1002 and to_client[2:].decode() == f"invalid frame: {problem}"
    if from_client:  # the backend did nothing wrong: the client is going away
        assert close_code(to_backend) == 1001 and to_backend[2:].decode() == f"the client sent {problem}"
    else:
        assert close_code(to_backend) == 1002 and to_backend[2:].decode() == f"the backend sent {problem}"


async def test_a_2_63_length_split_across_reads_is_refused_too(nursery: trio.Nursery, pump: TunnelPump | None) -> None:
    bad = client_frame(0x2, b"", length=1 << 63)
    with trio.fail_after(10):
        ends = await open_tunnel(nursery, pump)
        for byte in bad:  # the length arrives a byte at a time
            await ends.client.send_all(bytes([byte]))
            await trio.sleep(0.005)
        (close,) = await read_until_close(ends.client)
        await read_until_close(ends.backend)
        await ends.ended.wait()
        await ends.__aexit__()
    assert close[0] == 0x8 and close_code(close[1]) == 1002


# -- the upgrade request --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "headers, named",
    [
        ([(b"x bad", b"v")], "Illegal header name"),
        ([(b"x-nul", b"a\0b")], "Illegal header value"),
        ([(b"x-vt", b"a\x0bb")], "Illegal header value"),
        ([(b"x-\xe9", b"v")], "Illegal header name"),
        ([(b"x-text", "caf\u00e9")], "ascii"),  # a value produced as text
    ],
)
async def test_a_request_h11_refuses_is_a_500_naming_the_problem(headers: list, named: str) -> None:
    backend, accepted = await socket_pair()
    async with backend, accepted:
        with pytest.raises(BackendFailed) as failed:
            await open_backend(backend, b"/ws", [(b"host", b"x"), *headers])
        assert failed.value.status == 500
        assert failed.value.message.startswith("cannot build the WebSocket request to the backend: ")
        assert named in failed.value.message
        await backend.aclose()
        assert await read_to_end(accepted) == b""  # nothing was sent


async def test_an_activity_callback_that_fails_is_logged_and_the_tunnel_goes_on(
    nursery: trio.Nursery, pump: TunnelPump | None, caplog: pytest.LogCaptureFixture
) -> None:
    """On the pump it is called through the trio token, where an exception would end the run."""
    calls = []

    def failing() -> None:
        calls.append(1)
        raise RuntimeError("the activity callback fails")

    client, near = await socket_pair()
    far, backend = await socket_pair()
    tunnel = Tunnel(near, far, max_message_size=MIB, pump=pump, on_activity=failing)
    ends = Ends(client, backend, tunnel)
    async with near, far, ends:
        nursery.start_soon(tunnel.run)
        with trio.fail_after(10), caplog.at_level(logging.ERROR, logger="trioproxy.tunnel"):
            for number in range(3):
                sent = client_frame(0x1, f"message {number}".encode())
                await ends.client.send_all(sent)
                assert await read_exactly(ends.backend, len(sent)) == sent
            await wait_for(lambda: calls)
            if pump is not None:
                tunnel.shut_down()  # a hand-back reports activity too
                await read_until_close(ends.client)
    assert "counting activity failed" in caplog.text
