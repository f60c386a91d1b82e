"""The backend client: everything the relay needs from one backend address.

A :class:`BackendClient` is made for one process (or one ``proxy/<host>:<port>`` target) and
closed, with every idle connection, the moment that process exits or is stopped: a restarted
server keeps its port, and a pooled connection to the old process must never carry a request
meant for the new one. The client owns connecting (with a connect timeout), the pool (a cap on
connections, idle expiry, a liveness check before reuse, as httpcore's ``has_expired()``) and
the translation of connection failures into :class:`BackendError` with the status the client
should see (502 or 504).

Request framing, the replay rule and the exchange itself live in :mod:`trioproxy.relay.http`;
pure header and framing rules in :mod:`trioproxy.relay.framing` and :mod:`.relay.upstream`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import sys
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import trio

from .backend_tls import BackendTLS, TLSFailure

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("trioproxy.backend")


@dataclass(frozen=True)
class Backend:
    """Where a ready server listens."""

    host: str = "127.0.0.1"
    port: int = 0
    unix_socket: str | None = None
    tls: BackendTLS | None = None  # backend_tls: every connection is a TLS one

    def describe(self) -> str:
        return f"unix:{self.unix_socket}" if self.unix_socket else f"{self.host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


@dataclass(frozen=True)
class ClientOptions:
    """Per-backend limits and timeouts (seconds); the defaults are documented in README."""

    connect_timeout: float = 10.0  # to open a connection, waiting for a free slot included
    response_timeout: float = 300.0  # from the end of the request to the response head
    max_connections: int = 100  # open at once, busy and idle (HTTP's pool)
    max_websockets: int = 1000  # WebSocket connections open at once (each holds one for its life)
    pool_idle_timeout: float = 30.0  # an idle pooled connection is closed after this


class BackendError(Exception):
    """The backend could not be reached, or broke off before its response began.

    ``status`` is what the client gets (502, or 504 for a timeout); ``sent`` says whether
    any of the request may have reached the backend, which decides whether it may be sent
    again.
    """

    def __init__(self, message: str, *, sent: bool = True, status: int = 502, reused: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.status = status
        self.reused = reused  # it happened on a connection from the pool


BackendStream = trio.abc.Stream  # a SocketStream, or an SSLStream over one (backend_tls)


async def connect_tcp(backend: Backend) -> trio.SocketStream:
    """A new plain connection to ``backend`` (no TLS); no timeout (callers set one)."""
    if backend.unix_socket:
        return await trio.open_unix_socket(backend.unix_socket)
    return await trio.open_tcp_stream(backend.host, backend.port)


async def connect(backend: Backend) -> BackendStream:
    """A new stream to ``backend``, after its TLS handshake with ``backend_tls``; no timeout
    (callers set one). A failed handshake is a ``backend_tls.TLSFailure`` (an OSError)."""
    stream = await connect_tcp(backend)
    if backend.tls is None:
        return stream
    host = None if backend.unix_socket else backend.host
    return await backend.tls.wrap(stream, host, backend.describe())


def socket_of(stream: BackendStream) -> trio.socket.SocketType:
    """The socket under a backend stream (TLS or not)."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket


class BackendConnection:
    """One connection of a client's pool."""

    __slots__ = ("client", "stream", "idle_since", "_closed")

    def __init__(self, client: BackendClient, stream: BackendStream) -> None:
        self.client = client
        self.stream = stream
        self.idle_since = 0.0
        self._closed = False

    def close(self) -> None:
        # A socket close needs no waiting; doing it synchronously keeps it out of cancellation.
        if not self._closed:
            self._closed = True
            socket_of(self.stream).close()
            self.client._forget(self)

    def alive(self) -> bool:
        """Whether an idle connection can carry a request: not closed by the backend.

        An idle HTTP/1.1 connection has nothing to read; if it is readable, the backend
        closed it (EOF) or sent bytes no request asked for, and either way it is done.
        """
        poller = select.poll()
        poller.register(socket_of(self.stream).fileno(), select.POLLIN)
        return not poller.poll(0)


