"""The WebSocket fast path: a connection that opens with an upgrade to a relayed route.

:mod:`trioproxy.listener` offers each connection whose first request is an HTTP/1.1
WebSocket upgrade to :class:`WebSocketFastPath`. For ``<name>/…`` and ``proxy/…`` it does what
the dispatcher does for a WebSocket (route, authentication, origin, host allowlist, server
start, upstream path and headers, activity, metrics, access log), in the same order and with
the dispatcher's own methods, then sends the upgrade to the backend, returns the backend's
answer to the client as it came (its ``101`` head byte for byte, or its refusal), and
tunnels bytes (:mod:`trioproxy.relay.tunnel`). Extensions, subprotocols, close codes and
pings are then the two ends' business: trioproxy neither compresses nor answers pings.

Declined, and left to Hypercorn and the ASGI relay: trioproxy's own routes, ``raw_socket_proxy``
servers (they need messages turned into bytes), heads with too many headers (the dispatcher
answers those), and, by construction, HTTP/2 and upgrades on a connection that already served
a request.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import trio

from .auth import mask_secrets
from .backend import connect
from .errors import render_error
from .listener import RequestHead
from .metrics import PROXY_LABEL, log_access
from .relay.headers import Headers, header_value, strip_hop_by_hop, wants_json
from .relay.tunnel import BackendFailed, Refusal, Tunnel, open_backend
from .routing import Route, resolve
from .supervisor import ServerUnavailable

if TYPE_CHECKING:
    from .app import Dispatcher

log = logging.getLogger("trioproxy.fastpath")

# The client's handshake headers pass as they are, for the backend to negotiate with; what
# frames a body does not belong on an upgrade.
_NOT_FORWARDED = frozenset({b"content-length", b"transfer-encoding"})


class WebSocketFastPath:
    """The listener's upgrade handler for one dispatcher."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        handshake_timeout: float = 30.0,
        close_timeout: float = 5.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self.tunnels: set[Tunnel] = set()
        self.closing = False

    def shut_down(self) -> None:
        self.closing = True
        for tunnel in list(self.tunnels):
            tunnel.shut_down()

    async def __call__(self, stream: trio.abc.Stream, request: RequestHead) -> bool:
        dispatcher = self.dispatcher
        settings = dispatcher.settings
        raw_path, _, query = request.target.partition(b"?")
        route = resolve(raw_path, settings.base_url, dispatcher.supervisors, settings.root_server)
        if route.kind not in ("server", "proxy"):
            return False
        if route.kind == "server" and dispatcher.supervisors[route.name].process.raw_socket_proxy:
            return False
        if len(request.headers) > settings.max_header_count:
            return False
        scope = _scope(request, raw_path, query)
        began = trio.current_time()
        status = 0
        try:
            status = await self._serve(stream, request, scope, route)
        finally:
            await trio.aclose_forcefully(stream)
            log_access(scope, "WEBSOCKET", status, None, began)
        return True

    async def _serve(self, stream: trio.abc.Stream, request: RequestHead, scope: dict[str, Any], route: Route) -> int:
        """Validate, hand over, tunnel; the status the client got."""
        dispatcher = self.dispatcher
        if self.closing:
            return await self._refuse(stream, scope, 503, "trioproxy is shutting down.")
        if await dispatcher.settings.auth.authenticate(scope) is None:
            return await self._refuse(stream, scope, 403, "Authentication required: a valid token is needed.")
        if not dispatcher._origin_allowed(scope):
            log.warning("refused a cross-origin WebSocket to %s", scope["path"])
            return await self._refuse(stream, scope, 403, "Cross-origin WebSocket refused.")
        if route.kind == "proxy" and not dispatcher._allowed_host(route.host):
            return await self._refuse(stream, scope, 403, f"Host {route.host!r} is not allowed.")
        server = route.name if route.kind == "server" else f"{route.host}:{route.port}"
        try:
            client, process = await dispatcher._backend_for(route, scope)
        except ServerUnavailable as exc:
            return await self._refuse(
                stream, scope, exc.status, str(exc), server=exc.server, output=exc.output, retry_after=exc.retry_after
            )
        try:
            upstream = dispatcher._upstream(scope, route, process)
        except Exception as exc:
            log.error("%s: cannot build the WebSocket request: %s", server, exc)
            return await self._refuse(stream, scope, 500, f"Cannot build the request: {exc}", server=server)
        headers = _with_host_first([(n, v) for n, v in upstream.headers if n not in _NOT_FORWARDED])
        backend = client.backend
        connect_timeout = client.options.connect_timeout
        try:
            with trio.fail_after(connect_timeout):
                backend_stream = await connect(backend)
        except OSError as exc:
            message = f"{server}: cannot connect to {backend.describe()}: {exc.strerror or exc}"
            return await self._refuse(stream, scope, 502, message, server=server)
        except trio.TooSlowError:
            message = f"{server}: no connection to {backend.describe()} within {connect_timeout:g} s (connect_timeout)"
            return await self._refuse(stream, scope, 504, message, server=server)
        async with backend_stream:
            try:
                with trio.fail_after(self.handshake_timeout):
                    answer = await open_backend(backend_stream, upstream.target, headers)
            except trio.TooSlowError:
                message = f"the backend did not answer the WebSocket upgrade within {self.handshake_timeout:g} s"
                log.warning("%s: WebSocket refused (504): %s", server, message)
                return await self._refuse(stream, scope, 504, f"{server}: {message}", server=server)
            except BackendFailed as exc:
                log.warning("%s: WebSocket refused (%d): %s", server, exc.status, exc.message)
                return await self._refuse(stream, scope, exc.status, f"{server}: {exc.message}", server=server)
            if isinstance(answer, Refusal):
                log.info("%s: WebSocket refused (%d): the backend's answer", server, answer.status)
                await _send_quietly(stream, _refusal_bytes(answer))
                return answer.status
            try:
                await stream.send_all(answer.head)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return 101  # the client left while the backend accepted
            await self._tunnel(stream, backend_stream, request, answer.trailing, route, scope)
        return 101

    async def _tunnel(
        self,
        stream: trio.abc.Stream,
        backend_stream: trio.abc.Stream,
        request: RequestHead,
        to_client: bytes,
        route: Route,
        scope: dict[str, Any],
    ) -> None:
        from .app import ACTIVITY

        dispatcher = self.dispatcher
        supervisor = dispatcher.supervisors.get(route.name) if route.kind == "server" else None
        label = route.name if route.kind == "server" else PROXY_LABEL
        tunnel = Tunnel(
            stream,
            backend_stream,
            max_message_size=dispatcher.settings.websocket_max_message_size,
            on_activity=supervisor.touch if supervisor is not None and scope.get(ACTIVITY) else None,
            close_timeout=self.close_timeout,
            pump=dispatcher.tunnel_pump,
        )
        dispatcher.metrics.websocket_tunnelled(label)
        self.tunnels.add(tunnel)
        if supervisor is not None:
            supervisor.active += 1
        try:
            if self.closing:
                tunnel.shut_down()
            await tunnel.run(to_backend=request.trailing, to_client=to_client)
        finally:
            self.tunnels.discard(tunnel)
            dispatcher.metrics.websocket_closed(label)
            if supervisor is not None:
                supervisor.active -= 1

    async def _refuse(
        self,
        stream: trio.abc.Stream,
        scope: dict[str, Any],
        status: int,
        message: str,
        *,
        server: str | None = None,
        output: list[str] | None = None,
        retry_after: float | None = None,
    ) -> int:
        """Answer the upgrade with an error page (secrets masked) and close."""
        auth = self.dispatcher.settings.auth
        known = auth.known_secrets() if hasattr(auth, "known_secrets") else []
        content_type, body = render_error(
            status,
            mask_secrets(message, known),
            as_json=wants_json(scope["headers"]),
            server=server,
            output=[mask_secrets(line, known) for line in output] if output else output,
            retry_after=retry_after,
        )
        headers = [(b"content-type", content_type), (b"cache-control", b"no-store")]
        if retry_after is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        reason = HTTPStatus(status).phrase.encode() if status in HTTPStatus._value2member_map_ else b"Error"
        await _send_quietly(stream, _response_bytes(status, reason, headers, body))
        return status


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


def _refusal_bytes(refusal: Refusal) -> bytes:
    # The backend's status, reason, headers and body; framed anew, since the tunnel closes
    # the connection after it.
    headers = [
        (name, value)
        for name, value in strip_hop_by_hop(refusal.headers)
        if name.lower() != b"content-length"
    ]
    return _response_bytes(refusal.status, refusal.reason, headers, refusal.body)


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
