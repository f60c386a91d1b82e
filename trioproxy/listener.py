"""Accepting connections: a look at each connection's first request, then Hypercorn.

Every accepted connection runs inside its own boundary (:func:`_owned_connection`). Before a
connection is handed to Hypercorn (:mod:`trioproxy.transport`, the one module that knows
Hypercorn's insides), its first request head is read (bounded in size and time) and, when it
is an HTTP/1.1 WebSocket upgrade, offered to an *upgrade handler* (:mod:`trioproxy.fastpath`),
which may take the connection for itself. Everything else, and every upgrade the handler
declines, goes to Hypercorn with the bytes already read replayed first, so Hypercorn sees the
connection exactly as the client sent it. Only connections that start with ``GET`` are held
back for a head; any other first bytes (another method, HTTP/2's preface, TLS with ``h2``
chosen) go over at once.

Graceful shutdown follows Hypercorn's: on ``shutdown_trigger`` the listening sockets close,
Hypercorn's connections are told to finish (its worker context), the upgrade handler is told to
close what it holds, and connections get ``graceful_timeout`` before they are cancelled.

Not used by trioproxy, and so left out of Hypercorn's loop: QUIC, statsd, ``max_requests``,
and the "Running on" log line (the command prints the one URL to open).

Each request's ASGI scope carries its connection's socket (:data:`CLIENT_SOCKET`), so that a
relay waiting for a backend can notice a client that left: Hypercorn stops reading a
connection while its request is being answered, so no ``http.disconnect`` would tell.
"""

from __future__ import annotations

import logging
import select
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import h11
import trio
from hypercorn.config import Config

from . import portable, transport
from .relay.headers import Headers
from .transport import CLIENT_SOCKET as CLIENT_SOCKET

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # noqa: F401

log = logging.getLogger("trioproxy.listener")

READ_SIZE = 65536


@dataclass
class RequestHead:
    """A connection's first request, when it asks for a WebSocket upgrade over HTTP/1.1."""

    target: bytes  # path and query, as sent
    headers: Headers  # lower-case names, as ASGI gives them
    trailing: bytes  # what the client sent after the head
    client: tuple[str, int] | None
    server: tuple[str, int | None] | None
    tls: bool


class UpgradeHandler(Protocol):
    async def __call__(self, stream: trio.abc.Stream, request: RequestHead) -> bool:
        """Serve the connection and return True, or return False having read nothing more."""

    def shut_down(self) -> None:
        """Close every connection taken, promptly (a graceful shutdown has begun)."""