class BackendClient:
    """Connections to one backend, pooled for keep-alive, bounded in number and idle time."""

    def __init__(self, backend: Backend, name: str, options: ClientOptions | None = None) -> None:
        self.backend = backend
        self.name = name
        self.options = options or ClientOptions()
        self.closed = False
        self.last_used = trio.current_time()
        self._idle: deque[BackendConnection] = deque()  # oldest first
        self._open = 0
        self._slot_freed = trio.lowlevel.ParkingLot()
        self._websockets = 0  # open through dedicated() or reserved()
        self._websocket_ended = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        return f"<BackendClient {self.name} {self.backend.describe()} open={self._open} idle={len(self._idle)}>"

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def acquire(self, fresh: bool = False) -> tuple[BackendConnection, bool]:
        """A connection (a new one if ``fresh``) and whether it was reused from the pool.

        Raises BackendError (not sent) if the client is closed, no slot frees up or the
        backend does not accept within ``connect_timeout``, or the connection is refused.
        """
        self.last_used = trio.current_time()
        connection = None if fresh else self._reusable()
        if connection is not None:
            return connection, True
        if self.closed:
            raise self._closed_error()
        timeout = self.options.connect_timeout
        with trio.move_on_after(timeout):
            while self._open >= self.options.max_connections:
                await self._slot_freed.park()
                connection = self._reusable()
                if connection is not None:
                    return connection, True
            self._open += 1
            try:
                stream = await connect(self.backend)
            except OSError as exc:
                self._release_slot()
                raise BackendError(_connect_failure(self.backend, exc), sent=False) from None
            except BaseException:
                self._release_slot()
                raise
            if self.closed:  # the process went away while we connected
                socket_of(stream).close()
                self._release_slot()
                raise self._closed_error()
            return BackendConnection(self, stream), False
        raise self._too_slow()

    @contextlib.asynccontextmanager
    async def dedicated(self) -> AsyncIterator[BackendStream]:
        """A connection of the caller's own while the context lasts (a WebSocket tunnel).

        It counts against ``max_websockets`` (see :meth:`reserved`) and is never pooled.
        Raises BackendError as :meth:`acquire`.
        """
        async with self.reserved():
            try:
                with trio.fail_after(self.options.connect_timeout):
                    stream = await connect(self.backend)
            except OSError as exc:
                raise BackendError(_connect_failure(self.backend, exc), sent=False) from None
            except trio.TooSlowError:
                raise self._too_slow() from None
            with socket_of(stream):
                yield stream

    @contextlib.asynccontextmanager
    async def reserved(self) -> AsyncIterator[None]:
        """Room for one WebSocket connection that the caller opens itself, while the context lasts.

        WebSockets have a limit of their own, ``max_websockets``: each holds its connection for
        as long as it is open, so counting them against the HTTP pool's ``max_connections``
        would let a hundred open pages stop every HTTP request (measured: the ``mixed``
        benchmark's GETs waited out its whole run). Waits within ``connect_timeout`` for one
        to close, then raises BackendError (504).
        """
        if self.closed:
            raise self._closed_error()
        self.last_used = trio.current_time()
        limit = self.options.max_websockets
        with trio.move_on_after(self.options.connect_timeout) as waiting:
            while self._websockets >= limit:
                await self._websocket_ended.park()
                if self.closed:
                    raise self._closed_error()
        if waiting.cancelled_caught:
            raise BackendError(
                f"{self.backend.describe()}: all {limit} WebSocket connections in use for "
                f"{self.options.connect_timeout:g} s (max_websockets)",
                sent=False,
                status=504,
            )
        self._websockets += 1
        try:
            yield
        finally:
            self._websockets -= 1
            self._websocket_ended.unpark()

    def _too_slow(self) -> BackendError:
        busy = " (all connections busy)" if self._open >= self.options.max_connections else ""
        return BackendError(
            f"{self.backend.describe()} did not accept a connection within "
            f"{self.options.connect_timeout:g} s{busy} (connect_timeout)",
            sent=False,
            status=504,
        )

    def _reusable(self) -> BackendConnection | None:
        if self.closed:
            raise self._closed_error()
        while self._idle:
            connection = self._idle.pop()  # the most recent: the likeliest to be alive
            if connection.alive():
                return connection
            connection.close()
        return None

    def _closed_error(self) -> BackendError:
        return BackendError(f"{self.backend.describe()} went away", sent=False)

    def release(self, connection: BackendConnection) -> None:
        """Keep a connection whose last exchange ended cleanly for the next request."""
        if self.closed:
            connection.close()
            return
        connection.idle_since = trio.current_time()
        self._idle.append(connection)
        self._slot_freed.unpark()

    def _forget(self, connection: BackendConnection) -> None:
        with contextlib.suppress(ValueError):  # ValueError: it was in use, not idle
            self._idle.remove(connection)
        self._release_slot()

    def _release_slot(self) -> None:
        self._open -= 1
        self._slot_freed.unpark()

    def expire_idle(self) -> None:
        """Close idle connections that the backend closed or that sat unused too long."""
        deadline = trio.current_time() - self.options.pool_idle_timeout
        for connection in list(self._idle):
            if connection.idle_since <= deadline or not connection.alive():
                connection.close()

    async def maintain(self, interval: float = 1.0) -> None:
        """Expire idle connections every ``interval`` until the client is closed."""
        while not self.closed:
            await trio.sleep(interval)
            self.expire_idle()

    def close(self) -> None:
        """Close every idle connection; busy ones are closed as their exchange ends."""
        if self.closed:
            return
        self.closed = True
        for connection in list(self._idle):
            connection.close()
        self._slot_freed.unpark_all()
        self._websocket_ended.unpark_all()


