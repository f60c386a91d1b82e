"""The transport adapter: everything trioproxy relies on inside Hypercorn, in one place.

Hypercorn serves each client connection with its trio worker's pieces: a lifespan, a worker
context, and a per-connection server (``TCPServer``) that runs an HTTP/1.1 or HTTP/2 protocol.
trioproxy composes them itself (:func:`worker`, :class:`Worker`), as ``trio/run.py:
worker_serve`` does, so that :mod:`trioproxy.listener` can look at a connection first. What it
changes, and why:

- :class:`Connection` (``TCPServer``): reads 256 KiB at a time; lets go of a connection as soon
  as its client has closed it (the keep-alive timer would hold the socket); runs trioproxy's
  protocols below instead of Hypercorn's ``ProtocolWrapper``.
- :class:`H11`: an ``h2c`` upgrade whose ``HTTP2-Settings`` cannot be used is answered 400
  before any ``101`` (Hypercorn upgraded first, then failed decoding it).
- :class:`H2`: every stream error is the stream's own. A request with a malformed method or
  path is reset (PROTOCOL_ERROR); a CONNECT that is not a WebSocket gets 405/501; DATA for a
  stream whose response has ended is answered RST_STREAM(NO_ERROR) (RFC 9113 §8.1); PRIORITY
  signals are ignored (RFC 9113 §5.3.2 deprecates them; Hypercorn kept a tree of every stream
  named, up to a hard limit); a stream reset by the client, or ended by its app without its
  last part, releases its buffer at once. Anything still unforeseen closes that connection with
  GOAWAY(INTERNAL_ERROR), logged once.
- :class:`WebSocketControl` (in a WebSocket's scope, both protocols): what ASGI has no message
  for, a ping to the client and the pongs it answers with, for the relay's keepalive
  (:mod:`trioproxy.relay.keepalive`). Hypercorn answers a client's pings itself and drops every
  pong, so none reaches the app, and none the backend.
- :class:`_StreamBuffer`: what a stream's app may queue for a client that does not read is
  bounded (Hypercorn woke the app whenever the flow-control window was empty, so a download to a
  client that stopped reading grew without bound).

``tests/test_hypercorn_contract.py`` fails loudly when a Hypercorn release no longer has what
this module overrides or calls.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from math import inf
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
import priority
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, EndBody, Request, StreamClosed
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BUFFER_LOW_WATER, H2Protocol, StreamBuffer
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import filter_pseudo_headers, parse_socket_addr, repr_socket_addr, wrap_app
from wsproto.events import Ping, Pong

from .relay.headers import handshake_not_ascii, non_ascii_handshake_header

log = logging.getLogger("trioproxy.transport")

READ_SIZE = 256 * 1024  # per read of a connection Hypercorn serves (Hypercorn asks for 64 KiB)
# Scope key: the client connection's socket (a trio socket), for listener.client_gone.
CLIENT_SOCKET = "trioproxy.client_socket"
# Scope key of a WebSocket: its WebSocketControl.
WEBSOCKET_CONTROL = "trioproxy.websocket_control"

Address = tuple[str, int] | None


def addresses(sock: Any) -> tuple[Address, Address]:
    """The client's and the server's address of a connected socket, as ASGI gives them.

    Raises OSError when the client has reset the connection meanwhile (ENOTCONN).
    """
    return (
        parse_socket_addr(sock.family, sock.getpeername()),
        parse_socket_addr(sock.family, sock.getsockname()),
    )


def bound_address(sock: Any) -> str:
    """A listening socket's address as a URL authority (``host:port``, ``[v6]:port``)."""
    return cast(str, repr_socket_addr(sock.family, sock.getsockname()))


# -- the worker -----------------------------------------------------------------------------


class Worker:
    """Hypercorn's side of serving: its wrapped app, lifespan state and worker context."""

    def __init__(self, app: Any, config: Config, lifespan_state: dict[str, Any]) -> None:
        self.app = app
        self.config = config
        self.context = WorkerContext(None)
        self.state = ConnectionState(lifespan_state.copy())

    async def serve(self, stream: trio.abc.Stream, sock: Any, replay: bytes = b"") -> None:
        """Serve one client connection with Hypercorn, ``replay`` (bytes already read) first."""
        if replay:
            stream = ReplayStream(stream, replay)
        app = _WithClientSocket(self.app, sock)
        # (Hypercorn's annotations ask for its own types; any trio stream will do.)
        await Connection(cast(Any, app), self.config, self.context, self.state, cast(Any, stream)).run()

    async def terminate(self) -> None:
        """Tell every connection to finish (a graceful shutdown has begun)."""
        await self.context.terminated.set()


