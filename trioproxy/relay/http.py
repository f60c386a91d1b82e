"""The streaming HTTP relay: ASGI request in, HTTP/1.1 to the backend over its client's pool.

This is the per-request hot path, so it speaks HTTP/1.1 itself (:mod:`.http1`) instead of going
through httpx: one pooled keep-alive connection per request in flight, bodies passed on piece by
piece with backpressure on both sides, nothing buffered whole unless a ``rewrite_response``
needs the body.

Rules (each has a real-socket test):

- The backend gets a body framed by what the relay writes (:mod:`.framing`); ambiguous
  client framing was refused before a request gets here.
- A request is sent again only if none of it was written, or if its method is idempotent and
  its body was not streamed. A pooled connection that breaks before the response head is
  retried once on a fresh connection (same rule); if the process behind the client went away,
  the request waits for its replacement (``RelayTarget.replacement``), up to the server's
  ``timeout``.
- The response head must come within ``response_timeout`` of the request's end (504).
- A client that leaves at any moment closes its backend connection at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..backend import BackendClient, BackendConnection, BackendError
from ..backend_tls import broken_by_tls, refused_after_handshake
from ..listener import client_gone
from .framing import body_framing
from .headers import REDIRECT_CODES, Headers, rewrite_location, strip_hop_by_hop
from .http1 import LAST_CHUNK, ProtocolError, ResponseReader, encode_chunk, encode_request_head
from .rewrite import RewriteContext, apply_rewrites

log = logging.getLogger("trioproxy.relay")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
# Given the client whose process went away, the client of its replacement (waiting for it),
# or None if that process is still the one serving.
Replacement = Callable[[BackendClient], Awaitable[BackendClient | None]]

FIRST_READ = 65536
LARGEST_READ = 1 << 20
# Most responses are complete this soon; only a slower one gets a task watching the client.
QUICK_ANSWER = 0.05
# The largest body of known length whose head is held back until it is all there (within
# QUICK_ANSWER).
PREFETCH = 256 * 1024
# How often that task looks at the client's socket.
CLIENT_POLL = 0.2
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)

# Methods a backend may receive twice without harm (RFC 9110 §9.2.2): only these are sent
# again after a backend broke off having perhaps seen them.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


@dataclass
class RelayTarget:
    """Everything the relay needs to pass one request on."""

    server: str
    client: BackendClient
    target: bytes  # path and query as sent to the backend
    headers: Headers  # request headers for the backend, final but for the body's framing
    context_path: str | None  # the prefix for Location rewriting; None with absolute_url
    declared_length: int | None = None  # the client's Content-Length, checked
    rewrites: list[Callable[..., Any]] = field(default_factory=list)
    rewrite_context: Callable[[], RewriteContext] | None = None  # built only when rewriting
    request_host: str | None = None  # the client's Host header, for Location rewriting
    on_bytes: Callable[[int, int], None] | None = None  # (sent to backend, received) counters
    replacement: Replacement | None = None  # for a supervised server
    client_socket: Any = None  # the client connection's socket, polled to notice it leaving


async def relay_http(scope: dict[str, Any], receive: Receive, send: Send, target: RelayTarget) -> None:
    """Relay one HTTP request and its response.

    Raises BackendError if no response could be had (the caller answers with its status).
    Once the response has begun, a broken backend ends the client's response as broken (the
    connection closes without the final chunk), never as a short success.
    """
    method = scope["method"].encode("ascii")
    first = await receive()
    body: bytes = first.get("body", b"")
    more_body: bool = first.get("more_body", False)
    framing, chunked = body_framing(method, target.declared_length, body, more_body)
    headers = target.headers if framing is None else [*target.headers, framing]
    head = encode_request_head(method, target.target, headers)
    if body:
        head += encode_chunk(body) if chunked else body

    fresh = False
    while True:
        try:
            await _relay_once(target, send, receive, method, head, more_body, chunked, fresh)
            return
        except BackendError as exc:
            if exc.sent and (more_body or method not in IDEMPOTENT):
                raise
            if exc.reused and not fresh:
                fresh = True  # a pooled connection that broke: once more on a new one
                continue
            replacement = await target.replacement(target.client) if target.replacement else None
            if replacement is None:
                raise
            log.info("%s: the backend went away (%s); sending the request to its replacement", target.server, exc)
            target.client = replacement
            fresh = False


async def _relay_once(
    target: RelayTarget,
    send: Send,
    receive: Receive,
    method: bytes,
    head: bytes,
    more_body: bool,
    chunked: bool,
    fresh: bool,
) -> None:
    connection, reused = await target.client.acquire(fresh)
    exchange = _Exchange(connection, target, send, receive, method == b"HEAD", reused)
    try:
        await _run_exchange(exchange, head, more_body, chunked)
    finally:
        if not exchange.released:
            connection.close()  # the exchange did not end cleanly, or the backend closes


class _Exchange:
    """One request and its response on one backend connection."""

    def __init__(
        self,
        connection: BackendConnection,
        target: RelayTarget,
        send: Send,
        receive: Receive,
        head_request: bool,
        reused: bool,
    ) -> None:
        self.connection = connection
        self.target = target
        self.send = send
        self.receive = receive
        self.reader = ResponseReader(head_request)
        self.reused = reused
        self.request_sent = False  # the whole request, body included, went out
        self.released = False
        self.started = False  # the client's response has begun
        self.discard_upload = False  # drop the rest of the client's body
        # The response head is due response_timeout after the request's end.
        self.head_deadline = float("inf")
        self.broken_by: str | None = None  # what broke the connection, when TLS says
        self.head_scope: trio.CancelScope | None = None

    def request_done(self) -> None:
        self.request_sent = True
        self.head_deadline = trio.current_time() + self.target.client.options.response_timeout
        if self.head_scope is not None:
            self.head_scope.deadline = self.head_deadline

    def finish(self) -> None:
        """Return the connection to the pool if it can carry another request.

        Called as soon as the backend's response is complete and before its last part goes
        to the client, so the client's next request finds the connection idle.
        """
        if not self.released and self.request_sent and self.reader.reusable:
            self.released = True
            self.connection.client.release(self.connection)

    def broke_off(self, message: str) -> BackendError:
        if self.broken_by is not None:
            message = f"{message} ({self.broken_by})"
        return BackendError(message, reused=self.reused)

    async def read_more(self, size: int) -> bool:
        """Read and parse more of the response; False when the backend broke it off."""
        try:
            data = await self.connection.stream.receive_some(size)
        except _BROKEN as exc:
            self.broken_by = broken_by_tls(exc)
            data = b""
        try:
            if data:
                self.reader.feed(data)
            else:
                self.reader.feed_eof()
        except ProtocolError as exc:
            if not self.reader.headers_done:
                raise self.broke_off(str(exc)) from None
            log.warning("%s: %s", self.target.server, exc)
            return False
        return True

    async def read_head(self, bounded: bool = True) -> None:
        """Read up to the end of the response head; BackendError if it breaks or is late.

        ``bounded=False`` leaves the response_timeout to a caller whose own deadline is sooner.
        """
        if not bounded:
            while not self.reader.headers_done:
                if not await self.read_more(FIRST_READ):
                    raise self.broke_off("the backend broke off before responding")
            return
        with trio.CancelScope(deadline=self.head_deadline) as scope:
            self.head_scope = scope
            while not self.reader.headers_done:
                if not await self.read_more(FIRST_READ):
                    raise self.broke_off("the backend broke off before responding")
        self.head_scope = None
        if not self.reader.headers_done:
            timeout = self.target.client.options.response_timeout
            raise BackendError(
                f"{self.target.server} did not answer within {timeout:g} s (response_timeout)", status=504
            )


async def _run_exchange(exchange: _Exchange, head: bytes, more_body: bool, chunked: bool) -> None:
    stream = exchange.connection.stream
    try:
        await stream.send_all(head)
    except _BROKEN:
        tls = "" if exchange.reused else refused_after_handshake(stream)
        raise exchange.broke_off("the backend closed the connection" + tls) from None
    if not more_body:
        exchange.request_done()
        await _respond_watching(exchange)
        return

    # The client is still sending: pump its body up while the response comes down, so that
    # a backend answering early (413, auth errors) is heard, and both directions stream.
    # The body cannot be replayed, so a failure is never retried.
    failure: BackendError | None = None
    async with trio.open_nursery() as nursery:
        watching = trio.CancelScope()
        nursery.start_soon(_upload, exchange, chunked, watching, nursery.cancel_scope)
        try:
            await exchange.read_head()
            await _respond(exchange, watching.cancel)
        except BackendError as exc:
            failure = exc  # raised here, outside the nursery, it stays a BackendError
        # Whatever the client still sends is read and dropped: Hypercorn stops reading a
        # connection whose body is not consumed, and never closes it.
        exchange.discard_upload = True
        watching.cancel()
    if failure is not None:
        raise failure
    exchange.finish()  # kept for reuse only if the upload and the response both ended


async def _upload(
    exchange: _Exchange, chunked: bool, watching: trio.CancelScope, exchange_scope: trio.CancelScope
) -> None:
    """Send the client's body up; then watch for the client leaving until the response ends."""
    stream = exchange.connection.stream
    on_bytes = exchange.target.on_bytes
    while True:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            log.debug("%s: client went away mid-upload; closing the backend stream", exchange.target.server)
            exchange_scope.cancel()
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
                    exchange.request_done()
        if not more:
            break
    with watching:
        await _watch_disconnect(exchange, exchange_scope)


