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

from .auth import Identity, TokenAuth, mask_secrets, strip_token_from_query
from .backend import Backend, BackendClient, BackendError, ClientOptions, ProxyTargets
from .body import BodyGuard
from .config import ServerProcess
from .errors import send_error, send_redirect
from .listener import CLIENT_SOCKET
from .metrics import PROXY_LABEL, HttpExchange, Metrics, WebSocketExchange, log_access
from .relay.framing import FramingError, declared_length
from .relay.headers import Headers
from .relay.http import RelayTarget, relay_http
from .relay.pump import AVAILABLE as PUMP_AVAILABLE
from .relay.pump import TunnelPump
from .relay.rewrite import HeaderMap, RelayedRequest, RewriteContext
from .relay.upstream import DEFAULT_FORWARDED_ALLOW, Upstream, upstream_request
from .routing import Route, resolve
from .supervisor import ServerUnavailable, Supervisors

log = logging.getLogger("trioproxy.app")

# Scope key set when a request to a named server counts as its activity (see
# Dispatcher._counts_as_activity); a WebSocket's messages then count too.
ACTIVITY = "trioproxy.activity"


@dataclass
class Settings:
    """How the app behaves; the CLI fills it from the configuration."""

    base_url: str = "/"
    auth: Any = field(default_factory=lambda: TokenAuth(None))
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


