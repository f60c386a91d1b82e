"""The WebSocket relay: a client's WebSocket, through Hypercorn, to a backend's WebSocket or socket.

The backend's WebSocket is opened first, with the client's requested subprotocols and the
forwarded headers; only then is the client accepted, with exactly the subprotocol the backend
chose (or none). A backend that refuses the upgrade has its HTTP answer passed on to the
client, so a 403 or a 404 stays one instead of becoming a generic failure.

Once both sides are open, two pumps pass messages on, one per direction, each waiting for the
other side to take a message before reading the next, so a slow reader slows its writer down
instead of filling memory. Whichever side ends first ends the other, and every task of the
connection lives in one nursery that is gone when :func:`relay_websocket` returns.

With ``raw_socket_proxy`` the backend is a plain TCP or unix stream: client messages are
written to it as bytes and what it sends comes back as binary messages.

With keepalive on (``WebSocketTarget.keepalive``, :mod:`trioproxy.relay.keepalive`) a third task
pings a client that got nothing for that long, through the scope's
:class:`~trioproxy.transport.WebSocketControl`, and closes one that stays silent with 1011,
which ends the backend's side too.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio
import trio_websocket
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
)
from wsproto.utilities import ProtocolError

from ..backend import Backend, BackendStream, connect
from ..backend_tls import TLSFailure, broken_by_tls, refused_after_handshake
from ..errors import error_response, render_error, sole_exception
from ..transport import WEBSOCKET_CONTROL, WebSocketControl
from . import keepalive
from .headers import Headers, canonical_name, header_value, strip_hop_by_hop, wants_json

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("trioproxy.relay.websocket")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

RAW_READ_SIZE = 65536

# RFC 6455 §7.4.1 close codes the relay chooses itself.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
NO_STATUS = 1005
ABNORMAL_CLOSURE = 1006
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TLS_HANDSHAKE = 1015
# Codes that describe a closure but must never be sent in a close frame (§7.4.1).
_UNSENDABLE = frozenset({NO_STATUS, ABNORMAL_CLOSURE, TLS_HANDSHAKE})


@dataclass
class WebSocketTarget:
    """Everything the relay needs to pass one WebSocket on."""

    server: str
    backend: Backend
    target: bytes  # path and query as sent to the backend
    headers: Headers  # forwarded headers, Host included, without the handshake's own
    subprotocols: list[str] = field(default_factory=list)
    raw_socket: bool = False
    max_message_size: int = 16 * 1024 * 1024
    on_activity: Callable[[], None] | None = None
    connect_timeout: float = 10.0
    handshake_timeout: float = 30.0
    close_timeout: float = 5.0  # for the backend's answer to our close frame
    keepalive: float | None = None  # seconds without bytes to the client before a ping; None: off


class _Refused(Exception):
    """The backend side could not be opened; the client gets this HTTP answer instead."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: Headers | None = None,
        body: bytes | None = None,
        output: list[str] | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.body = body
        self.output = output  # a server's last output lines, for a server that failed
        self.retry_after = retry_after  # seconds, for a server that is starting or backing off

    @classmethod
    def from_rejection(cls, rejection: ConnectionRejected) -> _Refused:
        headers = [
            (name, value)
            for name, value in strip_hop_by_hop(rejection.headers)
            if name.lower() != b"content-length"
        ]
        return cls(
            rejection.status_code,
            f"the backend refused the WebSocket upgrade with HTTP {rejection.status_code}",
            headers,
            rejection.body or b"",
        )


class _Client:
    """The client's side, spoken in Hypercorn's ASGI WebSocket messages."""

    def __init__(self, scope: dict[str, Any], send: Send) -> None:
        self.scope = scope
        self._send = send
        self.accepted = False
        self.closed = False  # we sent a close or a refusal: nothing more may follow
        self.disconnected = False
        self.sent_at = trio.current_time()  # when a message to the client last went (or began)
        self.sending = False  # a message to the client is on its way (a ping waits for it)

    async def accept(self, subprotocol: str | None, headers: Headers) -> None:
        self.accepted = True
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": headers})

    async def send_message(self, message: str | bytes) -> None:
        self.sent_at = trio.current_time()
        self.sending = True
        try:
            if isinstance(message, str):
                await self._send({"type": "websocket.send", "text": message})
            else:
                await self._send({"type": "websocket.send", "bytes": message})
        finally:
            self.sending = False
            self.sent_at = trio.current_time()

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed or self.disconnected:
            return
        self.closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def refuse(self, refusal: _Refused, server: str) -> None:
        """Answer the upgrade with an HTTP response, where the server lets us."""
        if self.closed or self.accepted:
            await self.close(INTERNAL_ERROR, refusal.message[:120])
            return
        self.closed = True
        if "websocket.http.response" not in (self.scope.get("extensions") or {}):
            # Without the extension the only refusal ASGI has is a close before accepting,
            # which servers answer with 403.
            await self._send({"type": "websocket.close", "code": 1008})
            return
        if refusal.body is None:
            content_type, body = render_error(
                refusal.status,
                f"{server}: {refusal.message}",
                as_json=wants_json(self.scope["headers"]),
                server=server,
                output=refusal.output,
                retry_after=refusal.retry_after,
            )
            headers = [(b"content-type", content_type), (b"cache-control", b"no-store")]
            if refusal.retry_after is not None:
                headers.append((b"retry-after", str(max(1, math.ceil(refusal.retry_after))).encode()))
        else:
            headers, body = refusal.headers or [], refusal.body
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await self._send(
            {"type": "websocket.http.response.start", "status": refusal.status, "headers": headers}
        )
        await self._send({"type": "websocket.http.response.body", "body": body})


