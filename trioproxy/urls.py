"""Public URLs of servers, as apps and kernels need to know them. Pure.

A server's *public prefix* is the path clients use to reach it through trioproxy, base URL
included (``/user/alice/tools/refine/``): what TensorBoard's ``--path_prefix``, Bokeh's
``--prefix`` or a Dash app's ``requests_pathname_prefix`` want. trioproxy's *public URL* is
the absolute URL of its base URL when it is known: ``TrioProxy.public_url``
(``--public-url``), else the Hub's ``JUPYTERHUB_PUBLIC_URL``; trioproxy cannot know it
otherwise (it sees Host headers, not the address users type, which differs behind other
proxies), so then it is the base URL path alone, which browsers resolve against the page's
own origin.

Every child gets them in its environment (:func:`child_environment`), with where trioproxy's
runtime file is (its local URL and token, for a library that asks the API); ``{public_prefix}``
is a template variable; ``GET server-proxy/api/url?port=N`` answers the same for a local port
(:func:`url_for_port`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from .paths import server_path

PREFIX_VARIABLE = "TRIOPROXY_PUBLIC_PREFIX"
SERVER_URL_VARIABLE = "TRIOPROXY_PUBLIC_URL"
BASE_URL_VARIABLE = "TRIOPROXY_URL"
RUNTIME_FILE_VARIABLE = "TRIOPROXY_RUNTIME_FILE"


def public_prefix(base_url: str, process: Any) -> str:
    """``base_url`` followed by the server's path, ending with "/"; the base URL itself for
    standalone mode's server, which owns the base URL's root."""
    if process.root:
        return base_url
    return f"{base_url}{server_path(process)}/"


def absolute(public_url: str, base_url: str, path: str) -> str:
    """``path`` (under ``base_url``) as an absolute URL when trioproxy's public URL is known."""
    if not public_url:
        return path
    return public_url.rstrip("/") + "/" + path[len(base_url) :]


def child_environment(base_url: str, public_url: str, process: Any, runtime_file: str | None = None) -> dict[str, str]:
    """The variables every child gets (its own ``environment`` may override them).
    ``runtime_file``: by default this process's (:func:`trioproxy.runtime.file_of`)."""
    if runtime_file is None:
        from .runtime import file_of

        runtime_file = str(file_of(os.getpid()))
    prefix = public_prefix(base_url, process)
    return {
        PREFIX_VARIABLE: prefix,
        SERVER_URL_VARIABLE: absolute(public_url, base_url, prefix),
        BASE_URL_VARIABLE: absolute(public_url, base_url, base_url),
        RUNTIME_FILE_VARIABLE: runtime_file,
    }


def url_for_port(
    port: int,
    supervisors: Mapping[str, Any],
    *,
    base: str,
    base_url: str,
    public_url: str,
    proxy_allowed: Callable[[], bool],
) -> dict[str, Any] | None:
    """Where a local ``port`` is reached: the server listening on it, else ``proxy/<port>/``
    if the host allowlist lets that reach localhost; None when neither. ``base`` is the base
    URL as the asking client reaches it (another proxy's prefix included)."""
    for name, supervisor in supervisors.items():
        process = supervisor.process
        if process.routed and not supervisor.unix_socket and supervisor.port == port:
            prefix = public_prefix(base_url, process)
            path = base + prefix[len(base_url) :]
            return {"port": port, "server": name, "url": path, "public_url": absolute(public_url, base_url, prefix)}
    if not proxy_allowed():
        return None
    path = f"{base}proxy/{port}/"
    return {"port": port, "server": None, "url": path, "public_url": absolute(public_url, base_url, f"{base_url}proxy/{port}/")}