async def _watch_disconnect(exchange: _Exchange, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client leaves.

    Hypercorn reads nothing from an HTTP/1.1 connection while its request is being answered,
    so no ``http.disconnect`` comes until it writes to the dead connection, which a backend
    that has not answered yet never makes it do; the socket itself tells (see
    :func:`trioproxy.listener.client_gone`).
    """
    sock = exchange.target.client_socket
    if sock is not None:
        while not client_gone(sock):  # noqa: ASYNC110 - a socket poll, no event to wait on
            await trio.sleep(CLIENT_POLL)
    else:
        message = await exchange.receive()
        while message["type"] != "http.disconnect":
            message = await exchange.receive()
    log.debug("%s: client went away; closing the backend stream", exchange.target.server)
    scope.cancel()


async def _respond_watching(exchange: _Exchange) -> None:
    """Read the response and pass it on, closing the backend stream if the client leaves.

    Hypercorn drops what is sent to a client that has gone, and a backend may take its time
    to answer, so a client that disconnects must be noticed; watching costs a task, so it is
    only started for a response not complete within QUICK_ANSWER.
    """
    reader = exchange.reader
    quick = trio.current_time() + QUICK_ANSWER
    with trio.move_on_at(quick):
        await exchange.read_head(bounded=exchange.head_deadline < quick)
        # The head of a small response of known length is held back while its body comes
        # quickly: a backend that dies now has sent nothing the client saw, so the request
        # may still go to its replacement. (A stream, such as server-sent events, goes on at
        # once: its first event must not wait.)
        held = exchange.target.rewrites or (reader.length is not None and reader.length <= PREFETCH)
        while not reader.complete and held:
            if not await exchange.read_more(FIRST_READ):
                raise exchange.broke_off("the backend broke off mid-response")
    if reader.complete:
        await _respond(exchange, lambda: None)
        return
    failure: BackendError | None = None
    async with trio.open_nursery() as nursery:
        watching = trio.CancelScope()

        async def watch() -> None:
            with watching:
                await _watch_disconnect(exchange, nursery.cancel_scope)

        nursery.start_soon(watch)
        try:
            await exchange.read_head()
            # Sending the last part makes Hypercorn announce http.disconnect and close the
            # client connection from inside that send; the watcher must not cancel it.
            await _respond(exchange, watching.cancel)
        except BackendError as exc:
            failure = exc  # raised here, outside the nursery, it stays a BackendError
        watching.cancel()
    if failure is not None:
        raise failure


async def _respond(exchange: _Exchange, before_last_part: Callable[[], None]) -> None:
    """Pass on a response whose head is in."""
    reader = exchange.reader
    target = exchange.target
    headers = strip_hop_by_hop(reader.headers)
    if target.context_path is not None and reader.status in REDIRECT_CODES:
        headers = _rewrite_redirect(headers, target)
    if target.rewrites and target.rewrite_context is not None:
        await _respond_rewritten(exchange, headers)
        return

    await exchange.send({"type": "http.response.start", "status": reader.status, "headers": headers})
    exchange.started = True
    read_size = FIRST_READ
    while True:
        body = _joined(reader.take_body())
        if body and target.on_bytes is not None:
            target.on_bytes(0, len(body))
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
    backend = target.client.backend
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
