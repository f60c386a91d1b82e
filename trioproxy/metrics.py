"""What the dispatcher notes of each request: metrics and the access log.

:class:`HttpExchange` and :class:`WebSocketExchange` wrap a request's ASGI ``send`` and note
its status and bytes as they go out; when the request ends, the dispatcher adds them to
:class:`Metrics` and writes one ``trioproxy.access`` line (:func:`log_access`).

The metrics are served in Prometheus's text format at ``server-proxy/metrics``. Recording sits
on the relay's hot path, so it is a few dict operations per finished request and nothing
else: no lock (trio runs every task on one thread, so there is nothing to lock against) and no
formatting (labels stay plain keys until someone scrapes). That is why this is written by hand
rather than with ``prometheus_client``, whose every increment takes a threading lock; the text
format itself is a hundred lines. Only what the dispatcher alone sees is counted here:
requests, bytes and WebSockets. What the supervisors know (state, restarts, start latencies)
is read from them when scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

import trio

from .auth import query_for_log
from .histogram import Histogram
from .supervisor import State

access_log = logging.getLogger("trioproxy.access")

Send = Callable[[dict[str, Any]], Awaitable[None]]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Label for every proxy/<host>:<port>/ route together: one series per port would let any
# client create series without bound. No server can be named "proxy" (a reserved name).
PROXY_LABEL = "proxy"

# Status classes by status // 100; 0 is a request that ended before any response began.
_STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")

# Seconds from spawning a server's process to its port answering.


class Metrics:
    """Counters the dispatcher bumps as requests and WebSockets end."""

    def __init__(self) -> None:
        # (server label, status // 100) -> [requests, request body bytes, response body bytes]
        self.http: dict[tuple[str, int], list[int]] = {}
        self.websockets_open: dict[str, int] = {}
        self.websockets_total: dict[str, int] = {}
        self.websockets_tunnelled: dict[str, int] = {}  # of those, relayed as bytes (fast path)

    def request_done(self, server: str, status: int, received: int, sent: int) -> None:
        key = (server, status // 100)
        row = self.http.get(key)
        if row is None:
            row = self.http[key] = [0, 0, 0]
        row[0] += 1
        row[1] += received
        row[2] += sent

    def websocket_opened(self, server: str) -> None:
        self.websockets_open[server] = self.websockets_open.get(server, 0) + 1
        self.websockets_total[server] = self.websockets_total.get(server, 0) + 1

    def websocket_tunnelled(self, server: str) -> None:
        self.websocket_opened(server)
        self.websockets_tunnelled[server] = self.websockets_tunnelled.get(server, 0) + 1

    def websocket_closed(self, server: str) -> None:
        self.websockets_open[server] -= 1


class HttpExchange:
    """An HTTP request's ``send``, noting the response's status and body bytes.

    ``server`` is the metrics label (None: not a relayed route); ``received`` is set by the
    relay from its body guard.
    """

    __slots__ = ("_send", "began", "status", "sent", "received", "server")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.began = trio.current_time()
        self.status = 0  # none yet
        self.sent = 0
        self.received = 0
        self.server: str | None = None

    @property
    def started(self) -> bool:
        return self.status != 0

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            self.sent += len(message.get("body", b""))
        elif kind == "http.response.start":
            self.status = message["status"]
        await self._send(message)


class WebSocketExchange:
    """A WebSocket's ``send``, noting how its handshake was answered, for the open gauge."""

    __slots__ = ("_send", "_metrics", "began", "status", "server")

    def __init__(self, send: Send, metrics: Metrics) -> None:
        self._send = send
        self._metrics = metrics
        self.began = trio.current_time()
        self.status = 0  # 101 once accepted
        self.server: str | None = None

    async def __call__(self, message: dict[str, Any]) -> None:
        if self.status == 0:
            self._note(message)
        await self._send(message)

    def _note(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            self.status = 101
            if self.server is not None:
                self._metrics.websocket_opened(self.server)
        elif kind == "websocket.http.response.start":
            self.status = message["status"]
        elif kind == "websocket.close":
            self.status = 403  # what Hypercorn answers to a close before the accept

    def finish(self) -> None:
        if self.status == 101 and self.server is not None:
            self._metrics.websocket_closed(self.server)


def log_access(scope: dict[str, Any], method: str, status: int, sent: int | None, began: float) -> None:
    """One line per request: method, path and query (less any token, secret-named parameters
    masked), status, bytes, time. Known and learned secrets are masked by its formatter."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    path = (scope.get("raw_path") or scope["path"].encode("utf-8")).decode("latin-1")
    query = query_for_log(scope.get("query_string", b""))
    if query:
        path += "?" + query
    duration_ms = (trio.current_time() - began) * 1000
    access_log.info(
        "%s %s %s %s %.1f ms",
        method,
        path,
        status or "-",
        "-" if sent is None else f"{sent} B",
        duration_ms,
        extra={"method": method, "path": path, "status": status, "bytes": sent, "duration_ms": duration_ms},
    )


def render(metrics: Metrics, supervisors: Mapping[str, Any]) -> str:
    """The exposition text: the dispatcher's counters, then each server's state."""
    return "".join(_lines(metrics, supervisors))


def _lines(metrics: Metrics, supervisors: Mapping[str, Any]) -> Iterator[str]:
    http = sorted(metrics.http.items(), key=lambda item: (item[0][0], item[0][1]))

    def by_status(index: int) -> list[tuple[dict[str, str], float]]:
        return [
            ({"server": server, "status_class": _status_class(code)}, row[index])
            for (server, code), row in http
        ]

    yield from _family(
        "trioproxy_http_requests_total", "counter", "HTTP requests relayed, by server and status class.", by_status(0)
    )
    yield from _family(
        "trioproxy_http_request_bytes_total",
        "counter",
        "Request body bytes relayed from clients to servers.",
        by_status(1),
    )
    yield from _family(
        "trioproxy_http_response_bytes_total",
        "counter",
        "Response body bytes sent to clients.",
        by_status(2),
    )
    names = list(supervisors)
    ws_servers = sorted(set(names) | set(metrics.websockets_total))
    yield from _family(
        "trioproxy_websockets_open",
        "gauge",
        "WebSocket connections open now.",
        [({"server": s}, metrics.websockets_open.get(s, 0)) for s in ws_servers],
    )
    yield from _family(
        "trioproxy_websockets_total",
        "counter",
        "WebSocket connections accepted.",
        [({"server": s}, metrics.websockets_total.get(s, 0)) for s in ws_servers],
    )
    yield from _family(
        "trioproxy_websockets_tunnelled_total",
        "counter",
        "WebSocket connections relayed as bytes (the fast path), of those accepted.",
        [({"server": s}, metrics.websockets_tunnelled.get(s, 0)) for s in ws_servers],
    )
    yield from _server_lines(supervisors)


def _server_lines(supervisors: Mapping[str, Any]) -> Iterator[str]:
    now = trio.current_time()
    servers = [(name, supervisors[name]) for name in supervisors]
    yield from _family(
        "trioproxy_server_state",
        "gauge",
        "1 for the state each server is in, 0 for the others.",
        [
            ({"server": name, "state": state}, 1 if sup.state.value == state else 0)
            for name, sup in servers
            for state in (member.value for member in State)
        ],
    )
    yield from _family(
        "trioproxy_server_starts_total",
        "counter",
        "Processes spawned for each server.",
        [({"server": name}, sup.starts) for name, sup in servers],
    )
    yield from _family(
        "trioproxy_server_restarts_total",
        "counter",
        "Restarts after a process exited (not counting starts on request).",
        [({"server": name}, sup.restarts) for name, sup in servers],
    )
    yield from _family(
        "trioproxy_server_health_check_failures_total",
        "counter",
        "Health checks that failed (servers with a health_check).",
        [({"server": name}, sup.health_failures) for name, sup in servers if sup.health_check is not None],
    )
    yield from _family(
        "trioproxy_server_unhealthy_total",
        "counter",
        "Processes stopped for failing their health check too often in a row.",
        [({"server": name}, sup.unhealthy) for name, sup in servers if sup.health_check is not None],
    )
    yield from _family(
        "trioproxy_server_idle_seconds",
        "gauge",
        "Seconds since each server's last activity.",
        [({"server": name}, max(0.0, now - sup.last_activity)) for name, sup in servers],
    )
    yield from _histogram(
        "trioproxy_server_start_seconds",
        "Seconds from spawning a server's process to it answering.",
        [(name, sup.start_latency) for name, sup in servers],
    )


def _histogram(name: str, help_text: str, series: list[tuple[str, Histogram]]) -> Iterator[str]:
    yield f"# HELP {name} {help_text}\n# TYPE {name} histogram\n"
    for server, histogram in series:
        for bound, count in histogram.cumulative():
            yield _sample(f"{name}_bucket", {"server": server, "le": _number(bound)}, count)
        yield _sample(f"{name}_bucket", {"server": server, "le": "+Inf"}, histogram.count)
        yield _sample(f"{name}_sum", {"server": server}, histogram.sum)
        yield _sample(f"{name}_count", {"server": server}, histogram.count)


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> Iterator[str]:
    yield f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"
    for labels, value in samples:
        yield _sample(name, labels, value)


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    text = ",".join(f'{key}="{_escape(label)}"' for key, label in labels.items())
    return f"{name}{{{text}}} {_number(value)}\n"


def _escape(value: str) -> str:
    # The text format's three escapes in label values.
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _status_class(code: int) -> str:
    return _STATUS_CLASSES[code] if 0 <= code < len(_STATUS_CLASSES) else f"{code}xx"
