"""The admission pipeline: what every relayed request passes before it reaches a backend.

Relayed requests come in by two transports: ASGI messages from Hypercorn (:class:`~trioproxy.app.Dispatcher`)
and the WebSocket fast path, which takes an upgrade off the socket before Hypercorn sees it
(:mod:`trioproxy.fastpath`). Both call one :class:`Gate`, so that the rules are the same
whichever way a request came:

    head limits → authenticate → WebSocket origin → host allowlist → what the route accepts
    → (the transport's own checks) → a browser's navigation to a server not ready: its start page
    → in use → start the server, wait until ready → upstream request
    (with the identity headers for a ``forward_user`` server)

A refusal at any step is a :class:`Refused`, with its status, message (secrets masked) and,
for a browser that is not logged in, where to log in; each transport renders it as it can.
An admitted request is an :class:`Admission`: the backend client, the upstream request, and
the supervisor it counts against as *in use* from before its server is started until the
transport is done with it (idle culling and ``?when=idle`` reloads wait for that).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .auth import Identity, mask_secrets, strip_token_from_query
from .backend import Backend, BackendClient, ProxyTargets
from .config import ServerProcess
from .identity import signed_headers
from .metrics import PROXY_LABEL
from .origin import origin_allowed
from .paths import PathTable
from .relay.headers import handshake_not_ascii, header_value, non_ascii_handshake_header
from .relay.rewrite import RelayedRequest
from .relay.upstream import Upstream, upstream_request
from .routing import Route, resolve
from .startpage import divert
from .supervisor import ServerSupervisor, ServerUnavailable, Supervisors

if TYPE_CHECKING:
    from .app import Settings

log = logging.getLogger("trioproxy.admission")

# Scope key set when a request to a named server counts as its activity; a WebSocket's
# messages then count too.
ACTIVITY = "trioproxy.activity"

AUTHENTICATION_REQUIRED = "Authentication required: a valid token is needed."


class Refused(Exception):
    """A request the gate turns away, with what its client is told.

    ``login``: where a browser should go to log in (a redirect instead of the page, for a
    top-level GET that asked for HTML). ``retry_after``: seconds after which the same request
    may succeed (a server starting or backing off). ``location``: a redirect elsewhere (the
    start page), with ``headers`` (a login's cookie) added to it.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        server: str | None = None,
        output: list[str] | None = None,
        retry_after: float | None = None,
        login: str | None = None,
        location: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.server = server
        self.output = output or []
        self.retry_after = retry_after
        self.login = login
        self.location = location
        self.headers = headers or []


@dataclass
class Admission:
    """A request let through: where it goes and what the backend gets (but the body)."""

    route: Route
    identity: Identity
    server: str  # for messages: the server's name, or "proxy <host>:<port>"
    label: str  # for metrics: the server's name, or PROXY_LABEL
    client: BackendClient
    upstream: Upstream
    process: ServerProcess | None = None
    supervisor: ServerSupervisor | None = None
    counts_as_activity: bool = False

    @property
    def on_activity(self) -> Callable[[], None] | None:
        """What a relay calls for traffic that counts as the server's activity, if any does."""
        if self.supervisor is not None and self.counts_as_activity:
            return self.supervisor.touch
        return None


class Gate:
    """The one admission pipeline; see the module's docstring."""

    def __init__(self, settings: Settings, supervisors: Supervisors, proxy_targets: ProxyTargets) -> None:
        self.settings = settings
        self.supervisors = supervisors
        self.proxy_targets = proxy_targets
        self._activity_errors: set[str] = set()  # servers whose activity callable failed once
        self._paths: tuple[tuple[int, int], PathTable] | None = None

    def route(self, scope: dict[str, Any]) -> Route:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        return resolve(raw_path, self.settings.base_url, self.paths(), self.settings.root_server)

    def paths(self) -> PathTable:
        """The servers' paths, built again when the set of servers changes: every change after
        start-up bumps the generation; the servers added at start-up change the count."""
        key = (self.supervisors.generation, len(self.supervisors))
        if self._paths is None or self._paths[0] != key:
            self._paths = (key, PathTable.of(self.supervisors))
        return self._paths[1]

    def check_head(self, scope: dict[str, Any]) -> None:
        """Limits of the request head that Hypercorn does not enforce (it bounds the size)."""
        if len(scope["headers"]) > self.settings.max_header_count:
            raise Refused(431, "Too many request headers.")
        if scope["type"] == "websocket":
            not_ascii = non_ascii_handshake_header(scope["headers"])
            if not_ascii is not None:
                raise Refused(400, handshake_not_ascii(not_ascii))

    async def authenticate(self, scope: dict[str, Any]) -> Identity:
        auth = self.settings.auth
        identity = await auth.authenticate(scope)
        if identity is not None:
            return identity
        login = None
        if scope["type"] == "http" and scope["method"] == "GET" and b"text/html" in (
            header_value(scope["headers"], b"accept") or b""
        ):
            query = scope.get("query_string", b"")
            here = scope.get("root_path", "") + scope["path"] + ("?" + query.decode("latin-1") if query else "")
            login = auth.login_url(here)
        raise Refused(403, AUTHENTICATION_REQUIRED, login=login)

    def refusal(self, exc: ServerUnavailable | Refused) -> Refused:
        """``exc`` as a refusal its client may see: a server's output may echo its token or env."""
        if isinstance(exc, ServerUnavailable):
            exc = Refused(exc.status, str(exc), server=exc.server, output=exc.output, retry_after=exc.retry_after)
        known = self.settings.auth.known_secrets()
        return Refused(
            exc.status,
            mask_secrets(exc.message, known),
            server=exc.server,
            output=[mask_secrets(line, known) for line in exc.output],
            retry_after=exc.retry_after,
            login=exc.login,
            location=exc.location,
            headers=exc.headers,
        )

    @asynccontextmanager
    async def admit(
        self,
        scope: dict[str, Any],
        route: Route,
        *,
        before_start: Callable[[str], None] | None = None,
    ) -> AsyncIterator[Admission]:
        """Admit a request to a relayed route (``server`` or ``proxy``), or raise :class:`Refused`.

        ``before_start(server)``: the transport's own checks (an HTTP body's framing), run
        once access is granted and before a server is started; it raises :class:`Refused`.
        The request is in use for as long as the context lasts.
        """
        try:
            self.check_head(scope)
            identity = await self.authenticate(scope)
            websocket = scope["type"] == "websocket"
            if websocket and not self._origin_allowed(scope):
                log.warning("refused a cross-origin WebSocket to %s", scope["path"])
                raise Refused(403, "Cross-origin WebSocket refused.")
            if route.kind == "proxy":
                if not self.allowed_host(route.host):
                    raise Refused(403, f"Host {route.host!r} is not allowed.")
                server = f"proxy {route.host}:{route.port}"
                supervisor = None
            elif route.kind == "server":
                server = route.name
                # Looked up after authenticating (which may wait for the Hub): a reload may
                # have removed the server meanwhile.
                supervisor = self.supervisors.get(route.name)
                if supervisor is None:
                    raise Refused(404, f"Not found: no server named {route.name!r} (any more).")
                if not websocket and supervisor.process.raw_socket_proxy:
                    raise Refused(405, f"{route.name!r} only accepts WebSocket connections.", server=server)
            else:
                raise Refused(404, f"Not found: {route.reason or 'not a relayed route'}.")
            if before_start is not None:
                before_start(server)
            if supervisor is not None:
                await self._start_page(scope, route, identity, supervisor)
        except Refused as exc:
            raise self.refusal(exc) from None
        while True:
            with supervisor.in_use() if supervisor is not None else nullcontext():
                try:
                    admission = await self._open(scope, route, identity, server, supervisor)
                except ServerUnavailable as exc:
                    # A reload replaced the server while this request waited for it: the old
                    # one's stop fails its waiting requests; the new one may serve this one.
                    successor = self.supervisors.get(route.name) if supervisor is not None else None
                    if successor is None or successor is supervisor:
                        raise self.refusal(exc) from None
                    supervisor = successor
                    continue
                yield admission
                return

    async def _start_page(
        self, scope: dict[str, Any], route: Route, identity: Identity, supervisor: ServerSupervisor
    ) -> None:
        """A browser's navigation to a server that is not ready goes to its start page at once,
        the start set going (:mod:`trioproxy.startpage`); anything else goes on to wait."""
        location = await divert(scope, route, supervisor, self.settings.base_url)
        if location is not None:
            cookie = [(b"set-cookie", identity.set_cookie)] if identity.set_cookie is not None else []
            cookie.append((b"cache-control", b"no-store"))
            raise Refused(302, f"{route.name} is starting.", server=route.name, location=location, headers=cookie)

    async def _open(
        self,
        scope: dict[str, Any],
        route: Route,
        identity: Identity,
        server: str,
        supervisor: ServerSupervisor | None,
    ) -> Admission:
        counts = False
        process = None
        try:
            if supervisor is None:
                host = route.host[1:-1] if route.host.startswith("[") else route.host
                client = self.proxy_targets.client(Backend(host=host, port=route.port))
            else:
                process = supervisor.process
                counts = self._counts_as_activity(process, scope)
                if counts:
                    scope[ACTIVITY] = True
                    supervisor.touch()
                client = await supervisor.ensure_ready()
        except ServerUnavailable as exc:
            if supervisor is None:
                raise self.refusal(exc) from None
            raise  # admit() decides: its server may have been replaced meanwhile
        try:
            upstream = self._upstream(scope, route, supervisor)
            signed = signed_headers(identity, process) if process is not None else []
            if signed:
                upstream = replace(upstream, headers=[*upstream.headers, *signed])
        except Exception as exc:  # a mapping callable or a header template that fails
            log.error("%s: cannot build the request: %s: %s", server, type(exc).__name__, exc, exc_info=exc)
            raise self.refusal(
                Refused(500, f"Cannot build the request for {server}: {exc}", server=server)
            ) from None
        return Admission(
            route=route,
            identity=identity,
            server=server,
            label=PROXY_LABEL if supervisor is None else route.name,
            client=client,
            upstream=upstream,
            process=process,
            supervisor=supervisor,
            counts_as_activity=counts,
        )

    def allowed_host(self, host: str) -> bool:
        allowlist = self.settings.host_allowlist
        if callable(allowlist):
            try:
                return bool(allowlist(self, host))
            except Exception:
                log.exception("host_allowlist callable failed for %r; refusing", host)
                return False
        return host in allowlist

    def _origin_allowed(self, scope: dict[str, Any]) -> bool:
        settings = self.settings
        return origin_allowed(scope, settings.allow_origin, settings.allow_origin_pat, settings.forwarded_allow_ips)

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
                    exc_info=exc,
                )
            return True

    def _upstream(self, scope: dict[str, Any], route: Route, supervisor: ServerSupervisor | None) -> Upstream:
        """What the backend gets but the body. Raises if a mapping or a header template fails."""
        strip_query = strip_token_from_query if self.settings.strip_token_query else None
        common: dict[str, Any] = {
            "strip_credentials": self.settings.auth.strip_credentials,
            "strip_query": strip_query,
            "forwarded_allow": self.settings.forwarded_allow_ips,
        }
        if supervisor is None:
            return upstream_request(scope, route, default_host=f"{route.host}:{route.port}", **common)
        process = supervisor.process
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


def relayed_request(scope: dict[str, Any]) -> RelayedRequest:
    """The request as ``rewrite_response`` and ``update_last_activity`` callables see it.

    ``path`` and ``uri`` are as the client sent them (still percent-encoded), as in Tornado.
    """
    from .relay.header_map import HeaderMap

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
