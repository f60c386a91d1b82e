"""Running the app: supervisors, the listener (Hypercorn, plus the WebSocket fast path), and the
order of a graceful shutdown.

:func:`run_app` nests the lifetimes: the supervisors outlive the HTTP server, so the requests
still being answered when a shutdown begins keep their backends. A shutdown (``shutdown`` set)
stops accepting connections, closes idle keep-alive connections, closes WebSockets with 1001
(going away), gives in-flight HTTP requests up to Hypercorn's ``graceful_timeout`` to finish,
and only then stops the servers. Cancelling :func:`run_app` instead stops everything at once.

Connections are accepted by :mod:`trioproxy.listener`; what comes through Hypercorn passes the
ASGI middlewares here (the headers every answer carries, the head limit, the WebSocket closer)
before the app.
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from functools import partial
from typing import Any, cast

import trio

GOING_AWAY = 1001


async def run_app(
    app: Any,
    hypercorn_config: Any,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` (from :func:`trioproxy.app.create_app`) until ``shutdown`` is set or the
    call is cancelled.

    Reports the bound addresses once it listens. Once ``shutdown`` is set it shuts down
    gracefully (see the module's docstring) and returns; on cancellation Hypercorn stops and
    every server is stopped concurrently. Pooled backend connections are closed either way.
    """
    from .fastpath import WebSocketFastPath

    dispatcher = app.extensions["trioproxy"]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.supervisors.run)
            for service in dispatcher.services:
                await nursery.start(service)
            binds = await nursery.start(
                _serve_then_stop,
                app,
                hypercorn_config,
                shutdown,
                WebSocketFastPath(dispatcher),
                nursery.cancel_scope,
                dispatcher.settings.response_headers,
            )
            task_status.started(binds)
    finally:
        dispatcher.proxy_targets.close()


