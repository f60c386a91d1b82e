"""Cross-origin checks for WebSocket upgrades, as Jupyter's ``allow_origin`` options work.

Browsers let any page open a WebSocket to any site and send that site's cookies along, so a
WebSocket whose Origin is another site is refused unless configured otherwise. Clients that
send no Origin (not browsers) are let through; they must still authenticate. Behind another
proxy, the Host the browser used is in X-Forwarded-Host, believed only from the addresses
allowed to send forwarded headers.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

from .relay.upstream import DEFAULT_FORWARDED_ALLOW, trusted_forwarded


def origin_allowed(
    scope: dict[str, Any],
    allow_origin: str = "",
    allow_origin_pat: str = "",
    forwarded_allow: Collection[str] = DEFAULT_FORWARDED_ALLOW,
) -> bool:
    headers = scope["headers"]
    origin = next((v.decode("latin-1") for n, v in headers if n == b"origin"), None)
    if origin is None:
        return True
    if allow_origin == "*":
        return True
    if allow_origin and origin == allow_origin:
        return True
    if allow_origin_pat and re.fullmatch(allow_origin_pat, origin):
        return True
    host = next((v.decode("latin-1") for n, v in headers if n == b"host"), None)
    forwarded_host = trusted_forwarded(scope, b"x-forwarded-host", forwarded_allow)
    try:
        origin_host = urlsplit(origin).netloc.lower()
    except ValueError:  # not a URL (e.g. "http://[", an unclosed IPv6 literal): no origin we allow
        return False
    return bool(origin_host) and origin_host in {(host or "").lower(), forwarded_host or ""} - {""}