class _ClientLeft(Exception):
    """The client went away before the backend's WebSocket was open: nothing to answer."""


class _WatchedStream(trio.abc.Stream):
    """A backend stream that tells when the backend has gone away.

    trio-websocket waits for the opening handshake with no way to learn that its reader
    stopped, so a backend closing the connection mid-handshake would leave it waiting
    forever; this is how the relay notices instead.
    """

    def __init__(self, stream: BackendStream) -> None:
        self.stream = stream
        self.ended = False
        self.broken_by: str | None = None  # what TLS said, if it broke the connection
        self.on_end: Callable[[], Any] | None = None

    def _end(self) -> None:
        self.ended = True
        if self.on_end is not None:
            self.on_end()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.broken_by = broken_by_tls(exc)
            self._end()
            raise
        if not data:
            self._end()
        return data

    async def aclose(self) -> None:
        self._end()
        await self.stream.aclose()


async def relay_websocket(
    scope: dict[str, Any], receive: Receive, send: Send, target: WebSocketTarget
) -> None:
    """Relay one WebSocket connection until either side ends it.

    Never raises for a backend's or a client's failure: the client gets an HTTP status
    before accepting, or a close code after.
    """
    if (await receive())["type"] != "websocket.connect":
        return
    client = _Client(scope, send)
    try:
        if target.raw_socket:
            await _relay_raw(receive, client, target)
        else:
            await _relay_messages(receive, client, target)
    except _ClientLeft:
        log.debug("%s: the client left during the backend's WebSocket handshake", target.server)
    except _Refused as refusal:
        level = logging.INFO if refusal.body is not None else logging.WARNING  # the backend's own answer
        log.log(level, "%s: WebSocket refused (%d): %s", target.server, refusal.status, refusal.message)
        await client.refuse(refusal, target.server)
    except Exception as exc:  # a bug must not leave the client hanging or show it a traceback
        sole = sole_exception(exc)
        log.error("%s: WebSocket relay failed: %s: %s", target.server, type(sole).__name__, sole)
        await client.refuse(_Refused(500, f"relay failed: {type(sole).__name__}"), target.server)


async def refuse_websocket(
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    server: str | None = None,
    output: list[str] | None = None,
    retry_after: float | None = None,
) -> None:
    """Answer an upgrade that trioproxy itself refuses with an HTTP status and a short page.

    (Authentication, origin, routing, or a server that cannot start.) Where Hypercorn lacks
    the ``websocket.http.response`` extension, the client sees 403.
    """
    if (await receive())["type"] != "websocket.connect":
        return
    # The page is the one every transport renders for the same refusal (trioproxy.errors).
    headers, body = error_response(scope["headers"], status, message, server=server, output=output, retry_after=retry_after)
    await _Client(scope, send).refuse(_Refused(status, message, headers, body), server or "trioproxy")


async def _connect(target: WebSocketTarget) -> BackendStream:
    where = target.backend.describe()
    try:
        with trio.fail_after(target.connect_timeout):
            return await connect(target.backend)
    except TLSFailure as exc:
        raise _Refused(502, str(exc)) from None
    except OSError as exc:
        raise _Refused(502, f"cannot connect to {where}: {exc.strerror or exc}") from None
    except trio.TooSlowError:
        raise _Refused(504, f"no connection to {where} within {target.connect_timeout:g} s") from None


# -- WebSocket to WebSocket ----------------------------------------------------------------