@asynccontextmanager
async def worker(app: Any, config: Config) -> AsyncIterator[Worker]:
    """Run the ASGI ``app``'s lifespan around the block, as Hypercorn's worker does."""
    asgi = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        yield Worker(asgi, config, lifespan_state)
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


class _WithClientSocket:
    """Hypercorn's wrapped app for one connection: puts the connection's socket in each scope.

    HTTP/1.1 only: Hypercorn reads nothing from an HTTP/1.1 connection while a request is being
    answered, so only the socket tells that its client left. Over HTTP/2 it reads on, and a
    stream reset or a closed connection reaches the app as ``http.disconnect``, which is the
    one that tells about that stream (the socket outlives it, or is closed under it).
    """

    __slots__ = ("app", "sock")

    def __init__(self, app: Any, sock: Any) -> None:
        self.app = app
        self.sock = sock

    def __call__(self, scope: dict[str, Any], *args: Any) -> Coroutine[Any, Any, None]:
        # Not a coroutine of its own: the app's is returned, one frame fewer per resumption.
        if scope.get("http_version") != "2":
            scope[CLIENT_SOCKET] = self.sock
        return cast(Coroutine[Any, Any, None], self.app(scope, *args))


class WebSocketControl:
    """A WebSocket's client side beyond ASGI's messages: send it a ping, learn of its pongs.

    ``on_pong(payload)`` is called for each pong the client sends once a ping went;
    ``last_received`` is when bytes last came from the client since then (trio's clock).
    """

    def __init__(self, stream: WSStream) -> None:
        self._stream = stream
        self.on_pong: Callable[[bytes], None] | None = None
        self.last_received = -inf
        self._watching = False

    async def ping(self, payload: bytes) -> bool:
        """Send a ping between two of the app's messages; False if the WebSocket is not open."""
        stream = self._stream
        if stream.closed or stream.state is not ASGIWebsocketState.CONNECTED:
            return False
        if not self._watching:
            stream.connection = cast(Any, _WatchedConnection(stream.connection, self))
            self._watching = True
        # Hypercorn sends each of the app's messages as one frame, the bytes of each made
        # before the send that waits: this frame goes whole, between two of them.
        await stream._send_wsproto_event(Ping(payload=payload))
        return True


class _WatchedConnection:
    """A WebSocket stream's wsproto connection, which tells its control of pongs and bytes."""

    def __init__(self, connection: Any, control: WebSocketControl) -> None:
        self._connection = connection
        self._control = control

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def receive_data(self, data: bytes | None) -> None:
        self._control.last_received = trio.current_time()
        self._connection.receive_data(data)

    def events(self) -> Iterator[Any]:
        on_pong = self._control.on_pong
        for event in self._connection.events():
            if isinstance(event, Pong) and on_pong is not None:
                on_pong(bytes(event.payload))
            yield event


class _WithWebSocketControl:
    """The protocols' app: puts a :class:`WebSocketControl` in each WebSocket's scope."""

    __slots__ = ("app", "protocols")

    def __init__(self, app: Any, protocols: Protocols) -> None:
        self.app = app
        self.protocols = protocols

    def __call__(self, scope: dict[str, Any], *args: Any) -> Coroutine[Any, Any, None]:
        if scope["type"] == "websocket":
            protocol = self.protocols.protocol
            streams = protocol.streams.values() if isinstance(protocol, H2) else [protocol.stream]
            stream = next((s for s in streams if isinstance(s, WSStream) and s.scope is scope), None)
            if stream is not None:
                scope[WEBSOCKET_CONTROL] = WebSocketControl(stream)
        return cast(Coroutine[Any, Any, None], self.app(scope, *args))


