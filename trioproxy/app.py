"""The ASGI application: routing, authentication, and handing requests to a relay.

``create_app`` returns a Quart-Trio app whose ``asgi_app`` is wrapped by :class:`Dispatcher`.
Relayed requests (``<name>/…`` and ``proxy/…``) are served by the dispatcher itself, straight
from the ASGI messages, because Quart's request machinery costs more per request than the
whole relay (see the benchmarks); trioproxy's own pages and API are ordinary Quart routes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import unquote

import trio
from quart_trio import QuartTrio

from .admission import ACTIVITY, Admission, Gate, Refused, relayed_request
from .auth import Authenticator, TokenAuth
from .backend import Backend, BackendError, ClientOptions, ProxyTargets
from .body import BodyGuard
from .config import ServerProcess
from .errors import CallableFailed, send_error, send_redirect, sole_exception
from .listener import CLIENT_SOCKET
from .metrics import PROXY_LABEL, HttpExchange, Metrics, WebSocketExchange, log_access
from .relay.framing import FramingError, declared_length
from .relay.headers import Headers
from .relay.http import RelayTarget, relay_http
from .relay.pump import AVAILABLE as PUMP_AVAILABLE
from .relay.pump import TunnelPump
from .relay.rewrite import RewriteContext, RewriteError
from .relay.upstream import DEFAULT_FORWARDED_ALLOW
from .routing import Route, alias_location
from .supervisor import ServerUnavailable, Supervisors

log = logging.getLogger("trioproxy.app")

__all__ = ["ACTIVITY", "Dispatcher", "Settings", "create_app", "relayed_request"]


@dataclass
class Settings:
    """How the app behaves; the CLI fills it from the configuration."""

    base_url: str = "/"
    auth: Authenticator = field(default_factory=lambda: TokenAuth(None))
    host_allowlist: list[str] | Callable[..., bool] = field(
        default_factory=lambda: ["localhost", "127.0.0.1"]
    )
    non_service_rewrite_response: list[Callable[..., Any]] = field(default_factory=list)
    root_server: str | None = None  # standalone mode: this server owns the base URL's root
    strip_token_query: bool = False  # jupyter-server-proxy forwards ?token=; we do by default too
    websocket_max_message_size: int = 16 * 1024 * 1024
    allow_origin: str = ""
    allow_origin_pat: str = ""
    max_body_size: int | None = None  # bytes of a relayed request body; None: no limit
    body_timeout: float = 60.0  # longest wait for the next piece of a request body
    max_header_count: int = 500
    # Copy tunnelled WebSockets' bytes on the pump's thread (trioproxy.relay.pump), not the loop.
    websocket_pump: bool = True
    # Client addresses whose X-Forwarded-* headers are believed (addresses, networks, "*").
    forwarded_allow_ips: tuple[str, ...] = DEFAULT_FORWARDED_ALLOW
    proxy_client_options: ClientOptions = field(default_factory=ClientOptions)  # proxy/<port> targets
    reloader: Any = None  # a trioproxy.config.Reloader: POST server-proxy/api/reload
    instances: Any = None  # a trioproxy.instances.Instances: templates, POST server-proxy/api/servers
    # Headers every answer carries, relayed or not, on every path (JupyterHub mode: its
    # version). Read at each answer: a service may fill the list before trioproxy listens.
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    default_url: str = ""  # JupyterHub mode: where the root sends browsers, relative to base_url


class Dispatcher:
    """The outermost ASGI callable: decides each request's route and relays it.

    What a relayed request must pass is :class:`~trioproxy.admission.Gate`'s business, shared
    with the WebSocket fast path; the dispatcher turns ASGI messages into calls of the gate
    and of the relays, and refusals into responses.
    """

    def __init__(self, ui: Callable[..., Any], settings: Settings, supervisors: Supervisors):
        self.ui = ui
        self.settings = settings
        self.supervisors = supervisors
        self.proxy_targets = ProxyTargets(settings.proxy_client_options)
        self.metrics = Metrics()
        self.gate = Gate(settings, supervisors, self.proxy_targets)
        # Long-running tasks (e.g. activity reporting) started beside the server: each is
        # an async callable taking task_status, run by trioproxy.server.run_app.
        self.services: list[Callable[..., Any]] = [self.proxy_targets.run]
        self.tunnel_pump = TunnelPump() if settings.websocket_pump and PUMP_AVAILABLE else None
        if self.tunnel_pump is not None:
            self.services.append(self.tunnel_pump.run)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.ui(scope, receive, send)
            return
        # Each request's outcome is noted as it goes out, for the metrics and the access log.
        if kind == "http":
            exchange = HttpExchange(send)
            try:
                await self._dispatch(scope, receive, exchange)
            finally:
                self._http_done(scope, exchange)
            return
        websocket = WebSocketExchange(send, self.metrics)
        try:
            await self._dispatch(scope, receive, websocket)
        finally:
            websocket.finish()
            log_access(scope, "WEBSOCKET", websocket.status, None, websocket.began)

    def _http_done(self, scope: dict[str, Any], exchange: HttpExchange) -> None:
        server = exchange.server
        if server is not None:
            self.metrics.request_done(server, exchange.status, exchange.received, exchange.sent)
        log_access(scope, scope["method"], exchange.status, exchange.sent, exchange.began)

    async def _dispatch(
        self, scope: dict[str, Any], receive: Any, send: HttpExchange | WebSocketExchange
    ) -> None:
        gate = self.gate
        try:
            gate.check_head(scope)
            route = gate.route(scope)
            if route.kind == "app":
                await self.ui(scope, receive, send)
            elif route.kind in ("server", "proxy"):
                send.server = route.name if route.kind == "server" else PROXY_LABEL
                if isinstance(send, HttpExchange):
                    await self._http(scope, receive, send, route)
                else:
                    await self._websocket(scope, receive, send, route)
            else:
                await gate.authenticate(scope)  # what is not found is not said to strangers
                if route.kind == "add-slash" and isinstance(send, HttpExchange):
                    await self._add_slash(scope, send)
                elif route.kind == "alias" and isinstance(send, HttpExchange):
                    await send_redirect(send, alias_location(route, scope.get("query_string", b"")), status=307)
                elif route.kind == "alias":  # a WebSocket cannot follow a redirect
                    raise Refused(404, f"Not found: an alias of {route.name!r}; connect to {route.redirect}.")
                else:
                    raise Refused(404, f"Not found: {route.reason or 'not a WebSocket route'}.")
        except Refused as refused:
            await self._refuse(scope, receive, send, refused)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any, refused: Refused) -> None:
        if scope["type"] == "websocket":
            from .relay.websocket import refuse_websocket

            await refuse_websocket(
                scope, receive, send, refused.status, refused.message, refused.server, refused.output, refused.retry_after
            )
        elif refused.login is not None:
            await send_redirect(send, refused.login)
        elif refused.location is not None:
            await send_redirect(send, refused.location, refused.headers)
        else:
            await send_error(
                send,
                scope["headers"],
                refused.status,
                refused.message,
                server=refused.server,
                output=refused.output,
                retry_after=refused.retry_after,
            )

    async def _add_slash(self, scope: dict[str, Any], send: Any) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        query = scope.get("query_string", b"")
        location = raw_path.decode("latin-1") + "/" + ("?" + query.decode("latin-1") if query else "")
        await send_redirect(send, location)

    # -- HTTP -------------------------------------------------------------------------------

    async def _http(self, scope: dict[str, Any], receive: Any, send: HttpExchange, route: Route) -> None:
        headers_in: Headers = scope["headers"]
        body = BodyGuard(receive, self.settings.max_body_size, self.settings.body_timeout)
        framing: list[int | None] = []

        def check_framing(server: str) -> None:
            try:
                framing.append(declared_length(headers_in))
            except FramingError as exc:
                log.warning("%s: refused a request: %s", server, exc)
                raise Refused(400, f"Bad request: {exc}.", server=server) from None
            if body.declared_too_large(headers_in, scope.get("http_version", "1.1")):
                raise Refused(413, body.too_large_message, server=server)

        began = trio.current_time()
        async with self.gate.admit(scope, route, before_start=check_framing) as admission:
            try:
                await self._relay_http(scope, body, send, admission, framing[0], began)
            finally:
                send.received = body.received
                if admission.on_activity is not None:
                    admission.on_activity()  # a long response is activity until it ends

    async def _relay_http(
        self,
        scope: dict[str, Any],
        body: BodyGuard,
        send: HttpExchange,
        admission: Admission,
        length: int | None,
        began: float,
    ) -> None:
        headers_in: Headers = scope["headers"]
        route, client, upstream, server = admission.route, admission.client, admission.upstream, admission.server
        supervisor = admission.supervisor
        rewrites = self._rewrites(admission.process, headers_in)
        target = RelayTarget(
            server=server,
            client=client,
            target=upstream.target,
            headers=upstream.headers,
            context_path=None if upstream.absolute else route.context_path,
            declared_length=length,
            rewrites=rewrites,
            rewrite_context=partial(self._rewrite_context, scope, route, client.backend, upstream.path) if rewrites else None,
            request_host=next((v.decode("latin-1") for n, v in headers_in if n == b"host"), None),
            # A request rides through restarts of its server until its timeout.
            replacement=supervisor.replacement(began + supervisor.process.timeout) if supervisor else None,
            client_socket=scope.get(CLIENT_SOCKET),
        )
        respond: Any = send
        if admission.identity.set_cookie is not None:
            respond = _with_header(send, (b"set-cookie", admission.identity.set_cookie))
        try:
            await relay_http(scope, body, respond, target)
        except Exception as exc:  # nurseries in the relay may wrap it in a group
            refused = self._relay_failed(server, body, sole_exception(exc))
            if refused is not None and not send.started:
                await self._refuse(scope, None, respond, refused)

    def _relay_failed(self, server: str, body: BodyGuard, failure: BaseException) -> Refused | None:
        """What the client of a failed relay is told, if its response has not begun."""
        if isinstance(failure, ServerUnavailable):  # its replacement could not start
            return self.gate.refusal(failure)
        if body.failure is not None:  # the request's body was refused: that is the answer
            log.info("%s: request body refused: %s", server, body.failure[1])
            return Refused(*body.failure, server=server)
        if isinstance(failure, BackendError):
            log.warning("%s: %s", server, failure)
            return self.gate.refusal(Refused(failure.status, f"{server}: {failure}", server=server))
        if isinstance(failure, RewriteError):  # it left a response that cannot be sent
            log.error("%s: %s", server, failure)
            message = f"{server}: {failure}"
        elif isinstance(failure, CallableFailed) and failure.cause is not None:
            cause = failure.cause
            log.error("%s: %s raised %s: %s", server, failure.what, type(cause).__name__, cause, exc_info=cause)
            message = f"{server}: the {failure.what} raised {type(cause).__name__}: {cause}"
        else:  # a protocol error, or a bug: report, don't crash
            log.error("%s: relay failed: %s: %s", server, type(failure).__name__, failure, exc_info=failure)
            message = f"{server}: {type(failure).__name__}: {failure}"
        return self.gate.refusal(Refused(500, message, server=server))

    def _rewrites(self, process: ServerProcess | None, headers: Headers) -> list[Callable[..., Any]]:
        accept = next((v for n, v in headers if n == b"accept"), b"")
        if accept.strip() == b"text/event-stream":
            return []  # as jupyter-server-proxy: event streams are never buffered
        if process is not None:
            return process.rewrite_response_chain
        return list(self.settings.non_service_rewrite_response)

    def _rewrite_context(self, scope: dict[str, Any], route: Route, backend: Backend, path: bytes) -> RewriteContext:
        # As jupyter-server-proxy: "localhost" for named servers (which trioproxy reaches on
        # 127.0.0.1 all the same), the host of the URL for proxy/<host>:<port>/.
        return RewriteContext(
            request=relayed_request(scope),
            host="localhost" if route.kind == "server" or backend.unix_socket else backend.host,
            port=backend.port or None,
            path=unquote(path.decode("latin-1")),
        )

    # -- WebSocket --------------------------------------------------------------------------

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any, route: Route) -> None:
        from .relay import keepalive
        from .relay.websocket import WebSocketTarget, relay_websocket

        async with self.gate.admit(scope, route) as admission:
            client, process = admission.client, admission.process
            target = WebSocketTarget(
                server=route.name or f"{route.host}:{route.port}",
                backend=client.backend,
                connect_timeout=client.options.connect_timeout,
                target=admission.upstream.target,
                headers=[(n, v) for n, v in admission.upstream.headers if n not in _WS_HANDSHAKE_HEADERS],
                subprotocols=list(scope.get("subprotocols") or []),
                raw_socket=bool(process is not None and process.raw_socket_proxy),
                max_message_size=self.settings.websocket_max_message_size,
                on_activity=admission.on_activity,
                keepalive=keepalive.interval_for(process),
            )
            try:
                # The relay connects itself; its connection counts against max_websockets.
                async with client.reserved():
                    await relay_websocket(scope, receive, send, target)
            except BackendError as exc:  # from reserved(): no room within connect_timeout
                message = f"{admission.server}: {exc}"
                raise self.gate.refusal(Refused(exc.status, message, server=admission.server)) from None


# Host is kept: the relay sends it (the client's, or its override) as the handshake's Host.
_WS_HANDSHAKE_HEADERS = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
        b"content-length",
    }
)


def _with_header(send: Any, header: tuple[bytes, bytes]) -> Any:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return wrapped


def create_app(settings: Settings, supervisors: Supervisors) -> QuartTrio:
    """The trioproxy ASGI app: Quart for its own pages and API, the dispatcher in front."""
    from .api import make_blueprint

    app = QuartTrio("trioproxy")
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    dispatcher = Dispatcher(app.asgi_app, settings, supervisors)
    blueprint = make_blueprint(settings, supervisors, dispatcher.metrics)
    app.register_blueprint(blueprint, url_prefix=settings.base_url.rstrip("/") or None)
    app.asgi_app = dispatcher  # type: ignore[method-assign,assignment]
    app.extensions["trioproxy"] = dispatcher
    return app

