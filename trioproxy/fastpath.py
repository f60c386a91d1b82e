"""The WebSocket fast path: a connection that opens with an upgrade to a relayed route.

:mod:`trioproxy.listener` offers each connection whose first request is an HTTP/1.1
WebSocket upgrade to :class:`WebSocketFastPath`. It is a transport, not a dispatcher: for
``<name>/…`` and ``proxy/…`` it asks :class:`~trioproxy.admission.Gate` (the pipeline the
ASGI dispatcher calls too) to admit the request, renders a refusal as an HTTP response, and
otherwise takes a connection to the backend from its client (counted against
``max_websockets``), sends the upgrade, returns the backend's answer to the client as it
came (its ``101`` head byte for byte, or its refusal), and tunnels bytes
(:mod:`trioproxy.relay.tunnel`). Extensions, subprotocols, close codes and pings are then the
two ends' business: trioproxy neither compresses nor answers pings (with a server's
``websocket_keepalive`` it sends pings of its own to a quiet client and drops their pongs:
:mod:`trioproxy.relay.keepalive`). A client that leaves while the backend has not answered ends
both connections at once.

Declined, and left to Hypercorn and the ASGI relay: trioproxy's own routes and unknown paths,
``raw_socket_proxy`` servers (they need messages turned into bytes), and, by construction,
HTTP/2 and upgrades on a connection that already served a request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import trio

from .admission import Admission, Refused
from .backend import BackendError
from .errors import error_response
from .listener import RequestHead, client_gone
from .metrics import log_access
from .relay import keepalive
from .relay.headers import Headers, header_value, strip_hop_by_hop
from .relay.tunnel import BackendFailed, Refusal, Tunnel, open_backend
from .routing import Route
from .server import head_with_headers, with_headers

if TYPE_CHECKING:
    from .app import Dispatcher

log = logging.getLogger("trioproxy.fastpath")

# The client's handshake headers pass as they are, for the backend to negotiate with; what
# frames a body does not belong on an upgrade.
_NOT_FORWARDED = frozenset({b"content-length", b"transfer-encoding"})
CLIENT_POLL = 0.05  # how often a client that sent frames early is looked at during a handshake

_T = TypeVar("_T")


class WebSocketFastPath:
    """The listener's upgrade handler: a transport for :class:`~trioproxy.admission.Gate`."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        handshake_timeout: float = 30.0,
        close_timeout: float = 5.0,
    ) -> None:
        self.gate = dispatcher.gate
        self.metrics = dispatcher.metrics
        self.max_message_size = dispatcher.settings.websocket_max_message_size
        self.pump = dispatcher.tunnel_pump
        self.response_headers = dispatcher.settings.response_headers  # on every answer, as on the ASGI side
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self.tunnels: set[Tunnel] = set()
        self.closing = False

    def shut_down(self) -> None:
        self.closing = True
        for tunnel in list(self.tunnels):
            tunnel.shut_down()

    async def __call__(self, stream: trio.abc.Stream, request: RequestHead) -> bool:
        raw_path, _, query = request.target.partition(b"?")
        scope = _scope(request, raw_path, query)
        route = self.gate.route(scope)
        if route.kind not in ("server", "proxy"):
            return False
        if route.kind == "server" and self.gate.supervisors[route.name].process.raw_socket_proxy:
            return False
        began = trio.current_time()
        status = 0
        try:
            status = await self._serve(stream, request, scope, route)
        finally:
            await trio.aclose_forcefully(stream)
            log_access(scope, "WEBSOCKET", status, None, began)
        return True

    async def _serve(self, stream: trio.abc.Stream, request: RequestHead, scope: dict[str, Any], route: Route) -> int:
        """Admit, hand over, tunnel; the status the client got."""
        if self.closing:
            return await self._refuse(stream, scope, Refused(503, "trioproxy is shutting down."))
        try:
            async with self.gate.admit(scope, route) as admission:
                return await self._hand_over(stream, request, scope, admission)
        except Refused as refused:
            return await self._refuse(stream, scope, refused)

    async def _hand_over(
        self, stream: trio.abc.Stream, request: RequestHead, scope: dict[str, Any], admission: Admission
    ) -> int:
        server = admission.server
        headers = _with_host_first([(n, v) for n, v in admission.upstream.headers if n not in _NOT_FORWARDED])
        try:
            async with admission.client.dedicated() as backend_stream:
                with trio.move_on_after(self.handshake_timeout) as waiting:
                    answer = await _unless_client_leaves(
                        stream, partial(open_backend, backend_stream, admission.upstream.target, headers)
                    )
                if waiting.cancelled_caught:
                    message = f"the backend did not answer the WebSocket upgrade within {self.handshake_timeout:g} s"
                    log.warning("%s: WebSocket refused (504): %s", server, message)
                    return await self._refuse(stream, scope, Refused(504, f"{server}: {message}", server=server))
                if answer is None:
                    log.info("%s: the client left during the WebSocket handshake", server)
                    return 499
                if isinstance(answer, Refusal):
                    log.info("%s: WebSocket refused (%d): the backend's answer", server, answer.status)
                    await _send_quietly(stream, _refusal_bytes(answer, self.response_headers))
                    return answer.status
                try:
                    await stream.send_all(head_with_headers(answer.head, self.response_headers))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return 101  # the client left while the backend accepted
                await self._tunnel(stream, backend_stream, request, answer.trailing, admission)
                return 101
        except BackendError as exc:  # no connection to the backend
            return await self._refuse(stream, scope, Refused(exc.status, f"{server}: {exc}", server=server))
        except BackendFailed as exc:
            log.warning("%s: WebSocket refused (%d): %s", server, exc.status, exc.message)
            return await self._refuse(stream, scope, Refused(exc.status, f"{server}: {exc.message}", server=server))

    async def _tunnel(
        self,
        stream: trio.abc.Stream,
        backend_stream: trio.abc.Stream,
        request: RequestHead,
        to_client: bytes,
        admission: Admission,
    ) -> None:
        tunnel = Tunnel(
            stream,
            backend_stream,
            max_message_size=self.max_message_size,
            on_activity=admission.on_activity,
            close_timeout=self.close_timeout,
            pump=self.pump,
            keepalive=keepalive.interval_for(admission.process),
            name=admission.server,
        )
        self.metrics.websocket_tunnelled(admission.label)
        self.tunnels.add(tunnel)
        try:
            if self.closing:
                tunnel.shut_down()
            await tunnel.run(to_backend=request.trailing, to_client=to_client)
        finally:
            self.tunnels.discard(tunnel)
            self.metrics.websocket_closed(admission.label)

    async def _refuse(self, stream: trio.abc.Stream, scope: dict[str, Any], refused: Refused) -> int:
        """Answer the upgrade with an error page (secrets masked) and close."""
        refused = self.gate.refusal(refused)
        headers, body = error_response(
            scope["headers"],
            refused.status,
            refused.message,
            server=refused.server,
            output=refused.output,
            retry_after=refused.retry_after,
        )
        status = refused.status
        reason = HTTPStatus(status).phrase.encode() if status in HTTPStatus._value2member_map_ else b"Error"
        await _send_quietly(stream, _response_bytes(status, reason, with_headers(headers, self.response_headers), body))
        return status