class ReplayStream(trio.abc.HalfCloseableStream):
    """A stream that gives back bytes already read from it before reading on.

    Hypercorn's ``TCPServer`` finds out whether its stream is TLS by trying the TLS
    methods, so everything but reading is the wrapped stream's own.
    """

    def __init__(self, stream: trio.abc.Stream, replay: bytes) -> None:
        self._stream = stream
        self._replay = replay
        # Every byte of the connection passes here: the wrapped stream's own methods, bound
        # once, cost no extra coroutine frame per call.
        self.send_all = stream.send_all  # type: ignore[method-assign]
        self.wait_send_all_might_not_block = stream.wait_send_all_might_not_block  # type: ignore[method-assign]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._replay:
            return await self._stream.receive_some(max_bytes)
        size = len(self._replay) if max_bytes is None else max_bytes
        data, self._replay = self._replay[:size], self._replay[size:]
        if not self._replay:
            self.receive_some = self._stream.receive_some  # type: ignore[method-assign]  # from now on
        await trio.lowlevel.checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()  # type: ignore[attr-defined]  # AttributeError for TLS, as TCPServer expects

    async def aclose(self) -> None:
        await self._stream.aclose()


# -- the connection -------------------------------------------------------------------------


class Connection(TCPServer):
    """Hypercorn's handler of one client connection, with trioproxy's protocols.

    Hypercorn runs a keep-alive timer task beside an idle connection and closes the socket only
    once every task of the connection has ended; when the client closes an idle connection, the
    reader stops but the timer runs on, so the socket (a file descriptor, in CLOSE_WAIT) stayed
    open until ``keep_alive_timeout``. Once nothing more can be read, the timer has nothing to
    wait for: stop it. (A request still being answered stopped the timer already; its end
    closes the connection, as the client's side is gone.)
    """

    _client_gone = False

    async def run(self) -> None:
        # TCPServer.run, with Protocols instead of Hypercorn's ProtocolWrapper.
        try:
            with contextlib.suppress(OSError):  # the client's socket failed: the connection ends
                await self._serve(self.stream)
        finally:
            await self._close()

    async def _serve(self, stream: Any) -> None:
        if isinstance(stream, trio.SSLStream) or hasattr(stream, "selected_alpn_protocol"):
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await stream.do_handshake()  # done already when the listener peeked
            except (trio.BrokenResourceError, trio.TooSlowError):
                return
            alpn, sock, tls = stream.selected_alpn_protocol(), stream.transport_stream.socket, True
        else:
            alpn, sock, tls = "http/1.1", stream.socket, False
        client, server = addresses(sock)
        async with TaskGroup() as task_group:
            self._task_group = task_group
            self.protocol = cast(Any, Protocols(
                self.app, self.config, self.context, task_group, ConnectionState(self.state),
                tls, client, server, self.protocol_send, alpn,
            ))  # fmt: skip
            await self.protocol.initiate()
            await self.idle_task.restart(self._task_group, self._idle_timeout)
            await self._read_data()

    async def _read_data(self) -> None:
        # TCPServer._read_data with larger reads: each read becomes one body message through
        # h11, its queue and the relay, so larger reads make uploads cheaper per byte.
        read_timeout = self.config.read_timeout or inf
        while True:
            try:
                with trio.fail_after(read_timeout):
                    data = await self.stream.receive_some(READ_SIZE)
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            await self.protocol.handle(RawData(bytes(data)))
            if not data:
                break
        await self.protocol.handle(Closed())
        self._client_gone = True
        await self.idle_task.stop()

    async def _close(self) -> None:
        # TCPServer._close, which sent EOF while another task could be sending (the sending
        # task then failed with BusyResourceError); closing alone ends such a send. The close
        # itself must happen even when the EOF is cancelled (it is a checkpoint): a response to
        # `Connection: close` from one of Quart's pages left the connection open otherwise.
        if self.send_lock.locked():  # another task is sending
            await self.stream.aclose()
            return
        self.send_lock.acquire_nowait()
        try:
            with contextlib.suppress(
                trio.BrokenResourceError, AttributeError, trio.BusyResourceError, trio.ClosedResourceError
            ):  # gone already, or TLS (no EOF of its own)
                await self.stream.send_eof()
        finally:
            self.send_lock.release()
            await self.stream.aclose()  # trio closes the socket even if this is cancelled

    def protocol_send(self, event: Any) -> Coroutine[Any, Any, None]:
        # A response that ends after the client left would start the timer again.
        if self._client_gone and isinstance(event, Updated) and event.idle:
            event = Closed()
        return super().protocol_send(event)


class _BadUpgrade(Exception):
    """An HTTP/1.1 request was answered with an error and its connection must close."""