async def _serve_then_stop(
    app: Any,
    config: Any,
    shutdown: trio.Event | None,
    fast_path: Any,
    everything: trio.CancelScope,
    response_headers: Sequence[tuple[bytes, bytes]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(
        app,
        config,
        shutdown=shutdown,
        upgrade_handler=fast_path,
        response_headers=response_headers,
        task_status=task_status,
    )
    everything.cancel()  # the HTTP server is done: now the supervisors stop their servers


async def serve_http(
    app: Any,
    config: Any,
    *,
    shutdown: trio.Event | None = None,
    upgrade_handler: Any = None,
    response_headers: Sequence[tuple[bytes, bytes]] = (),
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` with Hypercorn's ``config`` until ``shutdown`` is set, then shut
    down gracefully: stop accepting, close WebSockets with 1001, let the other connections
    finish for up to ``config.graceful_timeout`` seconds, end the ASGI lifespan, return.

    Every answer carries ``response_headers`` (read at each answer, so a list filled later counts).

    Raises OSError if an address cannot be bound.
    """
    from .listener import serve

    websockets = WebSocketCloser(app)
    await serve(
        ResponseHeaders(HeadLimit(websockets, config.h11_max_incomplete_size), response_headers),
        config,
        upgrade_handler=upgrade_handler,
        shutdown_trigger=shutdown.wait if shutdown is not None else None,
        on_shutdown=websockets.close_all,
        task_status=task_status,
    )


_ANSWER_STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.http.response.start"})


class ResponseHeaders:
    """ASGI middleware that adds ``headers`` to every answer: responses, WebSocket accepts and
    refusals, relayed or trioproxy's own. A header of the same name from the app is replaced."""

    def __init__(self, app: Any, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.app = app
        self.headers = headers

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        if not self.headers or scope["type"] == "lifespan":
            return cast(Coroutine[Any, Any, None], self.app(scope, receive, send))  # as HeadLimit
        return cast(Coroutine[Any, Any, None], self.app(scope, receive, partial(self._send, send)))

    async def _send(self, send: Any, message: dict[str, Any]) -> None:
        if message["type"] in _ANSWER_STARTS:
            message = {**message, "headers": with_headers(message.get("headers") or [], self.headers)}
        await send(message)


def with_headers(
    headers: Sequence[tuple[bytes, bytes]], extra: Sequence[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``extra`` added, in place of any of the same names."""
    if not extra:
        return list(headers)
    names = {name.lower() for name, _ in extra}
    return [(name, value) for name, value in headers if name.lower() not in names] + list(extra)


def head_with_headers(head: bytes, extra: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A raw response head (a backend's 101, as it sent it) with ``extra`` added at its end."""
    if not extra or not head.endswith(b"\r\n\r\n"):
        return head
    return head[:-2] + b"".join(name + b": " + value + b"\r\n" for name, value in extra) + b"\r\n"


class HeadLimit:
    """ASGI middleware that answers 431 to a request whose head is larger than ``limit`` bytes.

    Hypercorn's ``h11_max_incomplete_size`` only refuses a head that is still incomplete after
    that many bytes; one that arrives complete within a single read (up to `transport.READ_SIZE`, 256 KiB) passes.
    The head's size is counted here from what h11 parsed, which leaves out only the optional
    whitespace around header values.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        # Not a coroutine of its own (the app's is returned): one frame fewer on every resumption
        # of every request.
        if scope["type"] == "lifespan" or head_size(scope) <= self.limit:
            return cast(Coroutine[Any, Any, None], self.app(scope, receive, send))
        return self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = f"Request header fields too large: the request line and headers exceed {self.limit} bytes.\n"
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(message)).encode())]
        if scope["type"] == "http":
            # The body is left unread: the connection closes after the answer.
            headers.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": 431, "headers": headers})
            await send({"type": "http.response.body", "body": message.encode()})
            return
        await receive()  # websocket.connect
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": 431, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": message.encode()})
        else:
            await send({"type": "websocket.close", "code": 1009})


def head_size(scope: dict[str, Any]) -> int:
    """The size in bytes of the HTTP/1.1 request head that ``scope`` was parsed from."""
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    # "METHOD SP target SP HTTP/1.1 CRLF", each "name: value CRLF", the closing CRLF.
    size = len(scope.get("method", "GET")) + 1 + len(path) + (1 + len(query) if query else 0) + 11
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4
    return size + 2


class WebSocketCloser:
    """ASGI middleware that can close every open WebSocket with 1001 (going away).

    The app sees a ``websocket.disconnect`` with code 1001, as if the client had left, and
    closes its side (the relay passes 1001 on to the backend); the client gets a close frame
    with 1001 instead of a cut connection.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.closing = False
        self._open: set[_GoingAway] = set()

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        if scope["type"] != "websocket":
            return cast(Coroutine[Any, Any, None], self.app(scope, receive, send))  # as HeadLimit
        return self._websocket(scope, receive, send)

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        websocket = _GoingAway(receive, send)
        if self.closing:
            websocket.go_away()
        self._open.add(websocket)
        try:
            await self.app(scope, websocket.receive, websocket.send)
        finally:
            self._open.discard(websocket)

    def close_all(self) -> None:
        self.closing = True
        for websocket in self._open:
            websocket.go_away()


class _GoingAway:
    """One WebSocket's receive and send, which :meth:`go_away` ends with 1001."""

    def __init__(self, receive: Any, send: Any) -> None:
        self._receive = receive
        self._send = send
        self._accepted = False
        self._closed = False  # the client was sent a close (or an HTTP refusal)
        self._gone = False  # ... and that close was our 1001
        self._going = False
        self._receiving: trio.CancelScope | None = None

    def go_away(self) -> None:
        self._going = True
        if self._receiving is not None:
            self._receiving.cancel()

    async def receive(self) -> dict[str, Any]:
        if not self._going:
            # Hypercorn's receive is a memory channel's: cancelling it loses no message.
            with trio.CancelScope() as self._receiving:
                try:
                    return await self._receive()
                finally:
                    self._receiving = None
        if self._accepted and not self._closed:
            await self.send({"type": "websocket.close", "code": GOING_AWAY, "reason": "server shutting down"})
            self._gone = True
        return {"type": "websocket.disconnect", "code": GOING_AWAY}

    async def send(self, message: dict[str, Any]) -> None:
        if self._gone:
            return  # after our close the client hears nothing more (the app's close included)
        kind = message["type"]
        if kind == "websocket.accept":
            self._accepted = True
        elif kind in ("websocket.close", "websocket.http.response.start"):
            self._closed = True
        await self._send(message)
