"""The streaming HTTP relay: ASGI request in, h11 over pooled trio sockets to the backend.

This is the per-request hot path, so it talks h11 directly instead of going through httpx:
one pooled keep-alive connection per request in flight, bodies passed on chunk by chunk with
backpressure on both sides, nothing buffered whole unless a ``rewrite_response`` needs the body.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from ..supervisor import Backend, connect
from .headers import REDIRECT_CODES, Headers, rewrite_location, strip_hop_by_hop
from .rewrite import RewriteContext, apply_rewrites

log = logging.getLogger("trioproxy.relay")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

FIRST_READ = 65536
LARGEST_READ = 1 << 20
MAX_IDLE_PER_BACKEND = 64
MAX_RESPONSE_HEAD = 64 * 1024


class BackendError(Exception):
    """The backend could not be reached or broke off before a response began (502)."""


class _StaleConnection(Exception):
    """A pooled connection the backend had already closed; retried on a fresh one."""


class BackendConnection:
    __slots__ = ("backend", "stream", "h11")

    def __init__(self, backend: Backend, stream: trio.SocketStream) -> None:
        self.backend = backend
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)

    def close(self) -> None:
        # A socket close needs no waiting; doing it synchronously keeps it out of cancellation.
        self.stream.socket.close()

    async def next_event(self, read_size: int = FIRST_READ) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.stream.receive_some(read_size))


def _reason(exc: OSError) -> str:
    # trio reports "all attempts failed" for names with several addresses; the cause says why.
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return exc.strerror or str(exc)


class ConnectionPool:
    """Idle keep-alive connections to backends, reused one request at a time."""

    def __init__(self, max_idle: int = MAX_IDLE_PER_BACKEND) -> None:
        self._idle: dict[Backend, list[BackendConnection]] = {}
        self._max_idle = max_idle

    async def acquire(self, backend: Backend) -> tuple[BackendConnection, bool]:
        """A connection to ``backend`` and whether it was reused from the pool."""
        idle = self._idle.get(backend)
        if idle:
            return idle.pop(), True
        try:
            stream = await connect(backend)
        except OSError as exc:
            raise BackendError(f"cannot connect to {backend.describe()}: {_reason(exc)}") from None
        return BackendConnection(backend, stream), False

    def release(self, connection: BackendConnection) -> None:
        """Return a connection whose exchange ended cleanly; close any other."""
        state = connection.h11
        if state.our_state is h11.DONE and state.their_state is h11.DONE:
            state.start_next_cycle()
            idle = self._idle.setdefault(connection.backend, [])
            if len(idle) < self._max_idle:
                idle.append(connection)
                return
        connection.close()

    def discard(self, backend: Backend) -> None:
        """Close idle connections to a backend (its process went away)."""
        for connection in self._idle.pop(backend, []):
            connection.close()

    def close(self) -> None:
        for backend in list(self._idle):
            self.discard(backend)


@dataclass
class RelayTarget:
    """Everything the relay needs to pass one request on."""

    server: str
    backend: Backend
    target: bytes  # path and query as sent to the backend
    headers: Headers  # request headers for the backend, final
    context_path: str | None  # the prefix for Location rewriting; None with absolute_url
    rewrites: list[Callable[..., Any]] = field(default_factory=list)
    rewrite_context: RewriteContext | None = None
    on_bytes: Callable[[int, int], None] | None = None  # (sent to backend, received) counters


def _request_framing(headers: Headers, method: bytes, body: bytes, more_body: bool) -> Headers:
    """Headers that make h11 frame the request body as the client did (or as it must)."""
    has_length = any(name == b"content-length" for name, _ in headers)
    if has_length:
        return headers
    if more_body:
        return headers + [(b"transfer-encoding", b"chunked")]
    if body or method in (b"POST", b"PUT", b"PATCH"):
        return headers + [(b"content-length", str(len(body)).encode())]
    return headers


async def relay_http(
    scope: dict[str, Any], receive: Receive, send: Send, target: RelayTarget, pool: ConnectionPool
) -> None:
    """Relay one HTTP request and its response.

    Raises BackendError if no response could be had (the caller answers 502). Once the
    response has begun, a broken backend ends the client's response as broken (the
    connection closes without the final chunk), never as a short success.
    """
    method = scope["method"].encode("ascii")
    first = await receive()
    body: bytes = first.get("body", b"")
    more_body: bool = first.get("more_body", False)
    headers = _request_framing(target.headers, method, body, more_body)
    request = h11.Request(method=method, target=target.target, headers=headers)

    for attempt in (1, 2):
        connection, reused = await pool.acquire(target.backend)
        released = False

        def finish() -> None:
            # Called as soon as the backend's response is complete and before its last part
            # goes to the client, so the client's next request finds the connection idle.
            nonlocal released
            if not released:
                released = True
                pool.release(connection)

        try:
            await _exchange(connection, request, body, more_body, receive, send, target, reused, finish)
        except _StaleConnection:
            connection.close()
            if attempt == 2:
                raise BackendError("the backend closed the connection without answering") from None
            continue
        except BaseException:
            if not released:
                connection.close()
            raise
        if not released:
            connection.close()  # the exchange did not end cleanly
        return


async def _exchange(
    connection: BackendConnection,
    request: h11.Request,
    body: bytes,
    more_body: bool,
    receive: Receive,
    send: Send,
    target: RelayTarget,
    reused: bool,
    finish: Callable[[], None],
) -> None:
    conn = connection.h11
    data = conn.send(request) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    if not more_body:
        data += conn.send(h11.EndOfMessage()) or b""
    try:
        await connection.stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        if reused and not more_body:
            raise _StaleConnection() from exc
        raise BackendError("the backend closed the connection") from None

    if not more_body:
        await _respond(connection, send, receive, target, reused, finish, request_done=True)
        return

    # The client is still sending: pump its body up while the response comes down, so that
    # a backend answering early (413, auth errors) is heard, and both directions stream.
    async with trio.open_nursery() as nursery:
        upload = trio.CancelScope()
        nursery.start_soon(_upload, connection, receive, upload, target.on_bytes)
        await _respond(connection, send, receive, target, False, lambda: None, request_done=False)
        upload.cancel()
    finish()  # kept for reuse only if both the upload and the response ended cleanly


async def _upload(
    connection: BackendConnection,
    receive: Receive,
    scope: trio.CancelScope,
    on_bytes: Callable[[int, int], None] | None,
) -> None:
    conn = connection.h11
    with scope:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                connection.close()
                return
            chunk = message.get("body", b"")
            if chunk:
                if on_bytes is not None:
                    on_bytes(len(chunk), 0)
                await connection.stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
            if not message.get("more_body", False):
                await connection.stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                return


async def _read_response_head(connection: BackendConnection, reused: bool) -> h11.Response:
    try:
        while True:
            event = await connection.next_event()
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and the like are for the backend and us only
            if isinstance(event, h11.Response):
                return event
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError) as exc:
        if reused and connection.h11.their_state in (h11.SEND_RESPONSE, h11.ERROR):
            raise _StaleConnection() from exc
        raise BackendError(f"the backend broke off before responding ({exc})") from None


async def _respond(
    connection: BackendConnection,
    send: Send,
    receive: Receive,
    target: RelayTarget,
    reused: bool,
    finish: Callable[[], None],
    request_done: bool,
) -> None:
    response = await _read_response_head(connection, reused)
    headers = strip_hop_by_hop(response.headers)
    status = response.status_code
    if target.context_path is not None and status in REDIRECT_CODES:
        headers = _rewrite_redirect(headers, target)
    if target.rewrites and target.rewrite_context is not None:
        await _respond_rewritten(connection, send, target, status, response.reason, headers, finish)
        return

    await send({"type": "http.response.start", "status": status, "headers": headers})
    if request_done:
        await _stream_body_until_disconnect(connection, send, receive, target.on_bytes, finish)
    else:
        # While the upload may still run, the connection is not reusable before it ends.
        await _stream_body(connection, send, target.on_bytes, lambda: None)


async def _stream_body_until_disconnect(
    connection: BackendConnection,
    send: Send,
    receive: Receive,
    on_bytes: Callable[[int, int], None] | None,
    finish: Callable[[], None],
) -> None:
    # Hypercorn drops what is sent to a client that has gone, so a long download would run
    # on; a client that disconnects must close the backend stream. Watching for that costs a
    # task, so it is only started once the body turns out not to be all there already.
    event = connection.h11.next_event()
    if isinstance(event, h11.EndOfMessage):
        finish()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if isinstance(event, h11.Data):
        following = connection.h11.next_event()
        if isinstance(following, h11.EndOfMessage):
            if on_bytes is not None:
                on_bytes(0, len(event.data))
            finish()
            await send({"type": "http.response.body", "body": bytes(event.data), "more_body": False})
            return
        pending = [event, following]
    else:
        pending = [event]

    gone = False
    watching = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal gone
            with watching:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                nursery.cancel_scope.cancel()

        def before_last_part() -> None:
            # Sending the last part makes Hypercorn announce http.disconnect and close the
            # client connection from inside that send; the watcher must not cancel it.
            watching.cancel()
            finish()

        nursery.start_soon(watch)
        await _stream_body(connection, send, on_bytes, before_last_part, pending)
        watching.cancel()
    if gone:
        # relay_http closes the connection: its response never finished.
        log.debug("client went away; closing the backend stream")


async def _stream_body(
    connection: BackendConnection,
    send: Send,
    on_bytes: Callable[[int, int], None] | None,
    finish: Callable[[], None],
    pending_events: list[Any] | None = None,
) -> None:
    """Pass the response body on as it arrives; end it as broken if the backend breaks."""
    conn = connection.h11
    queued = list(pending_events or [])
    held: bytes | None = None  # sent once we know whether more follows
    read_size = FIRST_READ
    while True:
        if queued:
            event = queued.pop(0)
        else:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                event = None
        if event is h11.NEED_DATA:
            if held is not None:
                await send({"type": "http.response.body", "body": held, "more_body": True})
                held = None
            try:
                chunk = await connection.stream.receive_some(read_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if len(chunk) == read_size and read_size < LARGEST_READ:
                read_size *= 2  # a large body: fewer, bigger reads
            conn.receive_data(chunk)
            continue
        if isinstance(event, h11.Data):
            if held is not None:
                await send({"type": "http.response.body", "body": held, "more_body": True})
            held = bytes(event.data)
            if on_bytes is not None:
                on_bytes(0, len(held))
            continue
        if isinstance(event, h11.EndOfMessage):
            finish()
            await send({"type": "http.response.body", "body": held or b"", "more_body": False})
            return
        # The backend closed or sent garbage mid-body: leave the response unfinished so
        # the client sees a broken transfer. Hypercorn closes the connection for us.
        if held is not None:
            await send({"type": "http.response.body", "body": held, "more_body": True})
        connection.close()
        log.warning("backend %s broke off mid-response", connection.backend.describe())
        return


def _rewrite_redirect(headers: Headers, target: RelayTarget) -> Headers:
    assert target.context_path is not None
    context = target.rewrite_context
    request_host = context.host_header if context is not None else None
    backend = target.backend
    backend_hosts = [f"127.0.0.1:{backend.port}", f"localhost:{backend.port}"]
    rewritten: Headers = []
    for name, value in headers:
        if name == b"location":
            value = rewrite_location(
                value.decode("latin-1"),
                context_path=target.context_path,
                request_host=request_host,
                backend_hosts=backend_hosts,
            ).encode("latin-1")
        rewritten.append((name, value))
    return rewritten


async def _respond_rewritten(
    connection: BackendConnection,
    send: Send,
    target: RelayTarget,
    status: int,
    reason: bytes,
    headers: Headers,
    finish: Callable[[], None],
) -> None:
    """Buffer the body, let the rewrite chain change the response, then send it whole."""
    parts: list[bytes] = []
    while True:
        try:
            event = await connection.next_event(LARGEST_READ)
        except (trio.BrokenResourceError, h11.RemoteProtocolError) as exc:
            raise BackendError(f"the backend broke off mid-response ({exc})") from None
        if isinstance(event, h11.Data):
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            finish()
            break
        else:
            raise BackendError("the backend broke off mid-response")
    assert target.rewrite_context is not None
    status, headers, body = apply_rewrites(
        target.rewrites, target.rewrite_context, status, reason, headers, b"".join(parts)
    )
    if target.on_bytes is not None:
        target.on_bytes(0, len(body))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