class Protocols:
    """Hypercorn's ``ProtocolWrapper``, switching to trioproxy's :class:`H2` instead of its own."""

    def __init__(
        self, app: Any, config: Config, context: Any, task_group: Any, state: Any,
        ssl: bool, client: Address, server: Address, send: Any, alpn_protocol: str | None,
    ) -> None:  # fmt: skip
        app = _WithWebSocketControl(app, self)
        self._arguments = (app, config, context, task_group, state, ssl, client, server, send)
        self._send = send
        self.protocol: H11 | H2 = H2(*self._arguments) if alpn_protocol == "h2" else H11(*self._arguments)

    async def initiate(self) -> None:
        await self.protocol.initiate()

    async def handle(self, event: Event) -> None:
        try:
            await self.protocol.handle(event)
        except H2ProtocolAssumedError as error:  # prior knowledge
            self.protocol = H2(*self._arguments)
            await self.protocol.initiate()
            if error.data:
                await self.protocol.handle(RawData(data=error.data))
        except H2CProtocolRequiredError as error:  # h2c upgrade, its 101 sent
            self.protocol = H2(*self._arguments)
            await self.protocol.initiate(error.headers, error.settings)
            if error.data:
                await self.protocol.handle(RawData(data=error.data))
        except _BadUpgrade:
            await self._send(Closed())


# -- HTTP/1.1 -------------------------------------------------------------------------------


class H11(H11Protocol):
    """Hypercorn's HTTP/1.1, which refuses an ``h2c`` upgrade it could not carry out and a
    WebSocket handshake whose headers are not ASCII (400, before any stream is made)."""

    async def _check_protocol(self, event: h11.Request) -> None:
        upgrade = b""
        has_body = False
        settings: list[bytes] = []
        for name, value in event.headers:
            if name == b"upgrade":
                upgrade = value.strip().lower()
            elif name in (b"content-length", b"transfer-encoding"):
                has_body = True
            elif name == b"http2-settings":
                settings.append(value)
        not_ascii = non_ascii_handshake_header(event.headers) if b"websocket" in upgrade else None
        if not_ascii is not None:
            log.info("WebSocket handshake from %s refused: %s is not ASCII", _where(self.client), not_ascii)
            await self._refuse(400, handshake_not_ascii(not_ascii) + "\n")
            raise _BadUpgrade()
        if upgrade == b"h2c" and not has_body:  # Hypercorn upgrades exactly these
            problem = h2c_settings_problem(settings)
            if problem is not None:
                log.info("h2c upgrade from %s refused: %s", _where(self.client), problem)
                await self._refuse(400, f"Bad Request: {problem}.\n")
                raise _BadUpgrade()
        await super()._check_protocol(event)

    async def _refuse(self, status: int, message: str) -> None:
        body = message.encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


def h2c_settings_problem(values: list[bytes]) -> str | None:
    """Why an ``h2c`` upgrade's ``HTTP2-Settings`` values cannot be used, or None.

    RFC 7540 §3.2.1: exactly one, the base64url of a SETTINGS payload. It is parsed here the
    way the upgrade will parse it, on a scratch connection, so that whatever h2 would refuse
    after the ``101`` is refused before it.
    """
    if len(values) != 1:
        return f"an h2c upgrade needs exactly one HTTP2-Settings header, not {len(values)}"
    value = values[0].strip()
    if re.fullmatch(rb"[A-Za-z0-9_-]*={0,2}", value) is None:
        return "the HTTP2-Settings header is not base64url"
    scratch = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    try:
        scratch.initiate_upgrade_connection(value)
    except Exception as exc:  # whatever h2 (or hyperframe below it) refuses the payload with
        return f"the HTTP2-Settings header is not a valid SETTINGS payload ({type(exc).__module__}.{type(exc).__name__})"
    return None


# -- HTTP/2 ---------------------------------------------------------------------------------


