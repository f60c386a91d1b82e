"""The WebSocket tunnel: a client's WebSocket passed to a backend as bytes, not as messages.

Once a backend has answered ``101``, a WebSocket is two byte streams that already suit their
readers: the client masks its frames as a server expects, the backend leaves its own unmasked
as a client expects, and whatever extensions (``permessage-deflate``) the two ends agreed on
apply end to end. So the tunnel copies bytes, one task per direction, each waiting for its
``send_all`` before reading more (backpressure), and close codes, pings and compressed frames
pass unchanged by construction (RFC 6455 §5).

It still reads every frame *header* (:class:`FrameCursor`, a few bytes per frame), for three
things a byte copy cannot do: know where a frame ends, so that a close frame of its own can be
put between two frames (a client that vanished, a backend that died, a shutdown, a message
over the size limit); know that a close frame went by, so that the end of a stream after it
is a clean end; and count a message's size on the wire. With keepalive on it also puts
pings of its own to the client between messages and drops the client's pongs to them
(:mod:`trioproxy.relay.keepalive`).

:func:`open_backend` sends the upgrade request and reads the backend's answer; :class:`Tunnel`
copies. Both are used by :mod:`trioproxy.fastpath`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
import trio

from ..backend_tls import broken_by_tls, refused_after_handshake
from .headers import Headers, canonical_name
from .keepalive import BACKEND_REASON, CLIENT_REASON, Action, Keepalive

if TYPE_CHECKING:
    from .pump import TunnelPump

log = logging.getLogger("trioproxy.tunnel")

# Large reads: a 1 MiB message crosses in a few reads, and one read costs the same whatever
# its size (measured in benchmarks/README.md).
READ_SIZE = 256 * 1024
MAX_ANSWER_HEAD = 64 * 1024  # the backend's handshake answer, as Hypercorn bounds requests
MAX_REFUSAL_BODY = 1024 * 1024  # a refusal's body is an error page: read this much at most

OP_CONTINUATION = 0x0
OP_CLOSE = 0x8
OP_PONG = 0xA
MAX_CONTROL_PAYLOAD = 125  # RFC 6455 §5.5

# RFC 6455 §7.4.1 codes the tunnel sends itself.
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011

Stream = trio.abc.Stream


class BackendFailed(Exception):
    """The backend could not be reached or did not answer the upgrade as HTTP.

    ``status`` is what the client gets instead (502, or 504 for a timeout).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Switched:
    """The backend accepted: its answer's head as it sent it, and the bytes that followed."""

    head: bytes
    trailing: bytes


@dataclass
class Refusal:
    """The backend answered the upgrade with an ordinary HTTP response."""

    status: int
    reason: bytes
    headers: Headers
    body: bytes


