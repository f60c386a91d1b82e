"""Short, clear error responses: HTML for browsers, JSON for API clients. Never a traceback."""

from __future__ import annotations

import html
import json
import math
import sys
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from .relay.headers import Headers, wants_json

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

Send = Callable[[dict[str, Any]], Awaitable[None]]


class CallableFailed(Exception):
    """A configured callable (``rewrite_response``, ``mappath``…) raised; ``__cause__`` is what.

    ``what`` names the option and the callable, so that a package's author sees whose code
    failed: ``rewrite_response callable jupyter_rsession_proxy.rewrite_netloc``.
    """

    def __init__(self, option: str, function: object) -> None:
        self.what = f"{option} callable {describe_callable(function)}"
        super().__init__(self.what)

    @property
    def cause(self) -> BaseException | None:
        return self.__cause__


def describe_callable(function: object) -> str:
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)
    return f"{module}.{name}" if module and module not in ("builtins", "__main__") else str(name)


def sole_exception(exc: BaseException) -> BaseException:
    """The one exception that nurseries wrapped in groups, or the group if it holds several."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _refresh(retry_after: float | None) -> str:
    if retry_after is None:
        return ""
    return f"<meta http-equiv='refresh' content='{max(1, math.ceil(retry_after))}'>"


def render_error(
    status: int,
    message: str,
    *,
    as_json: bool,
    server: str | None = None,
    output: list[str] | None = None,
    retry_after: float | None = None,
) -> tuple[bytes, bytes]:
    """(content type, body) for an error.

    ``retry_after``: the condition is passing (a server starting or backing off): an HTML page
    reloads itself after that many seconds, so a browser lands on the server once it is ready.
    """
    if as_json:
        document: dict[str, Any] = {"status": status, "error": _phrase(status), "message": message}
        if server is not None:
            document["server"] = server
        if output:
            document["output"] = output
        return b"application/json", json.dumps(document).encode()
    title = f"{status} {_phrase(status)}"
    lines = "".join(html.escape(line) + "\n" for line in output or [])
    last_output = f"<h2>Last output</h2><pre>{lines}</pre>" if lines else ""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"{_refresh(retry_after)}<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
        "pre{background:#f4f4f4;padding:1em;overflow:auto}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>{last_output}"
        "</body></html>"
    )
    return b"text/html; charset=utf-8", page.encode()


def error_response(
    request_headers: Headers,
    status: int,
    message: str,
    *,
    server: str | None = None,
    output: list[str] | None = None,
    retry_after: float | None = None,
) -> tuple[Headers, bytes]:
    """The headers (but the framing) and body of an error response, for any transport.

    With ``retry_after``, it is also sent as ``Retry-After`` (RFC 9110 10.2.3).
    """
    content_type, body = render_error(
        status, message, as_json=wants_json(request_headers), server=server, output=output, retry_after=retry_after
    )
    headers = [(b"content-type", content_type), (b"cache-control", b"no-store")]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    return headers, body


async def send_error(
    send: Send,
    request_headers: Headers,
    status: int,
    message: str,
    *,
    server: str | None = None,
    output: list[str] | None = None,
    extra_headers: Headers | None = None,
    retry_after: float | None = None,
) -> None:
    """Send an error response over ASGI (see :func:`error_response`)."""
    headers, body = error_response(
        request_headers, status, message, server=server, output=output, retry_after=retry_after
    )
    headers += [(b"content-length", str(len(body)).encode()), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_redirect(
    send: Send, location: str, extra_headers: Headers | None = None, status: int = 302
) -> None:
    headers = [(b"location", location.encode("latin-1")), (b"content-length", b"0")]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])}
    )
    await send({"type": "http.response.body", "body": b"", "more_body": False})