class ProxyTargets:
    """Clients for ``proxy/<host>:<port>`` targets: bounded in number, dropped when idle."""

    def __init__(self, options: ClientOptions | None = None, max_targets: int = 64, idle_timeout: float = 60.0):
        self.options = options or ClientOptions()
        self.max_targets = max_targets
        self.idle_timeout = idle_timeout
        self._clients: dict[Backend, BackendClient] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def __iter__(self) -> Iterator[BackendClient]:
        return iter(list(self._clients.values()))

    def client(self, backend: Backend) -> BackendClient:
        client = self._clients.pop(backend, None)
        if client is None:
            if len(self._clients) >= self.max_targets:
                self._evict()
            client = BackendClient(backend, f"proxy {backend.describe()}", self.options)
        self._clients[backend] = client  # most recently used last
        client.last_used = trio.current_time()
        return client

    def _evict(self) -> None:
        # The least recently used target without connections in use; failing that, the least
        # recently used one (its busy connections end as their exchanges end).
        ordered = list(self._clients.values())
        victim = next((c for c in ordered if c.open_connections == c.idle_connections), ordered[0])
        del self._clients[victim.backend]
        victim.close()

    def expire(self) -> None:
        now = trio.current_time()
        for client in list(self._clients.values()):
            client.expire_idle()
            if client.open_connections == 0 and now - client.last_used >= self.idle_timeout:
                del self._clients[client.backend]
                client.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED, interval: float = 1.0) -> None:
        """Expire idle connections and targets until cancelled; then close every client."""
        try:
            task_status.started()
            while True:
                await trio.sleep(interval)
                self.expire()
        finally:
            self.close()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def _connect_failure(backend: Backend, exc: OSError) -> str:
    if isinstance(exc, TLSFailure):
        return str(exc)  # names the backend and TLS already
    return f"cannot connect to {backend.describe()}: {_reason(exc)}"


def _reason(exc: OSError) -> str:
    # trio reports "all attempts failed" for names with several addresses; the cause says why.
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return exc.strerror or str(exc)
