"""The streaming HTTP relay: ASGI request in, HTTP/1.1 over pooled trio sockets to the backend.

This is the per-request hot path, so it speaks HTTP/1.1 itself (:mod:`.http1`) instead of going
through httpx: one pooled keep-alive connection per request in flight, bodies passed on piece by
piece with backpressure on both sides, nothing buffered whole unless a ``rewrite_response``
needs the body.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from ..backend import Backend, connect
from .headers import REDIRECT_CODES, Headers, rewrite_location, strip_hop_by_hop
from .http1 import LAST_CHUNK, ProtocolError, ResponseReader, encode_chunk, encode_request_head
from .rewrite import RewriteContext, apply_rewrites

log = logging.getLogger("trioproxy.relay")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

FIRST_READ = 65536
LARGEST_READ = 1 << 20
MAX_IDLE_PER_BACKEND = 64
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


class BackendError(Exception):
    """The backend could not be reached or broke off before a response began (502)."""

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent  # the request (or part of it) may have reached the backend


# Methods a backend may receive twice without harm (RFC 9110 §9.2.2): only these are sent
# again after a backend broke off having perhaps seen them.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# How many times a request waits for a replaced backend process before giving up.
MAX_RECOVERIES = 2

Recover = Callable[[], Awaitable[Backend | None]]


class _StaleConnection(Exception):
    """A pooled connection the backend had already closed; retried on a fresh one."""


class BackendConnection:
    __slots__ = ("backend", "stream")

    def __init__(self, backend: Backend, stream: trio.SocketStream) -> None:
        self.backend = backend
        self.stream = stream

    def close(self) -> None:
        # A socket close needs no waiting; doing it synchronously keeps it out of cancellation.
        self.stream.socket.close()


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
            raise BackendError(f"cannot connect to {backend.describe()}: {_reason(exc)}", sent=False) from None
        return BackendConnection(backend, stream), False

    def release(self, connection: BackendConnection) -> None:
        """Keep a connection whose last exchange ended cleanly for the next request."""
        idle = self._idle.setdefault(connection.backend, [])
        if len(idle) < self._max_idle:
            idle.append(connection)
        else:
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
    rewrite_context: Callable[[], RewriteContext] | None = None  # built only when rewriting
    request_host: str | None = None  # the client's Host header, for Location rewriting
    on_bytes: Callable[[int, int], None] | None = None  # (sent to backend, received) counters


def _request_framing(headers: Headers, method: bytes, body: bytes, more_body: bool) -> tuple[Headers, bool]:
    """Headers framing the request body as the client did (or as it must), and whether chunked."""
    if any(name == b"content-length" for name, _ in headers):
        return headers, False
    if more_body:
        return headers + [(b"transfer-encoding", b"chunked")], True
    if body or method in (b"POST", b"PUT", b"PATCH"):
        return headers + [(b"content-length", str(len(body)).encode())], False
    return headers, False


class _Exchange:
    """One request and its response on one backend connection."""

    def __init__(
        self,
        connection: BackendConnection,
        pool: ConnectionPool,
        target: RelayTarget,
        send: Send,
        receive: Receive,
        head_request: bool,
        reused: bool,
    ) -> None:
        self.connection = connection
        self.pool = pool
        self.target = target
        self.send = send
        self.receive = receive
        self.reader = ResponseReader(head_request)
        self.reused = reused
        self.request_sent = False  # the whole request, body included, went out
        self.released = False
        self.started = False  # the client's response has begun
        self.discard_upload = False  # drop the rest of the client's body

    def finish(self) -> None:
        """Return the connection to the pool if it can carry another request.

        Called as soon as the backend's response is complete and before its last part goes
        to the client, so the client's next request finds the connection idle.
        """
        if not self.released and self.request_sent and self.reader.reusable:
            self.released = True
            self.pool.release(self.connection)

    async def read_more(self, size: int) -> bool:
        """Read and parse more of the response; False when the backend broke it off."""
        try:
            data = await self.connection.stream.receive_some(size)
        except _BROKEN:
            data = b""
        try:
            if data:
                self.reader.feed(data)
            else:
                self.reader.feed_eof()
        except ProtocolError as exc:
            if not self.reader.headers_done:
                # A pooled connection that the backend closed, or that holds leftovers of
                # a previous response (a body sent with a 204), is retried on a fresh one.
                if self.reused:
                    raise _StaleConnection() from exc
                raise BackendError(str(exc)) from None
            log.warning("%s: %s", self.target.server, exc)
            return False
        return True


async def relay_http(
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    target: RelayTarget,
    pool: ConnectionPool,
    recover: Recover | None = None,
) -> None:
    """Relay one HTTP request and its response.

    Raises BackendError if no response could be had (the caller answers 502). Once the
    response has begun, a broken backend ends the client's response as broken (the
    connection closes without the final chunk), never as a short success.

    ``recover``, for a supervised server, is called when the backend could not be reached
    or broke off before answering: it waits for the server's process to be replaced and
    gives its new address (or None if nothing changed). The request is then sent again,
    if that cannot do harm: not yet sent, or idempotent, and its body not streamed.
    """
    method = scope["method"].encode("ascii")
    first = await receive()
    body: bytes = first.get("body", b"")
    more_body: bool = first.get("more_body", False)
    headers, chunked = _request_framing(target.headers, method, body, more_body)
    head = encode_request_head(method, target.target, headers)
    if body:
        head += encode_chunk(body) if chunked else body

    stale_retries = recoveries = 0
    while True:
        try:
            try:
                await _relay_once(pool, target, send, receive, method, head, more_body, chunked)
                return
            except _StaleConnection:
                stale_retries += 1
                if stale_retries == 1 and not more_body:
                    continue  # a pooled connection the backend had closed: once more, afresh
                raise BackendError("the backend closed the connection without answering") from None
        except BackendError as exc:
            replayable = not more_body and (not exc.sent or method in IDEMPOTENT)
            if recover is None or not replayable or recoveries >= MAX_RECOVERIES:
                raise
            backend = await recover()
            if backend is None:
                raise
            log.info("%s: the backend went away (%s); sending the request to its replacement", target.server, exc)
            recoveries += 1
            pool.discard(target.backend)  # idle connections to the process that went away
            target.backend = backend


async def _relay_once(
    pool: ConnectionPool,
    target: RelayTarget,
    send: Send,
    receive: Receive,
    method: bytes,
    head: bytes,
    more_body: bool,
    chunked: bool,
) -> None:
    connection, reused = await pool.acquire(target.backend)
    exchange = _Exchange(connection, pool, target, send, receive, method == b"HEAD", reused)
    try:
        await _run_exchange(exchange, head, more_body, chunked)
    except BaseException:
        if not exchange.released:
            connection.close()
        raise
    if not exchange.released:
        connection.close()  # the exchange did not end cleanly, or the backend closes


async def _run_exchange(exchange: _Exchange, head: bytes, more_body: bool, chunked: bool) -> None:
    stream = exchange.connection.stream
    try:
        await stream.send_all(head)
    except _BROKEN:
        if exchange.reused and not more_body:
            raise _StaleConnection() from None
        raise BackendError("the backend closed the connection") from None
    if not more_body:
        exchange.request_sent = True
        await _respond(exchange, watch_disconnect=True)
        return

    # The client is still sending: pump its body up while the response comes down, so that
    # a backend answering early (413, auth errors) is heard, and both directions stream.
    # The body cannot be replayed, so no retry on a stale connection.
    exchange.reused = False
    failure: BackendError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_upload, exchange, chunked)
        try:
            await _respond(exchange, watch_disconnect=False)
        except BackendError as exc:
            failure = exc  # raised here, outside the nursery, it stays a BackendError
        # Whatever the client still sends is read and dropped: Hypercorn stops reading a
        # connection whose body is not consumed, and never closes it.
        exchange.discard_upload = True
    if failure is not None:
        raise failure
    exchange.finish()  # kept for reuse only if the upload and the response both ended


async def _upload(exchange: _Exchange, chunked: bool) -> None:
    stream = exchange.connection.stream
    on_bytes = exchange.target.on_bytes
    while True:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            exchange.connection.close()
            return
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if not exchange.discard_upload:
            try:
                if chunk:
                    if on_bytes is not None:
                        on_bytes(len(chunk), 0)
                    await stream.send_all(encode_chunk(chunk) if chunked else chunk)
                if not more and chunked:
                    await stream.send_all(LAST_CHUNK)
            except _BROKEN:
                exchange.discard_upload = True  # the backend stopped reading; its answer says why
            else:
                if not more:
                    exchange.request_sent = True
        if not more:
            return


async def _respond(exchange: _Exchange, watch_disconnect: bool) -> None:
    reader = exchange.reader
    while not reader.headers_done:
        if not await exchange.read_more(FIRST_READ):
            raise BackendError("the backend broke off before responding")
    target = exchange.target
    headers = strip_hop_by_hop(reader.headers)
    if target.context_path is not None and reader.status in REDIRECT_CODES:
        headers = _rewrite_redirect(headers, target)
    if target.rewrites and target.rewrite_context is not None:
        await _respond_rewritten(exchange, headers)
        return

    await exchange.send({"type": "http.response.start", "status": reader.status, "headers": headers})
    exchange.started = True
    if reader.complete:  # the whole (small) response came with its head
        body = _joined(reader.take_body())
        if target.on_bytes is not None:
            target.on_bytes(0, len(body))
        exchange.finish()
        await exchange.send({"type": "http.response.body", "body": body, "more_body": False})
        return
    if not watch_disconnect:
        await _stream_body(exchange, lambda: None)
        return

    # Hypercorn drops what is sent to a client that has gone, so a long download would run
    # on; a client that disconnects must close the backend stream. Watching for that costs a
    # task, so it is only started once the body turns out not to be all there already.
    watching = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with watching:
                message = await exchange.receive()
                while message["type"] != "http.disconnect":
                    message = await exchange.receive()
                log.debug("%s: client went away; closing the backend stream", target.server)
                nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        # Sending the last part makes Hypercorn announce http.disconnect and close the
        # client connection from inside that send; the watcher must not cancel it.
        await _stream_body(exchange, watching.cancel)
        watching.cancel()


async def _stream_body(exchange: _Exchange, before_last_part: Callable[[], None]) -> None:
    """Pass the body on as it arrives; leave the response unfinished if the backend breaks."""
    reader = exchange.reader
    on_bytes = exchange.target.on_bytes
    read_size = FIRST_READ
    while True:
        body = _joined(reader.take_body())
        if body and on_bytes is not None:
            on_bytes(0, len(body))
        if reader.complete:
            before_last_part()
            exchange.finish()
            await exchange.send({"type": "http.response.body", "body": body, "more_body": False})
            return
        if body:
            await exchange.send({"type": "http.response.body", "body": body, "more_body": True})
        # Unfinished: Hypercorn then closes the client connection without the final chunk.
        if not await exchange.read_more(read_size):
            return
        if read_size < LARGEST_READ:
            read_size *= 2  # a long body: fewer, larger reads


def _joined(parts: list[bytes]) -> bytes:
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def _rewrite_redirect(headers: Headers, target: RelayTarget) -> Headers:
    assert target.context_path is not None
    backend = target.backend
    backend_hosts = [f"127.0.0.1:{backend.port}", f"localhost:{backend.port}"]
    rewritten: Headers = []
    for name, value in headers:
        if name == b"location":
            value = rewrite_location(
                value.decode("latin-1"),
                context_path=target.context_path,
                request_host=target.request_host,
                backend_hosts=backend_hosts,
            ).encode("latin-1")
        rewritten.append((name, value))
    return rewritten


async def _respond_rewritten(exchange: _Exchange, headers: Headers) -> None:
    """Buffer the body, let the rewrite chain change the response, then send it whole."""
    reader = exchange.reader
    target = exchange.target
    parts: list[bytes] = []
    while True:
        parts += reader.take_body()
        if reader.complete:
            exchange.finish()
            break
        if not await exchange.read_more(LARGEST_READ):
            raise BackendError("the backend broke off mid-response")
    assert target.rewrite_context is not None
    status, headers, body = apply_rewrites(
        target.rewrites, target.rewrite_context(), reader.status, reader.reason, headers, b"".join(parts)
    )
    if target.on_bytes is not None:
        target.on_bytes(0, len(body))
    await exchange.send({"type": "http.response.start", "status": status, "headers": headers})
    exchange.started = True
    await exchange.send({"type": "http.response.body", "body": body, "more_body": False})