async def _relay_messages(receive: Receive, client: _Client, target: WebSocketTarget) -> None:
    stream = _WatchedStream(await _connect(target))
    try:
        async with trio.open_nursery() as nursery:
            backend = await _open_handshake(nursery, stream, target, receive, client)
            await client.accept(backend.subprotocol, _cookies(backend.handshake_headers))
            nursery.start_soon(_backend_to_client, backend, client, target, nursery.cancel_scope)
            _start_keepalive(nursery, client, target, partial(_close_backend, backend, target))
            await _client_to_backend(receive, backend, client, target)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The handshake's failures surface from the nursery; they are refusals, not bugs.
        sole = sole_exception(group)
        if isinstance(sole, ConnectionRejected):
            raise _Refused.from_rejection(sole) from None
        if isinstance(sole, (_Refused, _ClientLeft)):
            raise sole from None
        if isinstance(sole, (ProtocolError, h11.ProtocolError)) and not client.accepted:
            # trio-websocket's reader fails this way on an answer that is not HTTP at all
            # (answering it with an HTTP error, as a server would, which h11 refuses).
            log.debug("%s: invalid handshake answer: %s", target.server, sole)
            raise _Refused(
                502, "the backend's answer to the WebSocket upgrade is not a valid handshake"
            ) from None
        raise
    finally:
        await trio.aclose_forcefully(stream.stream)


async def _open_handshake(
    nursery: trio.Nursery, stream: _WatchedStream, target: WebSocketTarget, receive: Receive, client: _Client
) -> WebSocketConnection:
    host, headers = _split_host(target)
    scope = trio.move_on_after(target.handshake_timeout)
    stream.on_end = scope.cancel
    backend: WebSocketConnection | None = None
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as watching:
            # A client that leaves meanwhile ends the wait (its sockets are not held until the
            # handshake timeout).
            watching.start_soon(_cancel_when_client_leaves, receive, client, scope)
            with scope:
                try:
                    backend = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,  # type: ignore[arg-type]  # any trio stream does; the hint is narrower
                        host,
                        target.target.decode("latin-1"),
                        subprotocols=target.subprotocols,
                        extra_headers=headers,
                        max_message_size=target.max_message_size,
                        receive_buffer_size=None,
                    )
                except Exception as exc:  # raised below, outside the watcher's nursery
                    failure = exc
            watching.cancel_scope.cancel()
    finally:
        stream.on_end = None
    if failure is not None:
        raise failure
    if backend is not None:
        return backend
    if client.disconnected:
        raise _ClientLeft()
    if stream.ended:
        tls = f" ({stream.broken_by})" if stream.broken_by else refused_after_handshake(stream.stream)
        raise _Refused(502, "the backend closed the connection during the WebSocket handshake" + tls)
    raise _Refused(
        504, f"the backend did not answer the WebSocket upgrade within {target.handshake_timeout:g} s"
    )


async def _cancel_when_client_leaves(receive: Receive, client: _Client, scope: trio.CancelScope) -> None:
    # Before the client is accepted, the only message that can come is its disconnect.
    # (Hypercorn's receive is a memory channel's: cancelling it loses nothing.)
    message = await receive()
    if message["type"] == "websocket.disconnect":
        client.disconnected = True
        scope.cancel()


def _split_host(target: WebSocketTarget) -> tuple[str, Headers]:
    """The Host to send (the client's, or its override) and the other headers.

    Backends such as Jupyter's compare the Origin with the Host they are given, so the
    client's own Host is kept rather than the backend's address. Names go out in canonical
    case, as for HTTP requests.
    """
    host = header_value(target.headers, b"host")
    others = [(canonical_name(name), value) for name, value in target.headers if name != b"host"]
    if host is not None:
        return host.decode("latin-1"), others
    backend = target.backend
    return ("localhost" if backend.unix_socket else f"{backend.host}:{backend.port}"), others


def _cookies(handshake_headers: tuple[tuple[bytes, bytes], ...]) -> Headers:
    # The backend's other handshake headers describe its own hop (or Hypercorn sets them).
    return [(name, value) for name, value in handshake_headers if name.lower() == b"set-cookie"]


async def _client_to_backend(
    receive: Receive, backend: WebSocketConnection, client: _Client, target: WebSocketTarget
) -> None:
    on_activity = target.on_activity
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            client.disconnected = True
            code, reason = close_for_backend(message)
            with trio.move_on_after(target.close_timeout):
                await backend.aclose(code, reason)
            return
        data = message.get("bytes")
        if data is None:
            data = message.get("text") or ""
        if len(data) > target.max_message_size:
            await client.close(MESSAGE_TOO_BIG, f"message over {target.max_message_size} bytes")
            with trio.move_on_after(target.close_timeout):
                await backend.aclose(GOING_AWAY, "the client sent a message over the size limit")
            return
        if on_activity is not None:
            on_activity()
        try:
            await backend.send_message(data)
        except ConnectionClosed:
            await trio.sleep_forever()  # the other pump passes the backend's close on, then ends both


async def _backend_to_client(
    backend: WebSocketConnection, client: _Client, target: WebSocketTarget, session: trio.CancelScope
) -> None:
    on_activity = target.on_activity
    try:
        while True:
            message = await backend.get_message()
            if on_activity is not None:
                on_activity()
            await client.send_message(message)
    except ConnectionClosed as closed:
        if client.disconnected:
            return  # our own close after the client left; its pump finishes the handshake
        code, reason = close_for_client(closed.reason)
        await client.close(code, reason)
        session.cancel()


