"""Running the app: supervisors, Hypercorn's connection handling in our own serve loop, and the
order of a graceful shutdown.

:func:`run_app` nests the lifetimes: the supervisors outlive the HTTP server, so the requests
still being answered when a shutdown begins keep their backends. A shutdown (``shutdown`` set)
stops accepting connections, closes idle keep-alive connections, closes WebSockets with 1001
(going away), gives in-flight HTTP requests up to Hypercorn's ``graceful_timeout`` to finish,
and only then stops the servers. Cancelling :func:`run_app` instead stops everything at once.

The serve loop is :func:`hypercorn.trio.serve`'s, minus what trioproxy does not use (QUIC,
statsd, ``max_requests``, the "Running on" log line: the command prints the one URL to open),
so that each connection runs in :class:`_Connection`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import trio
from hypercorn.events import Closed, Updated
from hypercorn.trio.tcp_server import TCPServer

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
    dispatcher = app.extensions["trioproxy"]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.supervisors.run)
            for service in dispatcher.services:
                await nursery.start(service)
            binds = await nursery.start(_serve_then_stop, app, hypercorn_config, shutdown, nursery.cancel_scope)
            task_status.started(binds)
    finally:
        dispatcher.proxy_targets.close()


async def _serve_then_stop(
    app: Any,
    config: Any,
    shutdown: trio.Event | None,
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(app, config, shutdown=shutdown, task_status=task_status)
    everything.cancel()  # the HTTP server is done: now the supervisors stop their servers


async def serve_http(
    app: Any,
    config: Any,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` with Hypercorn's ``config`` until ``shutdown`` is set, then shut
    down gracefully: stop accepting, close WebSockets with 1001, let the other connections
    finish for up to ``config.graceful_timeout`` seconds, end the ASGI lifespan, return.

    Raises OSError if an address cannot be bound.
    """
    from hypercorn.trio.lifespan import Lifespan
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import ConnectionState
    from hypercorn.utils import repr_socket_addr, wrap_app

    websockets = WebSocketCloser(app)
    asgi = wrap_app(cast(Any, HeadLimit(websockets, config.h11_max_incomplete_size)), config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            sockets = config.create_sockets()
            listeners: list[Any] = []
            binds = []
            ssl_context = config.create_ssl_context()
            for sock in sockets.secure_sockets:
                sock.listen(config.backlog)
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                listeners.append(trio.SSLListener(listener, ssl_context, https_compatible=True))
                binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            handler = partial(_Connection, asgi, config, context, ConnectionState(lifespan_state.copy()))
            async with trio.open_nursery() as accepting:
                accepting.start_soon(partial(trio.serve_listeners, handler, listeners, handler_nursery=connections))
                task_status.started(binds)
                if shutdown is None:
                    await trio.sleep_forever()
                await shutdown.wait()
                accepting.cancel_scope.cancel()  # closes the listeners: new connections are refused
            # Idle keep-alive connections close now, busy ones once their response is sent.
            await context.terminated.set()
            websockets.close_all()
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


class _Connection(TCPServer):
    """Hypercorn's handler of one client connection, which lets go of it when the client has.

    Hypercorn runs a keep-alive timer task beside an idle connection and closes the socket only
    once every task of the connection has ended; when the client closes an idle connection, the
    reader stops but the timer runs on, so the socket (a file descriptor, in CLOSE_WAIT) stayed
    open until ``keep_alive_timeout``. Once nothing more can be read, the timer has nothing to
    wait for: stop it. (A request still being answered stopped the timer already; its end
    closes the connection, as the client's side is gone.)
    """

    _client_gone = False

    async def _read_data(self) -> None:
        await super()._read_data()
        self._client_gone = True
        await self.idle_task.stop()

    async def protocol_send(self, event: Any) -> None:
        # A response that ends after the client left would start the timer again.
        if self._client_gone and isinstance(event, Updated) and event.idle:
            event = Closed()
        await super().protocol_send(event)


class HeadLimit:
    """ASGI middleware that answers 431 to a request whose head is larger than ``limit`` bytes.

    Hypercorn's ``h11_max_incomplete_size`` only refuses a head that is still incomplete after
    that many bytes; one that arrives complete within a single read (up to 64 KiB more) passes.
    The head's size is counted here from what h11 parsed, which leaves out only the optional
    whitespace around header values.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or head_size(scope) <= self.limit:
            await self.app(scope, receive, send)
            return
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

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
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