class _StreamBuffer(StreamBuffer):
    """A stream's outgoing data, which makes its app wait while the client takes none.

    Hypercorn's ``pop`` woke a waiting ``push`` after every pop that returned little, and the
    sending task pops nothing (0 bytes) whenever the stream's flow-control window is empty: a
    client that stopped reading let the app queue without bound. Here ``push`` waits while the
    buffer holds more than ``BUFFER_HIGH_WATER`` (at most one app message more), and only a pop
    that took the buffer below ``BUFFER_LOW_WATER`` wakes it.
    """

    @property
    def ended(self) -> bool:
        """The app's last part is in (or the buffer was closed)."""
        return self._complete

    async def push(self, data: bytes) -> None:
        await super().push(data)  # (waits once, for any pop; possibly one that took nothing)
        while len(self.buffer) >= BUFFER_HIGH_WATER and not self._complete:
            await self._paused.clear()
            await self._paused.wait()

    async def pop(self, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if len(self.buffer) < BUFFER_LOW_WATER:
            await self._paused.set()
        if not self.buffer:
            await self._is_empty.set()
        return data


# RFC 9110 §5.6.2: a method is a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9113 §8.3.1 and RFC 3986: a path is visible ASCII.
_PATH = re.compile(rb"[\x21-\x7e]+")


@dataclass(frozen=True)
class Refusal:
    """What an HTTP/2 request that Hypercorn must not see gets instead."""

    reason: str
    status: int | None = None  # an HTTP answer; None: RST_STREAM(PROTOCOL_ERROR)


def refusal(headers: list[tuple[bytes, bytes]]) -> Refusal | None:
    """Why an HTTP/2 request (its header list, pseudo-headers included) is refused, or None.

    h2 has checked the pseudo-headers' presence and order; what is left is what Hypercorn
    decodes as ASCII or takes for granted.
    """
    pseudo = {name: value for name, value in headers if name.startswith(b":")}
    method = pseudo.get(b":method", b"")
    if _TOKEN.fullmatch(method) is None:
        return Refusal("the method is not a token")
    if method == b"CONNECT":
        protocol = pseudo.get(b":protocol")
        if protocol is None:
            return Refusal("CONNECT (a tunnel) is not served", 405)
        if protocol.lower() != b"websocket":
            return Refusal(f"CONNECT for {protocol[:40]!r} is not served (only websocket)", 501)
    path = pseudo.get(b":path")
    if path is None or _PATH.fullmatch(path) is None:
        return Refusal("the path is missing or not visible ASCII")
    return None


class H2(H2Protocol):
    """Hypercorn's HTTP/2, which keeps every stream's failure to that stream (module docstring)."""

    async def initiate(self, headers: list[tuple[bytes, bytes]] | None = None, settings: bytes | None = None) -> None:
        if headers is None:
            await super().initiate(None, settings)
            return
        # An h2c upgrade: its request is stream 1, which may be refused as any other.
        self.connection.initiate_upgrade_connection(settings)
        await self._flush()
        request = h2.events.RequestReceived(stream_id=1, headers=headers)
        if await self._request(request):
            await self.streams[1].handle(EndBody(stream_id=1))
        await self._flush()
        self.task_group.spawn(self.send_task)

    async def handle(self, event: Event) -> None:
        try:
            if isinstance(event, Closed):
                # Nothing will be sent any more: an app waiting for its data to go (a refusal
                # draining, a download pushing) would wait for ever, and hold the connection.
                # First, since telling the streams' apps (below) can wait for their queues.
                for stream_id in list(self.stream_buffers):
                    await self._forget(stream_id)
            await super().handle(event)
        except Exception:
            if self.closed:
                raise
            log.exception("HTTP/2 connection from %s: unexpected error, closing it", _where(self.client))
            self.connection.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR)
            await self._flush()
            await self.send(Closed())

    async def send_task(self) -> None:
        try:
            await super().send_task()
        except Exception:
            if self.closed:
                raise
            log.exception("HTTP/2 connection from %s: unexpected error sending, closing it", _where(self.client))
            self.connection.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR)
            await self._flush()
            await self.send(Closed())

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                if self.context.terminated.is_set():
                    self.connection.reset_stream(event.stream_id)
                    self.connection.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
                elif await self._request(event):
                    await self.send(Updated(idle=False))
                if self.keep_alive_requests > self.config.keep_alive_max_requests:
                    self.connection.close_connection()
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    await stream.handle(Body(stream_id=event.stream_id, data=event.data))
                self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if stream is None and event.stream_id not in self.stream_buffers:
                    # Its response has ended (or it was refused): the rest of the request is
                    # not wanted (RFC 9113 §8.1).
                    self._reset(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    await stream.handle(EndBody(stream_id=event.stream_id))
            elif isinstance(event, h2.events.StreamReset):
                await self._close_stream(event.stream_id)
                await self._forget(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                await self._window_updated(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    await self._window_updated(None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                await self.send(Closed())
            # PriorityUpdated: ignored (see the module's docstring).
        await self._flush()

    async def _request(self, event: h2.events.RequestReceived) -> bool:
        """Start a stream for a request, or refuse it; whether a stream was started."""
        refused = refusal(event.headers)
        if refused is None:
            await self._create_stream(event)
            return True
        log.info("HTTP/2 request from %s refused: %s", _where(self.client), refused.reason)
        if refused.status is None:
            self._reset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        else:
            self.connection.send_headers(
                event.stream_id,
                [(b":status", b"%d" % refused.status), (b"content-length", b"0"), *self.config.response_headers("h2")],
                end_stream=True,
            )
        return False

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        # H2Protocol._create_stream, with a bounded buffer in place before the app can run,
        # for a request that refusal() let through.
        pseudo = dict(header for header in request.headers if header[0].startswith(b":"))
        method = pseudo[b":method"].decode("ascii").upper()
        stream_id = request.stream_id
        kind = WSStream if method == "CONNECT" else HTTPStream
        stream = kind(
            self.app, self.config, self.context, self.task_group, self.ssl, self.client, self.server,
            self.stream_send, stream_id,
        )  # fmt: skip
        self.streams[stream_id] = stream
        self.stream_buffers[stream_id] = _StreamBuffer(self.context.event_class)
        self.priority.insert_stream(stream_id)
        self.priority.block(stream_id)
        await stream.handle(
            Request(
                stream_id=stream_id,
                headers=filter_pseudo_headers(request.headers),
                http_version="2",
                method=method,
                raw_path=pseudo[b":path"],
                state=self.connection_state,
            )
        )
        self.keep_alive_requests += 1
        await self.context.mark_request()

    async def _priority_updated(self, event: h2.events.PriorityUpdated) -> None:
        return None  # ignored (see the module's docstring)

    async def stream_send(self, event: Any) -> None:
        if isinstance(event, StreamClosed):
            buffer = self.stream_buffers.get(event.stream_id)
            if isinstance(buffer, _StreamBuffer) and not buffer.ended:
                await self._unfinished(event.stream_id, buffer)
        await super().stream_send(event)

    async def _unfinished(self, stream_id: int, buffer: StreamBuffer) -> None:
        # Its app ended without the last part: a WebSocket (whose close frame may still be
        # queued) ends the stream once that is sent, a response cut short is reset.
        stream = self.streams.get(stream_id)
        if isinstance(stream, HTTPStream) and stream.state != ASGIHTTPState.CLOSED:
            self._reset(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            await self._forget(stream_id)
            await self._flush()
        else:
            buffer.set_complete()
            self.priority.unblock(stream_id)
            await self.has_data.set()

    async def _send_data(self, stream_id: int) -> None:
        buffer = self.stream_buffers.get(stream_id)
        try:
            if buffer is None:
                raise KeyError(stream_id)
            window = min(
                self.connection.local_flow_control_window(stream_id), self.connection.max_outbound_frame_size
            )
            data = await buffer.pop(max(0, window))
            if data:
                self.connection.send_data(stream_id, data)
                await self._flush()
            else:
                self.priority.block(stream_id)
            if self.stream_buffers.get(stream_id) is buffer and buffer.complete:
                self.connection.end_stream(stream_id)
                await self._flush()
                await self._forget(stream_id)
        except (h2.exceptions.StreamClosedError, KeyError, h2.exceptions.ProtocolError, priority.MissingStreamError):
            # The stream (or the connection) closed while its data waited.
            await self._forget(stream_id)

    def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        try:
            self.connection.reset_stream(stream_id, code)
        except h2.exceptions.StreamClosedError:
            pass  # closed meanwhile: nothing to reset

    async def _forget(self, stream_id: int) -> None:
        """Release a stream's buffer and its place in the send order (its app may be waiting)."""
        buffer = self.stream_buffers.pop(stream_id, None)
        if buffer is not None:
            await buffer.close()
        with contextlib.suppress(priority.MissingStreamError):
            self.priority.remove_stream(stream_id)
        await self.has_data.set()


def _where(address: Address) -> str:
    return f"{address[0]}:{address[1]}" if address else "a unix socket"