async def _unless_client_leaves(stream: trio.abc.Stream, handshake: Callable[[], Awaitable[_T]]) -> _T | None:
    """``handshake()``'s result, or None as soon as the client has closed or reset its connection.

    A backend slow to answer would otherwise hold both connections until the handshake
    timeout. The client's socket is only polled, never read (its next bytes are frames).
    """
    sock = stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else getattr(stream, "socket", None)
    if sock is None:
        return await handshake()
    result: list[_T] = []
    failure: list[Exception] = []

    async def shake(cancel_scope: trio.CancelScope) -> None:
        try:
            result.append(await handshake())
        except Exception as exc:  # raised below, as it is: not wrapped in the nursery's group
            failure.append(exc)
        cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(shake, nursery.cancel_scope)
        while True:
            await trio.lowlevel.wait_readable(sock)
            if client_gone(sock):
                nursery.cancel_scope.cancel()
                break
            await trio.sleep(CLIENT_POLL)  # early frames: readable, not gone; look again later
    if failure:
        raise failure[0]
    return result[0] if result else None


def _scope(request: RequestHead, raw_path: bytes, query: bytes) -> dict[str, Any]:
    """The ASGI scope Hypercorn would have made, for authentication and the shared helpers."""
    protocols = header_value(request.headers, b"sec-websocket-protocol") or b""
    return {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "wss" if request.tls else "ws",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": request.headers,
        "client": request.client,
        "server": request.server,
        "subprotocols": [p.strip().decode("latin-1") for p in protocols.split(b",") if p.strip()],
        "extensions": {"websocket.http.response": {}},
        "state": {},
    }


def _with_host_first(headers: Headers) -> Headers:
    return [item for item in headers if item[0] == b"host"] + [item for item in headers if item[0] != b"host"]


def _refusal_bytes(refusal: Refusal, extra: Headers) -> bytes:
    # The backend's status, reason, headers and body; framed anew, since the tunnel closes
    # the connection after it.
    headers = [
        (name, value)
        for name, value in strip_hop_by_hop(refusal.headers)
        if name.lower() != b"content-length"
    ]
    return _response_bytes(refusal.status, refusal.reason, with_headers(headers, extra), refusal.body)


def _response_bytes(status: int, reason: bytes, headers: Headers, body: bytes) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client left first
