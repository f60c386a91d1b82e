"""Which route a request path takes: pure logic, no I/O.

Paths come as the raw bytes the client sent (``raw_path``), so that what the backend sees
keeps the client's escaping; each segment is decoded only to be matched.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from urllib.parse import unquote

# jupyter-server-proxy's forms: proxy/<port>/, proxy/<host>:<port>/ and their absolute/
# variants. A host is a DNS name or an IPv4 address (no userinfo, no separators); an IPv6
# literal must be bracketed.
_PORT = r"(?P<port>[0-9]{1,5})"
_HOST = r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
_TARGET = re.compile(rf"^(?:{_HOST}:)?{_PORT}$")


@dataclass(frozen=True)
class Route:
    """Where a request goes.

    kind: ``server`` (a named server), ``proxy`` (proxy/<host>:<port>), ``add-slash``
    (redirect to the same path with a trailing slash), ``alias`` (redirect to ``redirect``
    followed by ``upstream_path``: one of a server's ``aliases``), ``app`` (trioproxy's own
    pages and API), or ``not-found`` (with ``reason``).
    """

    kind: str
    name: str = ""
    host: str = "localhost"
    port: int = 0
    absolute: bool = False
    upstream_path: bytes = b"/"  # what follows the prefix, raw, or the full path if absolute
    context_path: str = ""  # the public prefix, without a trailing slash
    app_path: str = ""  # for kind "app": the path below the base URL
    reason: str = ""
    redirect: str = ""  # for kind "alias": the server's public prefix, ending with "/"


# trioproxy's own routes, by their first path segment: a server may be named "loginx".
OWN_SEGMENTS = frozenset({"server-proxy", "login", "logout", "oauth_callback"})
# ... and by their whole path: "api" alone answers trioproxy's version, unauthenticated, as
# jupyterhub-singleuser's does (Kubernetes probes and the Hub look there), while "api/..."
# still belongs to a server named "api". Under a root server, "api" is the app's.
OWN_PATHS = frozenset({"api"})


def resolve(
    raw_path: bytes, base_url: str, servers: Container[str], root_server: str | None = None
) -> Route:
    """Route ``raw_path`` (no query) under ``base_url`` (which ends with "/").

    ``servers``: the names of the servers, each served at ``<name>/``, or a
    :class:`trioproxy.paths.PathTable` (servers at their ``path``, and their ``aliases``).
    """
    base = base_url.encode("utf-8")
    if not raw_path.startswith(base):
        if raw_path + b"/" == base:
            return Route("add-slash")
        return Route("not-found", reason="outside the base URL")
    rest = raw_path[len(base) :]
    first, slash, after = rest.partition(b"/")
    segment = unquote(first.decode("latin-1"))

    if segment == "proxy":
        return _proxy_route(after, base_url, has_slash=bool(slash))
    if segment in OWN_SEGMENTS or (not slash and segment in OWN_PATHS and root_server is None):
        return Route("app", app_path=unquote(rest.decode("latin-1")))
    match = getattr(servers, "match", None)
    if match is not None:
        found = match(rest)
        if found is not None:
            if found.alias:
                return Route("alias", name=found.name, upstream_path=found.rest, redirect=f"{base_url}{found.prefix}/")
            if not found.rest:
                return Route("add-slash", name=found.name)
            return Route(
                "server",
                name=found.name,
                upstream_path=found.rest,
                context_path=base_url + unquote(found.prefix),
            )
    elif segment and segment in servers:
        if not slash:
            return Route("add-slash", name=segment)
        context = base_url + segment
        return Route(
            "server",
            name=segment,
            upstream_path=b"/" + after,
            context_path=context,
        )
    if root_server is not None:
        return Route(
            "server",
            name=root_server,
            upstream_path=b"/" + rest,
            context_path=base_url.rstrip("/"),
        )
    if not rest:
        return Route("app", app_path="")
    return Route("not-found", reason=f"no server named {segment!r}")


def alias_location(route: Route, query: bytes) -> str:
    """Where an ``alias`` route redirects: the server's prefix, the rest of the path as the
    client sent it (escapes kept) and the query."""
    rest = route.upstream_path.decode("latin-1")
    rest = rest[1:] if rest.startswith("/") else rest
    return route.redirect + rest + ("?" + query.decode("latin-1") if query else "")


def _proxy_route(after: bytes, base_url: str, has_slash: bool) -> Route:
    if not has_slash:
        return Route("not-found", reason="missing proxy target")
    absolute = False
    spec, slash, rest = after.partition(b"/")
    if spec == b"absolute":
        absolute = True
        spec, slash, rest = rest.partition(b"/")
    text = unquote(spec.decode("latin-1"))
    match = _TARGET.match(text) if text == spec.decode("latin-1") else None
    if match is None:
        # Percent-escapes in the target, userinfo, paths, empty ports: never relayed.
        return Route("not-found", reason=f"malformed proxy target {text!r}")
    port = int(match["port"])
    if not 0 < port < 65536:
        return Route("not-found", reason=f"port out of range: {port}")
    host = match["host"] or "localhost"
    host_and_port = str(port) if host == "localhost" else f"{host}:{port}"
    context = base_url + ("proxy/absolute/" if absolute else "proxy/") + host_and_port
    if not slash:
        return Route("add-slash", name="proxy", host=host, port=port, absolute=absolute)
    return Route(
        "proxy",
        host=host,
        port=port,
        absolute=absolute,
        upstream_path=b"/" + rest,
        context_path=context,
    )
