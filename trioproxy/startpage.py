"""The start page: what a browser that navigates to a server that is not ready sees at once.

Today's answer to any request for a starting server is to wait (up to ``timeout``), which a
person sees as a hanging tab. A *browser navigation* (:func:`is_navigation`: a top-level GET
asking for HTML, not ``fetch``/XHR, not a WebSocket) is diverted instead, by one step of the
admission pipeline (:func:`divert`, called by :class:`~trioproxy.admission.Gate`): the server's
start is set going as a request would set it going, and the browser is redirected to
``<base>server-proxy/start/<name>?next=<the path and query it asked for, below the base>``.

That page (served by :mod:`trioproxy.api`) shows the server's title and icon, its state, the
time since the start, the estimate from :mod:`trioproxy.start_history`, and its output as it
comes, from the server-sent events of ``server-proxy/api/servers/<name>/events`` (masked as the
logs API masks); once ready, it goes on to ``next``; on failure it shows the reason and the last
lines, with a Restart button when the server has a command (the management API's rule). Without
JavaScript, a meta refresh reloads the page, which answers a redirect to ``next`` once ready.

Every URL involved is relative (the redirect's ``Location``, the page's assets and API calls,
``next`` itself, which is relative to the base URL), so the page works under any base URL and
behind another proxy's prefix without knowing either. ``next`` is accepted only if it routes to
the page's own server (:func:`continue_target`): no open redirect.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Container
from string import Template
from typing import Any
from urllib.parse import quote, unquote, urlencode

import trio

from .listener import CLIENT_SOCKET, client_gone
from .paths import PathTable, server_path
from .relay.headers import header_value
from .routing import Route, resolve
from .supervisor import ServerSupervisor, ServerUnavailable, State

log = logging.getLogger("trioproxy.startpage")

# How often the event stream looks at the state and at its client when nothing else happens.
TICK = 1.0
HEARTBEAT = 15.0  # a comment line every so often keeps proxies in front from timing it out
MAX_STREAM = 600.0  # then the stream ends; EventSource reconnects and resumes (Last-Event-ID)
FIRST_LINES = 200  # output lines a new stream (and the page itself) starts with
NOSCRIPT_REFRESH = 2  # seconds between reloads of the page without JavaScript

# Fields of a status that change by themselves: a change of theirs alone is not sent.
_MOVING = frozenset({"starting_for", "idle_seconds", "last_activity", "uptime", "last_line"})
# Fetch modes of requests made by scripts, images, styles...: they wait as before.
_NOT_NAVIGATION_MODES = frozenset({b"cors", b"no-cors", b"same-origin", b"websocket"})


def is_navigation(scope: dict[str, Any]) -> bool:
    """A browser navigating to a page: GET, asks for HTML, not a script's request.

    ``Sec-Fetch-Mode`` is believed where sent: only ``navigate`` counts. Browsers send it to
    secure origins and localhost, not over plain HTTP to another host; there (and from browsers
    too old to send it) the User-Agent must be a browser's (they all begin ``Mozilla/``), so
    that a script or link checker asking for HTML waits for the server as before.
    ``X-Requested-With`` marks a script's request (jQuery and others).
    """
    if scope["type"] != "http" or scope["method"] != "GET":
        return False
    headers = scope["headers"]
    if b"text/html" not in (header_value(headers, b"accept") or b"").lower():
        return False
    if header_value(headers, b"x-requested-with") is not None or header_value(headers, b"upgrade") is not None:
        return False
    mode = header_value(headers, b"sec-fetch-mode")
    if mode is not None:
        return mode.strip().lower() == b"navigate"
    return (header_value(headers, b"user-agent") or b"").startswith(b"Mozilla/")


def needs_start_page(supervisor: ServerSupervisor) -> bool:
    """Whether a navigation to this server would have to wait: a managed server, not ready."""
    return supervisor.has_command and not (supervisor.state is State.READY and supervisor.client is not None)


async def begin_start(supervisor: ServerSupervisor) -> None:
    """Set the server's start going as a waiting request would, without waiting for it.

    A failed server is started only once its retry wait is over (as a request starts it); a
    starting or backing-off one goes on by itself. Raises ServerUnavailable while trioproxy
    shuts down.
    """
    state = supervisor.state
    if state is State.FAILED and supervisor.policy.retry_after(trio.current_time()) > 0:
        return
    if state in (State.STOPPED, State.STOPPING, State.FAILED):
        await supervisor.start(wait=False)


async def divert(scope: dict[str, Any], route: Route, supervisor: ServerSupervisor, base_url: str) -> str | None:
    """The gate's start-page step: where to send this request instead, or None to go on.

    None for anything but a navigation to a server that is not ready, and while trioproxy
    shuts down (the ordinary path then answers 503).
    """
    if route.kind != "server" or not is_navigation(scope) or not needs_start_page(supervisor):
        return None
    try:
        await begin_start(supervisor)
    except ServerUnavailable:
        return None
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    return page_location(raw_path, scope.get("query_string", b""), base_url, route.name)


def page_location(raw_path: bytes, query: bytes, base_url: str, name: str) -> str:
    """A relative reference from ``raw_path`` (under ``base_url``) to ``name``'s start page.

    Relative, so that whatever prefix the browser's URL has in front of trioproxy's base URL
    (another proxy's), it keeps.
    """
    below = raw_path.decode("latin-1")[len(base_url) :]
    up = "../" * below.count("/") or "./"
    target = below + ("?" + query.decode("latin-1") if query else "")
    return f"{up}server-proxy/start/{quote(name, safe='')}?{urlencode({'next': target})}"


def default_next(supervisor: ServerSupervisor, root_server: str | None) -> str:
    return "" if supervisor.name == root_server else server_path(supervisor.process) + "/"


def continue_target(
    value: str, name: str, base_url: str, servers: Container[str] | PathTable, root_server: str | None
) -> str | None:
    """Where the start page goes on to, relative to the page: ``value`` (a path and query
    below the base URL) if it routes to server ``name``; None for anything else.

    Refused rather than cleaned up: anything but visible ASCII (browsers drop tabs and line
    breaks), backslashes (read as slashes), a leading slash, dot segments (also
    percent-encoded: browsers resolve ``%2e%2e``), a fragment.
    """
    if any(not 0x21 <= ord(char) < 0x7F or char in "\\#" for char in value) or value.startswith("/"):
        return None
    path = value.partition("?")[0]
    if any(unquote(segment) in (".", "..") for segment in path.split("/")):
        return None
    route = resolve((base_url + path).encode("latin-1"), base_url, servers, root_server)
    if route.kind != "server" or route.name != name:
        return None
    return "../../" + value  # the page is <base>server-proxy/start/<name>


def progress(supervisor: ServerSupervisor) -> dict[str, Any]:
    """How far the start is: seconds since it began (None unless starting or backing off),
    the estimate from the previous starts, and how many it is made of."""
    history = supervisor.history
    began = supervisor.start_began
    starting = supervisor.state in (State.STARTING, State.BACKOFF)
    return {
        "starting_for": (trio.current_time() - began) if starting and began is not None else None,
        "estimate": history.estimate(supervisor.name),
        "estimate_from": len(history.durations(supervisor.name)),
    }


def estimate_text(estimate: float | None, count: int) -> str:
    if estimate is None:
        return "first start: no estimate yet"
    seconds = max(1, math.ceil(estimate))
    return f"usually ready in ~{seconds} s" if count > 1 else f"ready in ~{seconds} s last time"


def elapsed_text(seconds: float | None) -> str:
    return "" if seconds is None else f"for {int(seconds)} s"


# -- the event stream --------------------------------------------------------------------------


def sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(
    scope: dict[str, Any],
    supervisor: ServerSupervisor,
    status: Callable[[], dict[str, Any]],
    masked: Callable[[list[str]], list[str]],
    first: int,
    current: Callable[[], bool],
) -> AsyncIterator[bytes]:
    """Server-sent events for one server: ``status`` (its :meth:`Pages.status` with
    :func:`progress`) whenever it changes, and ``output`` (new lines, masked, with the count of
    lines so far as the event's id, for a reconnecting EventSource's ``Last-Event-ID``).

    Ends once the server is ready (the page goes on), once ``current()`` is false (a reload
    replaced the server: a reconnecting EventSource finds the new one), when the client has
    gone (its socket is polled: Hypercorn tells an HTTP/1.1 app nothing), or after
    :data:`MAX_STREAM`.
    """
    output = supervisor.output
    sock = scope.get(CLIENT_SOCKET)
    seen = first
    last_status: dict[str, Any] | None = None
    began = last_sent = trio.current_time()
    try:
        yield b"retry: 1000\n\n"
        while True:
            # Before anything is sent: a send to a client that has gone may never return.
            if trio.current_time() - began > MAX_STREAM or not current():
                return
            if sock is not None and client_gone(sock):
                log.debug("%s: the event stream's client has gone", supervisor.name)
                return
            lines = output.since(seen)
            seen = output.total
            if lines:
                yield sse("output", masked(lines), seen)
                last_sent = trio.current_time()
            now_status = status()
            changed = {k: v for k, v in now_status.items() if k not in _MOVING}
            if changed != last_status:
                last_status = changed
                yield sse("status", now_status)
                last_sent = trio.current_time()
                if now_status["state"] == State.READY.value:
                    return
            now = trio.current_time()
            if now - last_sent > HEARTBEAT:
                yield b": still here\n\n"
                last_sent = now
            with trio.move_on_after(TICK):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_then_cancel, nursery, output.wait_for_more, seen)
                    others = tuple(state for state in State if state is not supervisor.state)
                    nursery.start_soon(_then_cancel, nursery, supervisor.wait_for_state, *others)
    finally:
        # However it ends: here, or cancelled (a disconnect Hypercorn did see, a shutdown).
        log.debug("%s: an event stream ended", supervisor.name)


async def _then_cancel(nursery: trio.Nursery, wait: Callable[..., Any], *args: Any) -> None:
    await wait(*args)
    nursery.cancel_scope.cancel()


# -- the page ----------------------------------------------------------------------------------


def render(
    supervisor: ServerSupervisor,
    status: dict[str, Any],
    output: list[str],
    target: str,
    shown_next: str,
) -> tuple[int, str]:
    """(HTTP status, page) for a server that is not ready. Every URL is relative to the page,
    ``<base>server-proxy/start/<name>``; nothing inline (the launcher's CSP applies)."""
    process = supervisor.process
    name = supervisor.name
    quoted = quote(name, safe="")
    entry = process.launcher
    title = entry.title or name
    state = status["state"]
    failed = state == State.FAILED.value
    if entry.icon_path:
        icon = f"<img class='icon' src='../icon/{html.escape(quoted)}' alt=''>"
    else:
        icon = f"<span class='icon letter' aria-hidden='true'>{html.escape(title[:1].upper())}</span>"
    page = _PAGE.substitute(
        title=html.escape(title),
        refresh="" if failed else f"<noscript><meta http-equiv='refresh' content='{NOSCRIPT_REFRESH}'></noscript>",
        icon=icon,
        name=html.escape(name),
        state=html.escape(state),
        elapsed=html.escape(elapsed_text(status.get("starting_for"))),
        estimate=html.escape(estimate_text(status.get("estimate"), status.get("estimate_from", 0))),
        reason=html.escape(status.get("reason") or ""),
        target=html.escape(target),
        shown_next=html.escape(shown_next),
        events=html.escape(f"../api/servers/{quoted}/events"),
        restart=html.escape(f"../api/servers/{quoted}/restart?wait=0"),
        managed="true" if supervisor.has_command else "false",
        restart_hidden="" if failed and supervisor.has_command else " hidden",
        total=supervisor.output.total,
        output="".join(html.escape(line) + "\n" for line in output),
    )
    return (503 if failed else 200), page


_PAGE = Template(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
$refresh
<title>$title · starting</title>
<link rel="icon" href="../static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="../static/start.css">
<script src="../static/start.js" defer></script>
</head>
<body>
<main id="start" data-server="$name" data-state="$state" data-next="$target" data-events="$events"
 data-restart="$restart" data-managed="$managed" data-total="$total">
<header>$icon<h1>$title</h1></header>
<p class="progress" role="status" aria-live="polite"><span id="state" class="state">$state</span>
 <span id="elapsed">$elapsed</span> · <span id="estimate">$estimate</span></p>
<p id="reason" class="reason">$reason</p>
<p class="actions"><button type="button" id="restart"$restart_hidden>Restart</button></p>
<p class="next">Once it is ready, this page goes on to <a id="continue" href="$target">$shown_next</a>.</p>
<noscript><p>Without JavaScript this page reloads itself every few seconds while the server starts.</p></noscript>
<h2>Output</h2>
<pre id="output" class="log">$output</pre>
</main>
</body>
</html>
"""
)
