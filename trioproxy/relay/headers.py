"""Header and path rules for relaying: pure functions, no I/O.

Header names are lower-case bytes, as ASGI servers and h11 give them; they are written to
backends in canonical case (:func:`canonical_name`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 connection-specific fields, plus the proxy ones jupyter-server-proxy drops.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

# RFC 3986 unreserved and reserved characters stay as they are, and so does every existing
# percent-escape; anything else is percent-encoded. Unlike jupyter-server-proxy, which decodes
# first, "%2F" and "%23" reach the backend as sent rather than as "/" and a cut-off "#".
_NEEDS_QUOTING = re.compile(rb"[^A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]|%(?![0-9A-Fa-f]{2})")


def requote_path(raw_path: bytes) -> bytes:
    """Percent-encode what may not appear in a request target, keep everything else."""
    return _NEEDS_QUOTING.sub(lambda match: b"%%%02X" % match.group()[0], raw_path)


@lru_cache(maxsize=1024)
def canonical_name(name: bytes) -> bytes:
    """A header name as Tornado, and so jupyter-server-proxy, writes it to backends.

    Each dash-separated word capitalised and the rest lower-cased: ``x-proxycontextpath`` and
    ``X-ProxyContextPath`` both become ``X-Proxycontextpath``. Names are case-insensitive,
    but some backends compare them as written.
    """
    return b"-".join(word.capitalize() for word in name.split(b"-"))


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop headers, including those the Connection header names.

    Connection cannot take Host away: it is end-to-end, and a backend needs it.
    """
    headers = list(headers)
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
    listed.discard(b"host")
    return [
        (name, value)
        for name, value in headers
        if name.lower() not in HOP_BY_HOP and name.lower() not in listed
    ]


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


# Headers through which a client describes the proxies before us; believed only from a
# trusted proxy, otherwise removed (and the ones we set replace them).
FORWARDING = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-context",
        b"x-proxycontextpath",
        b"x-real-ip",
    }
)


def forwarded_headers(
    client_headers: Headers,
    *,
    client_ip: str | None,
    scheme: str,
    context_path: str | None,
    trusted: bool = True,
) -> Headers:
    """The forwarded headers a backend gets, to replace any of the same name.

    ``context_path`` (the prefix the backend is served under) goes in X-Forwarded-Context,
    X-ProxyContextPath and X-Forwarded-Prefix, as jupyter-server-proxy sets them; it is None
    with ``absolute_url``. From a ``trusted`` client (a proxy in front of us), what it said
    is kept: an X-Forwarded-For chain is extended, its Proto and Host stand, and behind a
    proxy that announced its own prefix (Jupyter's ``/proxy/<port>``) the backend's public
    prefix is that one followed by ours. From anyone else, all of that is replaced by what
    trioproxy itself saw.
    """
    if not trusted:
        client_headers = [(n, v) for n, v in client_headers if n not in FORWARDING]
    added: Headers = []
    previous_for = header_value(client_headers, b"x-forwarded-for")
    if client_ip:
        chain = previous_for + b", " if previous_for else b""
        added.append((b"x-forwarded-for", chain + client_ip.encode("latin-1")))
    if header_value(client_headers, b"x-forwarded-proto") is None:
        added.append((b"x-forwarded-proto", scheme.encode("latin-1")))
    host = header_value(client_headers, b"host")
    if host is not None and header_value(client_headers, b"x-forwarded-host") is None:
        added.append((b"x-forwarded-host", host))
    if context_path is not None:
        outer = header_value(client_headers, b"x-forwarded-prefix") or header_value(
            client_headers, b"x-forwarded-context"
        )
        value = context_path.encode("latin-1")
        if outer and outer.startswith(b"/") and not value.startswith(outer.rstrip(b"/") + b"/"):
            value = outer.rstrip(b"/") + value
        added += [
            (b"x-forwarded-context", value),
            (b"x-proxycontextpath", value),
            (b"x-forwarded-prefix", value),
        ]
    return added


def replace_headers(headers: Headers, overrides: Headers) -> Headers:
    names = {name for name, _ in overrides}
    return [(n, v) for n, v in headers if n not in names] + overrides


def rewrite_location(
    location: str, *, context_path: str, request_host: str | None, backend_hosts: Iterable[str]
) -> str:
    """Keep a redirect under the proxy prefix.

    An absolute path (``/login``) gets the prefix; so does an absolute URL pointing at the
    proxy's own host or at the backend's address, both of which the backend may have built
    from the Host header or its own bind address. Relative references already resolve under
    the prefix, and off-site URLs are left alone.
    """
    parts = urlsplit(location)
    prefix = context_path.rstrip("/")
    if parts.scheme or parts.netloc:
        if parts.scheme not in ("http", "https"):
            return location
        if parts.netloc != request_host and parts.netloc not in set(backend_hosts):
            return location
        if parts.path == prefix or parts.path.startswith(prefix + "/"):
            return location
        netloc = request_host if request_host else parts.netloc
        return urlunsplit((parts.scheme, netloc, prefix + (parts.path or "/"), parts.query, parts.fragment))
    if not parts.path.startswith("/") or parts.path.startswith("//"):
        return location
    if parts.path == prefix or parts.path.startswith(prefix + "/"):
        return location
    return urlunsplit(("", "", prefix + parts.path, parts.query, parts.fragment))


def wants_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether an error should be JSON (API clients) rather than HTML (browsers)."""
    accept = (header_value(headers, b"accept") or b"").lower()
    if b"text/html" in accept:
        return False
    return b"json" in accept or not accept or accept.strip() == b"*/*"


# A WebSocket handshake's own headers: parsed as ASCII tokens by every WebSocket library
# (wsproto, behind Hypercorn, raised on anything else), so a value that is not ASCII is a 400.
WEBSOCKET_HANDSHAKE = frozenset(
    {b"connection", b"upgrade", b"sec-websocket-key", b"sec-websocket-version",
     b"sec-websocket-protocol", b"sec-websocket-extensions"}
)  # fmt: skip


def non_ascii_handshake_header(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The first handshake header whose value is not ASCII, or None."""
    for name, value in headers:
        if name in WEBSOCKET_HANDSHAKE and not value.isascii():
            return name.decode()
    return None


def handshake_not_ascii(name: str) -> str:
    return f"Bad Request: the {name} header of a WebSocket handshake must be ASCII."