class Dispatcher:
    """The outermost ASGI callable: decides each request's route and relays it."""

    def __init__(self, ui: Callable[..., Any], settings: Settings, supervisors: Supervisors):
        self.ui = ui
        self.settings = settings
        self.supervisors = supervisors
        self.proxy_targets = ProxyTargets(settings.proxy_client_options)
        self.metrics = Metrics()
        self._activity_errors: set[str] = set()  # servers whose activity callable failed once
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
            supervisor = self.supervisors.get(server)  # gone if a reload removed it meanwhile
            if scope.get(ACTIVITY) and supervisor is not None:
                supervisor.touch()  # a long response is activity until it ends
        log_access(scope, scope["method"], exchange.status, exchange.sent, exchange.began)

    async def _dispatch(
        self, scope: dict[str, Any], receive: Any, send: HttpExchange | WebSocketExchange
    ) -> None:
        if len(scope["headers"]) > self.settings.max_header_count:
            await self._too_many_headers(scope, receive, send)
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        route = resolve(raw_path, self.settings.base_url, self.supervisors, self.settings.root_server)
        if route.kind == "app":
            await self.ui(scope, receive, send)
            return
        identity = await self.settings.auth.authenticate(scope)
        if identity is None:
            await self._refuse(scope, receive, send)
            return
        if route.kind == "server":
            send.server = route.name
        elif route.kind == "proxy":
            send.server = PROXY_LABEL
        if not isinstance(send, HttpExchange):
            await self._websocket(scope, receive, send, route, identity)
            return
        if route.kind == "add-slash":
            await self._add_slash(scope, send, raw_path)
        elif route.kind == "not-found":
            await self._send_error(send, scope["headers"], 404, f"Not found: {route.reason}.")
        else:
            await self._http(scope, receive, send, route, identity)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            from .relay.websocket import refuse_websocket

            await refuse_websocket(scope, receive, send, 403, "Authentication required: a valid token is needed.")
            return
        headers: Headers = scope["headers"]
        accept = next((v for n, v in headers if n == b"accept"), b"")
        if scope["method"] == "GET" and b"text/html" in accept:
            query = scope.get("query_string", b"")
            here = scope.get("root_path", "") + scope["path"] + (
                "?" + query.decode("latin-1") if query else ""
            )
            await send_redirect(send, self.settings.auth.login_url(here))
            return
        await self._send_error(send, headers, 403, "Authentication required: a valid token is needed.")

    async def _send_error(
        self,
        send: Any,
        request_headers: Headers,
        status: int,
        message: str,
        *,
        server: str | None = None,
        output: list[str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        """An error page with secrets masked: a server's output may echo ?token= or its env."""
        known = self.settings.auth.known_secrets() if hasattr(self.settings.auth, "known_secrets") else []
        await send_error(
            send,
            request_headers,
            status,
            mask_secrets(message, known),
            server=server,
            output=[mask_secrets(line, known) for line in output] if output else output,
            retry_after=retry_after,
        )

    async def _unavailable(self, send: Any, request_headers: Headers, exc: ServerUnavailable) -> None:
        # A page for a server that is starting or backing off refreshes itself until it is up.
        await self._send_error(
            send, request_headers, exc.status, str(exc), server=exc.server, output=exc.output, retry_after=exc.retry_after
        )

    async def _too_many_headers(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # Hypercorn bounds the size of a request head (h11_max_incomplete_size); this bounds
        # the count, so a head of thousands of tiny headers is not relayed either.
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        await self._send_error(send, scope["headers"], 431, "Too many request headers.")

    async def _add_slash(self, scope: dict[str, Any], send: Any, raw_path: bytes) -> None:
        query = scope.get("query_string", b"")
        location = raw_path.decode("latin-1") + "/" + ("?" + query.decode("latin-1") if query else "")
        await send_redirect(send, location)

    # -- targets ----------------------------------------------------------------------------

    def _allowed_host(self, host: str) -> bool:
        allowlist = self.settings.host_allowlist
        if callable(allowlist):
            try:
                return bool(allowlist(self, host))
            except Exception:
                log.exception("host_allowlist callable failed for %r; refusing", host)
                return False
        return host in allowlist

    async def _backend_for(self, route: Route, scope: dict[str, Any]) -> tuple[BackendClient, ServerProcess | None]:
        if route.kind == "proxy":
            host = route.host[1:-1] if route.host.startswith("[") else route.host
            return self.proxy_targets.client(Backend(host=host, port=route.port)), None
        supervisor = self.supervisors[route.name]
        if self._counts_as_activity(supervisor.process, scope):
            scope[ACTIVITY] = True
            supervisor.touch()
        return await supervisor.ensure_ready(), supervisor.process

    def _counts_as_activity(self, process: ServerProcess, scope: dict[str, Any]) -> bool:
        """jupyter-server-proxy's rules, plus a callable ``update_last_activity``.

        ``update_last_activity`` false: nothing counts. A request whose full path (without
        the query) ``re.match``-es one of ``exclude_last_activity_patterns`` does not count.
        A callable ``update_last_activity`` decides the rest, given a
        :class:`~trioproxy.relay.rewrite.RelayedRequest` (``method``, ``path``, ``query``,
        ``uri``, ``headers``, ``remote_ip``…, and the handler methods jupyter-server-proxy's
        callables use, such as ``get_argument``); if it raises, the request counts, so that
        a bug in it cannot get a server in use culled.
        """
        setting = process.update_last_activity
        if not setting:
            return False
        patterns = process.exclude_last_activity_patterns
        if patterns:
            path = scope["path"]
            if any(pattern.match(path) for pattern in patterns):
                return False
        if not callable(setting):
            return True
        try:
            return bool(setting(relayed_request(scope)))
        except Exception as exc:
            if process.name not in self._activity_errors:
                self._activity_errors.add(process.name)
                log.error(
                    "%s: update_last_activity failed (%s: %s); counting every request as activity",
                    process.name,
                    type(exc).__name__,
                    exc,
                )
            return True

    def _upstream(self, scope: dict[str, Any], route: Route, process: ServerProcess | None) -> Upstream:
        """What the backend gets but the body. Raises if a mapping or a header template fails."""
        strip_query = strip_token_from_query if self.settings.strip_token_query else None
        common: dict[str, Any] = {
            "strip_credentials": self.settings.auth.strip_credentials,
            "strip_query": strip_query,
            "forwarded_allow": self.settings.forwarded_allow_ips,
        }
        if process is None:
            return upstream_request(scope, route, default_host=f"{route.host}:{route.port}", **common)
        supervisor = self.supervisors[route.name]
        return upstream_request(
            scope,
            route,
            absolute_url=process.absolute_url,
            mappath=process.mappath,
            overrides=process.request_headers_override,
            template_variables=supervisor.template_variables(),
            default_host=supervisor.backend.describe() if not supervisor.unix_socket else "localhost",
            **common,
        )

    # -- HTTP -------------------------------------------------------------------------------

    async def _http(
        self, scope: dict[str, Any], receive: Any, send: HttpExchange, route: Route, identity: Identity
    ) -> None:
        headers_in: Headers = scope["headers"]
        server_name = route.name if route.kind == "server" else f"proxy {route.host}:{route.port}"
        if route.kind == "proxy" and not self._allowed_host(route.host):
            await self._send_error(send, headers_in, 403, f"Host {route.host!r} is not allowed.")
            return
        if route.kind == "server" and self.supervisors[route.name].process.raw_socket_proxy:
            await self._send_error(send, headers_in, 405, f"{route.name!r} only accepts WebSocket connections.", server=route.name)
            return
        try:
            length = declared_length(headers_in)
        except FramingError as exc:
            log.warning("%s: refused a request: %s", server_name, exc)
            await self._send_error(send, headers_in, 400, f"Bad request: {exc}.", server=server_name)
            return
        body = BodyGuard(receive, self.settings.max_body_size, self.settings.body_timeout)
        if body.declared_too_large(headers_in, scope.get("http_version", "1.1")):
            await self._send_error(send, headers_in, 413, body.too_large_message, server=server_name)
            return
        began = trio.current_time()
        try:
            client, process = await self._backend_for(route, scope)
        except ServerUnavailable as exc:
            await self._unavailable(send, headers_in, exc)
            return
        try:
            upstream = self._upstream(scope, route, process)
        except Exception as exc:
            log.error("%s: cannot build the request: %s", server_name, exc)
            await self._send_error(send, headers_in, 500, f"Cannot build the request for {server_name}: {exc}", server=server_name)
            return
        rewrites = self._rewrites(route, process, headers_in)
        supervisor = self.supervisors[route.name] if route.kind == "server" else None
        target = RelayTarget(
            server=server_name,
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
        exchange = send
        if identity.set_cookie is not None:
            send = _with_header(send, (b"set-cookie", identity.set_cookie))
        if supervisor is not None:
            supervisor.active += 1  # not idle while a response is under way
        try:
            await relay_http(scope, body, send, target)
        except ServerUnavailable as exc:  # its replacement could not start
            await self._unavailable(send, headers_in, exc)
        except BackendError as exc:
            if exchange.started:
                return
            if body.failure is not None:
                await self._send_error(send, headers_in, *body.failure, server=server_name)
                return
            log.warning("%s: %s", server_name, exc)
            await self._send_error(send, headers_in, exc.status, f"{server_name}: {exc}", server=server_name)
        except Exception as exc:  # a rewrite callable or a protocol error: report, don't crash
            if body.failure is not None:
                log.info("%s: request body refused: %s", server_name, body.failure[1])
                if not exchange.started:
                    await self._send_error(send, headers_in, *body.failure, server=server_name)
                return
            log.error("%s: relay failed: %s: %s", server_name, type(exc).__name__, exc)
            if not exchange.started:
                await self._send_error(send, headers_in, 500, f"{server_name}: {type(exc).__name__}: {exc}", server=server_name)
        finally:
            exchange.received = body.received
            if supervisor is not None:
                supervisor.active -= 1

    def _rewrites(self, route: Route, process: ServerProcess | None, headers: Headers) -> list[Callable[..., Any]]:
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

    async def _websocket(
        self, scope: dict[str, Any], receive: Any, send: Any, route: Route, identity: Identity
    ) -> None:
        from .relay.websocket import WebSocketTarget, refuse_websocket, relay_websocket

        if route.kind not in ("server", "proxy"):
            reason = route.reason or "not a WebSocket route"
            await refuse_websocket(scope, receive, send, 404, f"Not found: {reason}.")
            return
        if not self._origin_allowed(scope):
            log.warning("refused a cross-origin WebSocket to %s", scope["path"])
            await refuse_websocket(scope, receive, send, 403, "Cross-origin WebSocket refused.")
            return
        if route.kind == "proxy" and not self._allowed_host(route.host):
            await refuse_websocket(scope, receive, send, 403, f"Host {route.host!r} is not allowed.")
            return
        try:
            client, process = await self._backend_for(route, scope)
        except ServerUnavailable as exc:
            await refuse_websocket(scope, receive, send, exc.status, str(exc), exc.server, exc.output, exc.retry_after)
            return
        try:
            upstream = self._upstream(scope, route, process)
        except Exception as exc:
            log.error("%s: cannot build the WebSocket request: %s", route.name or route.host, exc)
            await refuse_websocket(scope, receive, send, 500, f"Cannot build the request: {exc}")
            return
        supervisor = self.supervisors.get(route.name) if route.kind == "server" else None
        target = WebSocketTarget(
            server=route.name or f"{route.host}:{route.port}",
            backend=client.backend,
            connect_timeout=client.options.connect_timeout,
            target=upstream.target,
            headers=[(n, v) for n, v in upstream.headers if n not in _WS_HANDSHAKE_HEADERS],
            subprotocols=list(scope.get("subprotocols") or []),
            raw_socket=bool(process is not None and process.raw_socket_proxy),
            max_message_size=self.settings.websocket_max_message_size,
            on_activity=supervisor.touch if supervisor is not None and scope.get(ACTIVITY) else None,
        )
        if supervisor is not None:
            supervisor.active += 1
        try:
            await relay_websocket(scope, receive, send, target)
        finally:
            if supervisor is not None:
                supervisor.active -= 1

    def _origin_allowed(self, scope: dict[str, Any]) -> bool:
        from .origin import origin_allowed

        settings = self.settings
        return origin_allowed(scope, settings.allow_origin, settings.allow_origin_pat, settings.forwarded_allow_ips)


def relayed_request(scope: dict[str, Any]) -> RelayedRequest:
    """The request as ``rewrite_response`` and ``update_last_activity`` callables see it.

    ``path`` and ``uri`` are as the client sent them (still percent-encoded), as in Tornado.
    """
    headers = HeaderMap.from_raw(scope["headers"])
    query = scope.get("query_string", b"").decode("latin-1")
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    client = scope.get("client")
    scheme = scope.get("scheme", "http")
    return RelayedRequest(
        method=scope.get("method", "GET"),
        uri=path + ("?" + query if query else ""),
        path=path,
        query=query,
        headers=headers,
        host=headers.get("host", "") or "",
        remote_ip=client[0] if client else None,
        protocol={"ws": "http", "wss": "https"}.get(scheme, scheme),
        version="HTTP/" + scope.get("http_version", "1.1"),
    )


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
    app.register_blueprint(make_blueprint(settings, supervisors), url_prefix=settings.base_url.rstrip("/") or None)
    dispatcher = Dispatcher(app.asgi_app, settings, supervisors)
    app.asgi_app = dispatcher  # type: ignore[method-assign,assignment]
    app.extensions["trioproxy"] = dispatcher
    return app

