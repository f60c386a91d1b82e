"""What a backend gets for one client request: path, query and headers. Pure, no I/O.

The client's request arrives as an ASGI scope; the backend gets the path below the server's
prefix (or the full path with ``absolute_url``), mapped by ``mappath`` and requoted, the
query, and the client's headers without hop-by-hop and framing ones, without trioproxy's own
credentials and any copy of the identity headers (:mod:`trioproxy.identity`), with the
forwarded headers and the server's overrides.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from ..identity import is_identity_header
from ..options import check_header
from ..routing import Route
from ..templating import call_with_asked_args, expand_dict
from .framing import FRAMING
from .headers import FORWARDING, Headers, forwarded_headers, replace_headers, requote_path, strip_hop_by_hop

# X-Forwarded-Proto/-Host/-For and friends are believed only from these client addresses
# (uvicorn's forwarded_allow_ips default); from anyone else they are replaced.
DEFAULT_FORWARDED_ALLOW = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Upstream:
    absolute: bool  # the backend gets the full path, prefix included
    path: bytes  # as sent, without the query
    target: bytes  # path and query
    headers: Headers  # final, but for the body's framing header


def trusted_proxy(client: Any, allow: Collection[str]) -> bool:
    """Whether the client at ``scope["client"]`` may tell us its forwarded headers.

    ``allow`` holds addresses, networks (``10.0.0.0/8``) or ``*``. A client with no address
    (a unix socket) is local, hence trusted.
    """
    if "*" in allow:
        return True
    if not client or not client[0]:
        return True
    host = client[0]
    if host in allow:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in allow:
        if "/" in entry:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def trusted_forwarded(scope: Mapping[str, Any], name: bytes, allow: Collection[str]) -> str | None:
    """The first value of the forwarded header ``name`` (e.g. ``b"x-forwarded-proto"``),
    lower-cased, if the client may tell it (:func:`trusted_proxy`); else None."""
    if not trusted_proxy(scope.get("client"), allow):
        return None
    value = next((v for n, v in scope["headers"] if n == name), None)
    if value is None:
        return None
    return value.decode("latin-1").split(",")[0].strip().lower() or None


def upstream_path(route: Route, absolute: bool, raw_path: bytes, mappath: Any) -> bytes:
    """The path the backend gets: below the prefix or whole, mapped, requoted."""
    path = raw_path if absolute else route.upstream_path
    if mappath:
        decoded = unquote(path.decode("latin-1"))
        if callable(mappath):
            mapped = call_with_asked_args(mappath, {"path": decoded})
        else:
            mapped = mappath.get(decoded, decoded)
        if mapped != decoded:
            path = str(mapped).encode("utf-8")
    return requote_path(path)


def upstream_headers(
    scope: Mapping[str, Any],
    *,
    context_path: str | None,
    strip_credentials: Callable[[Headers], Headers],
    trusted: bool,
    overrides: Mapping[str, str] | None = None,
    default_host: str = "localhost",
) -> Headers:
    """The client's end-to-end headers, our forwarded headers and the overrides, plus Host.

    Raises OptionError if an override (from a callable or a template) is not a header.
    """
    client_headers: Headers = scope["headers"]
    dropped = FRAMING if trusted else FRAMING | FORWARDING
    # A client's copy of forward_user's identity headers never passes (trioproxy.identity).
    headers = [
        (name, value)
        for name, value in strip_credentials(strip_hop_by_hop(client_headers))
        if name not in dropped and not is_identity_header(name)
    ]
    client = scope.get("client")
    headers = replace_headers(
        headers,
        forwarded_headers(
            client_headers,
            client_ip=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            context_path=context_path,
            trusted=trusted,
        ),
    )
    if overrides:
        for name, value in overrides.items():
            check_header("request_headers_override", name, value)
        headers = replace_headers(
            headers, [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in overrides.items()]
        )
    if not any(name == b"host" for name, _ in headers):
        # HTTP/1.0 clients may send none; HTTP/1.1 backends must get one (RFC 9112 §3.2).
        headers.append((b"host", default_host.encode("latin-1")))
    return headers


def upstream_request(
    scope: Mapping[str, Any],
    route: Route,
    *,
    absolute_url: bool = False,
    mappath: Any = None,
    overrides: Any = None,
    template_variables: Mapping[str, Any] | None = None,
    strip_credentials: Callable[[Headers], Headers] = lambda headers: headers,
    strip_query: Callable[[bytes], bytes] | None = None,
    forwarded_allow: Collection[str] = DEFAULT_FORWARDED_ALLOW,
    default_host: str = "localhost",
) -> Upstream:
    """Everything the backend gets but the body. Raises if a mapping or a template fails."""
    absolute = route.absolute or absolute_url
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    # As jupyter-server-proxy: mappath maps HTTP requests; a WebSocket goes to the path it asked
    # (an app mapping "/" to its page keeps its WebSocket at "/").
    if scope.get("type") == "websocket":
        mappath = None
    path = upstream_path(route, absolute, raw_path, mappath)
    expanded = expand_dict(overrides, dict(template_variables or {})) if overrides else None
    headers = upstream_headers(
        scope,
        context_path=None if absolute else route.context_path,
        strip_credentials=strip_credentials,
        trusted=trusted_proxy(scope.get("client"), forwarded_allow),
        overrides=expanded,
        default_host=default_host,
    )
    query: bytes = scope.get("query_string", b"")
    if query and strip_query is not None:
        query = strip_query(query)
    return Upstream(absolute, path, path + (b"?" + query if query else b""), headers)