async def open_backend(stream: Stream, target: bytes, headers: Headers) -> Switched | Refusal:
    """Send the upgrade request on ``stream``; the backend's answer.

    ``headers`` are those to forward; the handshake's own (Sec-WebSocket-Key, -Version,
    -Protocol, -Extensions) are the client's, passed as they are, so that the two ends
    negotiate with each other. Raises :class:`BackendFailed`; the caller bounds the time.
    """
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_HEAD)
    try:
        request = h11.Request(  # h11 writes names as given: canonical, as for HTTP requests
            method="GET",
            target=target,
            headers=[*((canonical_name(n), v) for n, v in headers), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
        )
        head = (connection.send(request) or b"") + (connection.send(h11.EndOfMessage()) or b"")
    except (h11.LocalProtocolError, ValueError, TypeError) as exc:
        # A header h11 refuses (a space or NUL in a name, a control byte in a value, ...):
        # the request cannot be sent as configured.
        raise BackendFailed(500, f"cannot build the WebSocket request to the backend: {exc}") from None
    received = bytearray()
    try:
        await stream.send_all(head)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(READ_SIZE)
                if not data and not received:
                    tls = refused_after_handshake(stream)
                    raise BackendFailed(502, "the backend closed the connection during the WebSocket handshake" + tls)
                received += data
                connection.receive_data(bytes(data))
            elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                trailing = connection.trailing_data[0]
                return Switched(bytes(received[: len(received) - len(trailing)]), trailing)
            elif isinstance(event, h11.Response):
                return await _refusal(stream, connection, event)
            elif isinstance(event, h11.ConnectionClosed):
                raise BackendFailed(502, "the backend closed the connection during the WebSocket handshake")
            # any other 1xx: wait for the final answer
    except h11.RemoteProtocolError:
        if not received:
            raise BackendFailed(502, "the backend closed the connection during the WebSocket handshake") from None
        raise BackendFailed(502, "the backend's answer to the WebSocket upgrade is not a valid handshake") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        alert = broken_by_tls(exc)
        tls = f" ({alert})" if alert else refused_after_handshake(stream) if not received else ""
        raise BackendFailed(502, "the backend closed the connection during the WebSocket handshake" + tls) from None


async def _refusal(stream: Stream, connection: h11.Connection, response: h11.Response) -> Refusal:
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(bytes(await stream.receive_some(READ_SIZE)))
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REFUSAL_BODY:
                raise BackendFailed(502, "the backend refused the WebSocket upgrade with an oversized answer")
        else:  # EndOfMessage, or the connection closed after a close-delimited body
            break
    headers = [(name, value) for name, value in response.headers.raw_items()]
    return Refusal(response.status_code, bytes(response.reason), headers, bytes(body))


class FrameCursor:
    """Where frame boundaries fall in one direction's bytes (RFC 6455 §5.2); headers only.

    :meth:`advance` takes what was read and returns what may be passed on: all of it, except
    a frame header split across reads (held back until complete, so that a frame of the
    tunnel's own can still go before it) and what follows a boundary where it must stop.

    It stops for good before a frame that takes its message over the limit (``too_big``) and
    before one that no endpoint may send whatever was negotiated (``invalid``, RFC 6455
    §5.2, §5.5: a 64-bit length with its top bit set, a control frame over 125 bytes or
    fragmented). Everything else passes as it is, including what only the ends can judge:
    reserved opcodes and RSV bits (an extension may define them), a client's frame unmasked,
    a continuation out of place; the receiving end fails such a connection itself, and the
    framing, which does not depend on them, stays in step.
    """

    __slots__ = (
        "remaining", "partial", "message_size", "in_message", "limit", "close_passed", "too_big", "invalid",
        "keepalive",
    )  # fmt: skip

    def __init__(self, limit: int) -> None:
        self.remaining = 0  # payload bytes of the current frame not yet seen
        self.partial = b""  # the start of a frame header (or one of our pongs), held back
        self.message_size = 0  # wire bytes of the fragmented data message under way
        self.in_message = False  # between the fragments of a data message
        self.limit = limit
        self.close_passed = False
        self.too_big = False  # the next frame would take its message over the limit
        self.invalid: str | None = None  # why the next frame cannot be passed on
        # Client to backend with keepalive on: its pongs are recognised and dropped.
        self.keepalive: Keepalive | None = None

    @property
    def at_boundary(self) -> bool:
        return self.remaining == 0

    def advance(self, data: bytes, stop: bool = False) -> bytes:
        """What of ``data`` to pass on; with ``stop``, up to the first frame boundary only."""
        if self.too_big or self.invalid is not None:
            return b""  # stopped for good before a frame it will not pass
        if self.partial:
            data = self.partial + data
            self.partial = b""
        size = len(data)
        position = 0
        remaining = self.remaining
        while True:
            if remaining:
                if size - position <= remaining:
                    self.remaining = remaining - (size - position)
                    return data
                position += remaining
                remaining = 0
            self.remaining = 0
            if position == size:
                return data
            if stop:
                return data[:position]
            header = _frame_header(data, position)
            if header is None:
                self.partial = data[position:]
                return data[:position]
            header_size, payload_size, opcode, final = header
            if payload_size >> 63:
                self.invalid = "a frame length with its most significant bit set"
                return data[:position]
            if opcode >= OP_CLOSE:  # a control frame, maybe between a message's fragments
                if payload_size > MAX_CONTROL_PAYLOAD or not final:
                    self.invalid = "a fragmented control frame" if not final else "a control frame over 125 bytes"
                    return data[:position]
                if opcode == OP_CLOSE:
                    self.close_passed = True
                elif opcode == OP_PONG and self.keepalive is not None and payload_size == len(self.keepalive.payload):
                    end = position + header_size + payload_size
                    if end > size:  # held back whole: it may be ours, which never passes
                        self.partial = data[position:]
                        return data[:position]
                    if self.keepalive.is_ours(data[position:end], header_size):
                        self.keepalive.answered()
                        data = data[:position] + data[end:]
                        size = len(data)
                        continue
            else:
                total = payload_size + (self.message_size if opcode == OP_CONTINUATION else 0)
                if total > self.limit:
                    self.too_big = True
                    return data[:position]
                self.message_size = 0 if final else total
                self.in_message = not final
            position += header_size
            remaining = payload_size


class Step(enum.Enum):
    """What a copier does after a read has gone through the cursor (:meth:`Flow.pass_on`)."""

    COPY = "copy"  # write what passed, read on
    STOP = "stop"  # at a boundary where a close of the tunnel's own is due: nothing more passes
    TOO_BIG = "too big"  # the next frame takes its message over the limit: close with 1009
    INVALID = "invalid"  # the next frame is one no endpoint may send: close with 1002


class Flow:
    """One direction's bytes in transit: its cursor, what passed it not yet written, whether a
    close frame went by.

    Owned by one copier at a time (the direction's task, or the pump's thread while it carries
    the tunnel) and handed between them whole: ``written`` (how much of ``unsent`` the sink has
    taken) travels with the bytes, so neither copier writes a byte twice. ``keepalive`` (backend
    to client, keepalive on) travels the same way: the client's cursor refers to it too.
    """

    __slots__ = ("cursor", "unsent", "written", "closed", "keepalive")

    def __init__(self, limit: int) -> None:
        self.cursor = FrameCursor(limit)
        self.unsent = b""
        self.written = 0
        self.closed = False  # a close frame was passed on (or one of ours sent)
        self.keepalive: Keepalive | None = None

    @property
    def may_ping(self) -> bool:
        """Whether a ping of ours may go to the sink now: nothing unsent, between messages."""
        return self.cursor.at_boundary and not self.cursor.in_message and not self.pending

    @property
    def pending(self) -> bool:
        return self.written < len(self.unsent)

    @property
    def at_rest(self) -> bool:
        """Whether the sink has all that passed and stands at a frame boundary."""
        return self.cursor.at_boundary and not self.pending

    def pass_on(self, data: bytes, stopping: bool = False) -> Step:
        """Take ``data`` read from the source (all earlier bytes written) and decide what next.

        The one step both copiers take after every read; ``stopping``: a close of the
        tunnel's own waits for the next boundary.
        """
        self.unsent = self.cursor.advance(data, stopping)
        self.written = 0
        return self.next_step(stopping)

    def next_step(self, stopping: bool = False) -> Step:
        cursor = self.cursor
        if cursor.close_passed:
            self.closed = True
        if cursor.too_big:
            return Step.TOO_BIG
        if cursor.invalid is not None:
            return Step.INVALID
        if stopping and cursor.at_boundary and not self.closed:
            return Step.STOP
        return Step.COPY


@dataclass(frozen=True)
class Handback:
    """What the pump returns when it lets a tunnel go.

    ``flows`` (client to backend, backend to client) whole, or None where the thread failed in
    the middle of the tunnel's bytes and where its frames stand is unknown; ``failed``: the pump
    failed (the tunnel only ends: 1011 to an end at rest, the others just closed).
    """

    flows: tuple[Flow, Flow] | None
    failed: bool


def _frame_header(data: bytes, at: int) -> tuple[int, int, int, bool] | None:
    """(header size, payload size, opcode, FIN) of the frame starting at ``at``, if complete."""
    available = len(data) - at
    if available < 2:
        return None
    first, second = data[at], data[at + 1]
    size = second & 0x7F
    header_size = 2
    if size == 126:
        header_size = 4
        if available < 4:
            return None
        size = int.from_bytes(data[at + 2 : at + 4], "big")
    elif size == 127:
        header_size = 10
        if available < 10:
            return None
        size = int.from_bytes(data[at + 2 : at + 10], "big")
    if second & 0x80:
        header_size += 4  # the masking key: part of the header, held back with it
        if available < header_size:
            return None
    return header_size, size, first & 0x0F, bool(first & 0x80)


def close_frame(code: int, reason: str, masked: bool) -> bytes:
    """A close frame; clients must mask theirs (RFC 6455 §5.3), servers must not."""
    encoded = reason.encode("utf-8")[:123]  # control payloads are at most 125 bytes
    payload = code.to_bytes(2, "big") + encoded.decode("utf-8", "ignore").encode("utf-8")
    if not masked:
        return bytes([0x80 | OP_CLOSE, len(payload)]) + payload
    key = os.urandom(4)
    masked_payload = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return bytes([0x80 | OP_CLOSE, 0x80 | len(payload)]) + key + masked_payload


class _Direction:
    """One way through the tunnel: who reads, who writes, and the bytes in transit."""

    def __init__(self, source: Stream, sink: Stream, masked: bool, limit: int, gone: tuple[int, str]) -> None:
        self.source = source
        self.sink = sink
        self.masked = masked  # frames toward a backend are masked
        # None while the pump carries the tunnel: the thread owns it then.
        self.flow: Flow | None = Flow(limit)
        self.gone = gone  # the close to send the sink when the source ends without one
        self.stop_with: tuple[int, str] | None = None  # a close of our own to send at a boundary
        self.ping_wanted = False  # a keepalive ping to send the sink at the next message boundary
        self.ended = False
        self.receiving: trio.CancelScope | None = None

    def request_ping(self) -> None:
        self.ping_wanted = True
        flow = self.flow
        if flow is not None and flow.may_ping and self.receiving is not None:
            self.receiving.cancel()

    def request_close(self, code: int, reason: str) -> None:
        flow = self.flow
        if self.stop_with is None and not (flow is not None and flow.closed):
            self.stop_with = (code, reason)
            if flow is not None and flow.cursor.at_boundary and self.receiving is not None:
                self.receiving.cancel()


class Tunnel:
    """Copy bytes between a client and a backend after a ``101`` until both have closed.

    ``to_backend`` and ``to_client`` are bytes already read from each side after its
    handshake (frames sent at once). Never raises for either side's failure.
    """

    def __init__(
        self,
        client: Stream,
        backend: Stream,
        *,
        max_message_size: int,
        on_activity: Callable[[], None] | None = None,
        close_timeout: float = 5.0,
        pump: TunnelPump | None = None,
        keepalive: float | None = None,
        name: str = "",
    ) -> None:
        """``pump``: copy on its thread while nothing but copying happens (plain sockets only).
        ``keepalive``: ping the client after that many seconds without bytes to it
        (:mod:`trioproxy.relay.keepalive`); ``name``: the server, for log lines."""
        self.client_to_backend = _Direction(
            client, backend, True, max_message_size, (GOING_AWAY, "")
        )
        self.backend_to_client = _Direction(
            backend, client, False, max_message_size, (INTERNAL_ERROR, "the backend closed the connection abruptly")
        )
        self.max_message_size = max_message_size
        self.on_activity = on_activity
        self.close_timeout = close_timeout
        self.pump = pump
        self.keepalive = keepalive
        self.name = name
        self.moved = False  # bytes went by while the pump carried the tunnel
        self.broken = False  # the pump failed while carrying it: it can only end
        self._carried = False
        self._scope: trio.CancelScope | None = None
        self._shutdown_pending: tuple[int, str] | None = None

    async def run(self, to_backend: bytes = b"", to_client: bytes = b"") -> None:
        up, down = self.client_to_backend, self.backend_to_client
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            if self._shutdown_pending is not None:
                self.shut_down(*self._shutdown_pending)
            assert up.flow is not None and down.flow is not None
            keepalive = None
            if self.keepalive is not None:
                keepalive = Keepalive(self.keepalive, trio.current_time())
                up.flow.cursor.keepalive = down.flow.keepalive = keepalive
            up.flow.pass_on(to_backend)
            down.flow.pass_on(to_client)
            if self._pumpable(up.flow, down.flow):
                if not await self._carry(up.flow, down.flow):
                    return  # the caller closes both connections
            if keepalive is not None:
                if keepalive.expired:  # the pump found out
                    self._keepalive_expired(keepalive)
                else:
                    nursery.start_soon(self._keep_alive, keepalive)
            nursery.start_soon(self._pump, up, down)
            nursery.start_soon(self._pump, down, up)

    async def _keep_alive(self, keepalive: Keepalive) -> None:
        """The keepalive's clock on the event loop; the client's copier sends the pings."""
        down = self.backend_to_client
        while True:
            await trio.sleep_until(keepalive.next_check(trio.current_time()))
            if down.stop_with is not None or down.flow is None or down.flow.closed:
                return  # closing already
            action = keepalive.check(trio.current_time())
            if action is Action.PING:
                down.request_ping()
            elif action is Action.EXPIRED:
                self._keepalive_expired(keepalive)
                return

    def _keepalive_expired(self, keepalive: Keepalive) -> None:
        """The client did not answer: 1011 to it, 1001 to the backend, each at its next boundary."""
        log.info(
            "%s: WebSocket client silent for %g s after a keepalive ping: closing it with 1011",
            self.name or "tunnel",
            keepalive.interval,
        )
        self.backend_to_client.request_close(INTERNAL_ERROR, CLIENT_REASON)
        self.client_to_backend.request_close(GOING_AWAY, BACKEND_REASON)
        self._hurry()

    def _pumpable(self, up: Flow, down: Flow) -> bool:
        return (
            self.pump is not None
            and isinstance(self.client_to_backend.source, trio.SocketStream)
            and isinstance(self.backend_to_client.source, trio.SocketStream)
            and self.client_to_backend.stop_with is None
            and up.next_step() is Step.COPY
            and down.next_step() is Step.COPY
        )

    async def _carry(self, up: Flow, down: Flow) -> bool:
        """Let the pump copy until it hands the tunnel back; False if it can only end now."""
        assert self.pump is not None
        self.client_to_backend.flow = self.backend_to_client.flow = None
        handback = Handback((up, down), failed=False)  # if not taken
        self._carried = True
        try:
            handback = await self.pump.carry(self, (up, down)) or handback
        finally:
            self._carried = False
            self.report_activity()
        if handback.flows is not None:
            self.client_to_backend.flow, self.backend_to_client.flow = handback.flows
        if not handback.failed:
            return True
        self.broken = True
        await self._end_after_pump_failure()
        return False

    async def _end_after_pump_failure(self) -> None:
        """Tell each end at rest that the tunnel failed (1011); the rest just close."""
        with trio.move_on_after(self.close_timeout):
            for way in (self.client_to_backend, self.backend_to_client):
                flow = way.flow
                if flow is not None and flow.at_rest and not flow.closed:
                    frame = close_frame(INTERNAL_ERROR, "the proxy's WebSocket tunnel failed", masked=way.masked)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await way.sink.send_all(frame)
                        flow.closed = True

    def report_activity(self) -> None:
        """Count bytes the pump moved since the last report as activity.

        Also called by the trio token for the pump's thread, where an exception would end the
        run: a failing callback is logged, never raised.
        """
        if self.moved:
            self.moved = False
            if self.on_activity is not None:
                try:
                    self.on_activity()
                except Exception:
                    log.exception("WebSocket tunnel: counting activity failed")

    def shut_down(self, code: int = GOING_AWAY, reason: str = "the proxy is shutting down") -> None:
        """Close both ends with ``code`` (each at its next frame boundary), then end."""
        if self._scope is None:
            self._shutdown_pending = (code, reason)
            return
        self.client_to_backend.request_close(code, reason)
        self.backend_to_client.request_close(code, reason)
        if self._carried:
            assert self.pump is not None
            self.pump.release(self)
        self._hurry()

    def _hurry(self) -> None:
        """Whatever happens, end within the close timeout from now."""
        assert self._scope is not None
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + self.close_timeout)

    async def _pump(self, way: _Direction, other: _Direction) -> None:
        clean = True
        try:
            clean = await self._copy(way, other)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            clean = False  # the sink's side is gone; the other pump learns it from its source
            way.ended = True
            self._finish(way, other, abnormal=True)
            return
        way.ended = True
        flow = way.flow
        if not clean and flow is not None and flow.cursor.at_boundary and not flow.closed:
            # The source went without a close frame: tell the sink's end as a WebSocket would.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await way.sink.send_all(close_frame(*way.gone, masked=way.masked))
                flow.closed = True
        self._finish(way, other, abnormal=not clean)

    async def _copy(self, way: _Direction, other: _Direction) -> bool:
        """Pass frames on until the source ends; whether it ended cleanly (after a close)."""
        flow = way.flow
        assert flow is not None
        on_activity = self.on_activity
        # Keepalive on: the times of the last bytes each way (to_client: this one's sink).
        to_client = way is self.backend_to_client
        keepalive = flow.keepalive if to_client else flow.cursor.keepalive
        step = flow.next_step()
        while True:
            if flow.pending:
                unsent = flow.unsent
                await way.sink.send_all(unsent[flow.written :] if flow.written else unsent)
                flow.unsent, flow.written = b"", 0
            if step is Step.COPY and way.stop_with is not None:
                step = flow.next_step(stopping=True)  # asked to stop while its bytes were written
            if way.ping_wanted and step is Step.COPY and flow.may_ping and not flow.closed and keepalive is not None:
                way.ping_wanted = False
                # Noted first: the pong may be read (and the ping found answered) before
                # send_all returns to this task.
                keepalive.pinged(trio.current_time())
                await way.sink.send_all(keepalive.frame)
            if step is not Step.COPY:
                if step is not Step.STOP and way.stop_with is None:
                    self._refuse(way, other, step)
                if not flow.closed:
                    assert way.stop_with is not None
                    await way.sink.send_all(close_frame(*way.stop_with, masked=way.masked))
                    flow.closed = True
                await self._drain(way.source)
                return True
            received: bytes | bytearray | None = None
            with trio.CancelScope() as way.receiving:
                try:
                    received = await way.source.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return False
            way.receiving = None
            if received is None:  # cancelled to stop at this boundary, or to ping
                step = flow.next_step(stopping=way.stop_with is not None)
                continue
            if not received:
                return flow.closed
            data = bytes(received) if isinstance(received, bytearray) else received
            step = flow.pass_on(data, stopping=way.stop_with is not None)
            if keepalive is not None:
                if to_client:
                    keepalive.last_to_client = trio.current_time()
                else:
                    keepalive.last_from_client = trio.current_time()
                    if not flow.unsent:
                        continue  # our pong, dropped: no activity
            if on_activity is not None:
                try:
                    on_activity()
                except Exception:
                    log.exception("WebSocket tunnel: counting activity failed; not counted from now on")
                    on_activity = None

    async def _drain(self, source: Stream) -> None:
        """After our own close: read (and drop) until the other end closes too."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await source.receive_some(READ_SIZE):
                continue

    def _refuse(self, way: _Direction, other: _Direction, step: Step) -> None:
        """The close each end gets for a frame the tunnel will not pass (``step``): the end
        that sent it learns why, the other that it sent one."""
        from_client = way is self.client_to_backend
        if step is Step.TOO_BIG:
            code, problem = MESSAGE_TOO_BIG, f"message over {self.max_message_size} bytes"
            sent = "a message over the size limit"
        else:
            assert way.flow is not None and way.flow.cursor.invalid is not None
            code, problem = PROTOCOL_ERROR, f"invalid frame: {way.flow.cursor.invalid}"
            sent = way.flow.cursor.invalid
        if from_client:
            way.stop_with = (GOING_AWAY, f"the client sent {sent}")
            other.request_close(code, problem)
        else:
            way.stop_with = (code, problem)
            other.request_close(code, f"the backend sent a {problem}" if step is Step.TOO_BIG else f"the backend sent {sent}")
        self._hurry()

    def _finish(self, way: _Direction, other: _Direction, *, abnormal: bool) -> None:
        assert self._scope is not None
        flows = (way.flow, other.flow)
        closed = all(flow is not None and flow.closed for flow in flows)
        if abnormal or other.ended or closed:
            self._scope.cancel()
        else:
            # A clean end one way: the other end's close is on its way; wait a little for it.
            self._hurry()