def close_for_client(reason: CloseReason | None) -> tuple[int, str]:
    """The close code and reason to send the client when the backend's side closed."""
    if reason is None or reason.code in (ABNORMAL_CLOSURE, TLS_HANDSHAKE):
        return INTERNAL_ERROR, "the backend closed the connection abruptly"
    if reason.code == NO_STATUS:
        return NORMAL_CLOSURE, ""
    return reason.code, reason.reason or ""


def close_for_backend(message: dict[str, Any]) -> tuple[int, str | None]:
    """The close code and reason to send the backend when the client's side closed.

    Hypercorn (up to at least 0.18, pgjones/hypercorn#127) reports every client closure as
    1006, losing the client's code; a real code is passed on should it ever arrive.
    """
    code = int(message.get("code") or ABNORMAL_CLOSURE)
    if code in _UNSENDABLE:
        return GOING_AWAY, None
    return code, message.get("reason") or None


async def _close_backend(backend: WebSocketConnection, target: WebSocketTarget) -> None:
    with trio.move_on_after(target.close_timeout):
        await backend.aclose(keepalive.GOING_AWAY, keepalive.BACKEND_REASON)


# -- keepalive -----------------------------------------------------------------------------


def _start_keepalive(
    nursery: trio.Nursery, client: _Client, target: WebSocketTarget, end_backend: Callable[[], Awaitable[None]]
) -> None:
    control = client.scope.get(WEBSOCKET_CONTROL)
    if target.keepalive is None or control is None:
        return
    nursery.start_soon(_keep_alive, control, client, target, end_backend, nursery.cancel_scope)


async def _keep_alive(
    control: WebSocketControl,
    client: _Client,
    target: WebSocketTarget,
    end_backend: Callable[[], Awaitable[None]],
    session: trio.CancelScope,
) -> None:
    """Ping the client when it got nothing for ``target.keepalive`` s; close it if it stays silent."""
    assert target.keepalive is not None
    state = keepalive.Keepalive(target.keepalive, trio.current_time())

    def on_pong(payload: bytes) -> None:
        if payload == state.payload:
            state.answered()

    control.on_pong = on_pong
    while not client.closed:
        await trio.sleep_until(state.next_check(trio.current_time()))
        now = trio.current_time()
        state.last_to_client = max(state.last_to_client, client.sent_at)
        state.last_from_client = max(state.last_from_client, control.last_received)
        action = state.check(now)
        if action is keepalive.Action.PING and client.sending:
            continue  # a message still on its way to a slow client: the ping waits for it
        if action is keepalive.Action.PING:
            state.pinged(now)
            with trio.move_on_after(state.interval):  # a client that takes nothing has gone too
                if not await control.ping(state.payload):
                    return
                continue
            action = state.check(state.deadline())
        if action is keepalive.Action.EXPIRED:
            log.info(
                "%s: WebSocket client silent for %g s after a keepalive ping: closing it with 1011",
                target.server,
                state.interval,
            )
            with trio.move_on_after(target.close_timeout):
                await client.close(keepalive.INTERNAL_ERROR, keepalive.CLIENT_REASON)
            await end_backend()
            session.cancel()
            return


# -- WebSocket to raw socket ---------------------------------------------------------------


async def _relay_raw(receive: Receive, client: _Client, target: WebSocketTarget) -> None:
    stream = await _connect(target)
    try:
        await client.accept(None, [])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_raw_to_client, stream, client, target, nursery.cancel_scope)
            _start_keepalive(nursery, client, target, stream.aclose)
            await _client_to_raw(receive, stream, client, target)
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def _client_to_raw(
    receive: Receive, stream: BackendStream, client: _Client, target: WebSocketTarget
) -> None:
    on_activity = target.on_activity
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            client.disconnected = True
            return
        data = message.get("bytes")
        if data is None:
            data = (message.get("text") or "").encode("utf-8")
        if len(data) > target.max_message_size:
            await client.close(MESSAGE_TOO_BIG, f"message over {target.max_message_size} bytes")
            return
        if on_activity is not None:
            on_activity()
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await client.close(INTERNAL_ERROR, "the backend connection broke")
            return


async def _raw_to_client(
    stream: BackendStream, client: _Client, target: WebSocketTarget, session: trio.CancelScope
) -> None:
    on_activity = target.on_activity
    while True:
        try:
            data = await stream.receive_some(RAW_READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await client.close(INTERNAL_ERROR, "the backend connection broke")
            break
        if not data:
            await client.close(NORMAL_CLOSURE, "the backend closed the connection")
            break
        if on_activity is not None:
            on_activity()
        await client.send_message(bytes(data))
    session.cancel()