async def serve(
    app: Any,
    config: Config,
    *,
    upgrade_handler: UpgradeHandler | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` as ``hypercorn.trio.serve`` does; reports the bound addresses.

    ``on_shutdown`` is called once a graceful shutdown has begun (new connections refused).
    """
    async with transport.worker(app, config) as worker:
        async with trio.open_nursery() as connections:
            listeners, binds = _listen(config)
            handler = partial(_owned_connection, partial(_connection, worker, config, upgrade_handler))
            task_status.started(binds)
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(trio.serve_listeners, handler, listeners, handler_nursery=connections)
                    )
                    await (shutdown_trigger or trio.sleep_forever)()
                    accepting.cancel_scope.cancel()  # closes the listening sockets
            finally:
                await worker.terminate()
                if on_shutdown is not None:
                    on_shutdown()
                if upgrade_handler is not None:
                    upgrade_handler.shut_down()
                connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout


def _listen(config: Config) -> tuple[list[trio.abc.Listener[Any]], list[str]]:
    sockets = config.create_sockets()
    listeners: list[trio.abc.Listener[Any]] = []
    binds: list[str] = []
    ssl_context = config.create_ssl_context() if sockets.secure_sockets else None
    for sock in sockets.secure_sockets:
        sock.listen(config.backlog)
        listeners.append(
            trio.SSLListener(
                trio.SocketListener(trio.socket.from_stdlib_socket(sock)), ssl_context, https_compatible=True  # type: ignore[arg-type]
            )
        )
        binds.append(f"https://{transport.bound_address(sock)}")
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{transport.bound_address(sock)}")
    return listeners, binds


async def _owned_connection(handle: Callable[[trio.abc.Stream], Awaitable[None]], stream: trio.abc.Stream) -> None:
    """The boundary of one client connection: whatever goes wrong in it ends it alone.

    ``trio.serve_listeners`` leaves errors to the handler, and Hypercorn's ``TCPServer``
    catches only ``OSError`` around its protocols (h11, h2 and its own stream bookkeeping can
    raise on inputs they did not foresee). An error that reached the connections nursery would
    end every connection and trioproxy with them; here it is logged once, with its traceback,
    and the connection is closed.
    """
    try:
        await handle(stream)
    except BaseException as exc:
        unexpected = unexpected_errors(exc)
        if unexpected is None:
            raise
        log.error("a client connection failed; closing it", exc_info=unexpected)
    finally:
        await trio.aclose_forcefully(stream)


def unexpected_errors(exc: BaseException) -> BaseException | None:
    """What of ``exc`` a boundary owns (plain exceptions), or None for what it must pass on.

    Cancellation, ``KeyboardInterrupt`` and ``SystemExit`` belong to whoever cancelled or
    asked to stop; an exception group is split so that a cancellation in it still propagates.
    """
    if isinstance(exc, BaseExceptionGroup):
        unexpected, rest = exc.split(Exception)
        return unexpected if rest is None else None
    return exc if isinstance(exc, Exception) else None


async def _connection(
    worker: transport.Worker, config: Config, upgrade_handler: UpgradeHandler | None, stream: trio.abc.Stream
) -> None:
    tls = isinstance(stream, trio.SSLStream)
    sock = stream.transport_stream.socket if tls else stream.socket  # type: ignore[attr-defined]
    if upgrade_handler is None:
        await worker.serve(stream, sock)
        return
    try:
        if isinstance(stream, trio.SSLStream):
            with trio.fail_after(config.ssl_handshake_timeout):
                await stream.do_handshake()
            if stream.selected_alpn_protocol() not in (None, "http/1.1"):
                await worker.serve(stream, sock)  # HTTP/2: Hypercorn's, from the first byte
                return
        # An unfinished head is dropped when Hypercorn's idle timer would drop it.
        with trio.fail_after(config.keep_alive_timeout):
            read, request = await read_first_head(stream, config.h11_max_incomplete_size, tls)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        return  # the client left (or reset) before its first head; the boundary closes
    if not read:
        return  # connected and left without a word
    if request is not None and await upgrade_handler(stream, request):
        return
    await worker.serve(stream, sock, read)


def client_gone(sock: Any) -> bool:
    """Whether the client of a connection has closed (or reset) it.

    The socket is only polled and peeked at, never read: Hypercorn owns its bytes. A client
    that shut its sending side is gone too, as nginx takes it (an HTTP client half-closes only
    to leave). With ``POLLRDHUP`` (Linux) the kernel says so; without it
    (:mod:`trioproxy.portable`), a socket that polls readable and peeks at no byte has reached
    its end (one that half-closed after sending more bytes counts as gone only once those
    are read).
    """
    fd = sock.fileno()
    if fd < 0:
        return True  # closed on our side already: nobody to answer
    poller = select.poll()
    rdhup = portable.POLLRDHUP
    if rdhup is not None:
        poller.register(fd, rdhup)
        return any(events & (rdhup | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))
    poller.register(fd, select.POLLIN)
    events = 0
    for _, happened in poller.poll(0):
        events |= happened
    if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
        return True
    if not events & select.POLLIN:
        return False
    peeker = socket.socket(fileno=fd)  # the same descriptor, not a copy: detached below
    try:
        return peeker.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True
    finally:
        peeker.detach()


async def read_first_head(stream: trio.abc.Stream, limit: int, tls: bool) -> tuple[bytes, RequestHead | None]:
    """What was read of the first request, and its head if it asks for a WebSocket upgrade.

    Reads only as long as the request may be one: a first request that is not a GET is
    known from its first bytes. A head over ``limit``, or one that does not parse, is left
    to Hypercorn, which answers it as it always has (400).
    """
    data = b""
    while True:
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk:
            return data, None
        data += chunk
        if not b"GET ".startswith(data[:4]):
            return data, None
        end = _head_end(data)
        if end is not None:
            return data, _upgrade_request(stream, data, end, tls)
        if len(data) > limit:
            return data, None


def _head_end(data: bytes) -> int | None:
    # The head ends with an empty line; h11, like most servers, also takes bare LF.
    ends = [index for index in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if index >= 0]
    if not ends:
        return None
    index = min(ends)
    return index + (4 if data[index : index + 4] == b"\r\n\r\n" else 2)


def _upgrade_request(stream: trio.abc.Stream, data: bytes, end: int, tls: bool) -> RequestHead | None:
    head = data[:end]
    if b"upgrade" not in head.lower():
        return None  # the cheap test first: most first requests are ordinary
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    try:
        parser.receive_data(head)
        event = parser.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request) or event.method != b"GET" or event.http_version != b"1.1":
        return None
    headers = list(event.headers)
    upgrade = _tokens(headers, b"upgrade")
    if b"websocket" not in upgrade or b"upgrade" not in _tokens(headers, b"connection"):
        return None
    sock = stream.transport_stream.socket if tls else stream.socket  # type: ignore[attr-defined]
    # The client may have reset the connection since its head arrived (ENOTCONN): then it is
    # gone, and the caller's handling of a client that left applies.
    client, server = transport.addresses(sock)
    return RequestHead(target=event.target, headers=headers, trailing=data[end:], client=client, server=server, tls=tls)


def _tokens(headers: Headers, name: bytes) -> set[bytes]:
    return {
        token.strip().lower() for key, value in headers if key == name for token in value.split(b",")
    }
