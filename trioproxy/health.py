"""Probing a backend: readiness while it starts, health checks once it is ready.

A server's ``health_check`` option turns them on: every ``interval`` seconds its ``path`` is
fetched (or, without a path, a connection is opened), and an answer that does not come within
``timeout``, an error status (400 or above) or a refused connection is a failure.
``failures`` failures in a row make the process unhealthy: the supervisor stops it and its
restart policy decides what follows, like Kubernetes' liveness probes and systemd's watchdog.

:class:`HealthCheck` and :class:`FailureStreak` are plain logic; :func:`probe` does the I/O.
Readiness (:func:`wait_until_ready`) polls the same way while a process starts. Both go
through one :class:`Prober` per server, and straight to the backend, not through the relay,
so they never count as activity. With ``backend_tls``, a path is fetched over https with the
relay's TLS settings; a connection check stays a TCP connect (a certificate the relay cannot
verify is its 502 to explain, not a start that never ends).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

import trio

from .backend import Backend, connect_tcp

log = logging.getLogger("trioproxy.health")

OPTIONS = ("path", "interval", "timeout", "failures")

# Readiness is polled every READY_POLL_FIRST seconds for the first 5 s of a start, then less
# often: the interval grows with the time waited, to READY_POLL_LONGEST.
READY_POLL_FIRST = 0.005
READY_POLL_LONGEST = 0.1


@dataclass(frozen=True)
class HealthCheck:
    path: str | None = None  # None: a connection that opens is enough
    interval: float = 10.0
    timeout: float = 5.0
    failures: int = 3

    @classmethod
    def parse(cls, value: Any) -> HealthCheck | None:
        """The check a ``health_check`` option asks for (None: off). Raises ValueError with
        one line naming what is wrong."""
        if value is None or value is False or value == {}:
            return None
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise ValueError(f"expected a dict with {', '.join(OPTIONS)}, got {type(value).__name__}")
        unknown = sorted(str(key) for key in value if key not in OPTIONS)
        if unknown:
            raise ValueError(f"unknown health_check option {unknown[0]!r} (known: {', '.join(OPTIONS)})")
        path = value.get("path")
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise ValueError(f"health_check path must be a string starting with '/', got {path!r}")
        settings: dict[str, Any] = {"path": path}
        for name in ("interval", "timeout"):
            if name in value:
                number = value[name]
                if isinstance(number, bool) or not isinstance(number, (int, float)) or number <= 0:
                    raise ValueError(f"health_check {name} must be a number of seconds above 0, got {number!r}")
                settings[name] = float(number)
        if "failures" in value:
            count = value["failures"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"health_check failures must be a whole number of at least 1, got {count!r}")
            settings["failures"] = count
        return cls(**settings)

    @property
    def what(self) -> str:
        return f"GET {self.path}" if self.path else "connect"


@dataclass
class FailureStreak:
    """Failures in a row; :meth:`failed` says why once there are enough of them."""

    check: HealthCheck
    messages: list[str] = field(default_factory=list)

    def passed(self) -> None:
        self.messages.clear()

    def failed(self, message: str) -> str | None:
        """Note a failed check; the reason the process is unhealthy, or None while it is not
        (yet). E.g. ``GET /health timed out 3 times``."""
        self.messages.append(message)
        count = len(self.messages)
        if count < self.check.failures:
            return None
        same = all(earlier == message for earlier in self.messages)
        self.messages.clear()
        times = "once" if count == 1 else f"{count} times"
        if same:
            return f"{self.check.what} {message} {times}"
        return f"{self.check.what} failed {times} in a row (last: {message})"


class Prober:
    """HTTP checks of one server's backend (readiness and health), over one client.

    A client made for each check costs a fresh SSL context (certifi's bundle loaded) and a
    new connection every time: polled every 5 ms while an app answered 503 warming up, that
    kept ~40 % of a core busy. One supervisor has one prober; its client is made at the first
    check, kept (with its connection, kept alive) while the backend's address stays the same,
    and closed with :meth:`aclose`.
    """

    def __init__(self) -> None:
        self._client: Any = None  # an httpx.AsyncClient, made on first use
        self._backend: Backend | None = None
        self._tls_warned = False

    async def get(self, backend: Backend, path: str) -> str | None:
        """GET ``path``: None if it answered below 400, else what went wrong. No timeout:
        the caller bounds it."""
        import httpx

        client = await self._client_for(backend)
        # The name TLS checks is the relay's: localhost over a unix socket.
        host = "localhost" if backend.unix_socket and backend.tls is not None else backend.host
        url = f"{backend.scheme}://{host}:{backend.port}/{path.lstrip('/')}"
        extensions = {}
        if backend.tls is not None and backend.tls.hostname:
            extensions["sni_hostname"] = backend.tls.hostname
        try:
            response = await client.get(url, extensions=extensions)
        except httpx.ConnectError as exc:
            tls = _tls_error(exc)
            if tls is not None:
                if not self._tls_warned:  # a readiness poll every 5 ms: said once
                    self._tls_warned = True
                    log.warning("%s: GET %s %s", backend.describe(), path, tls)
                return tls
            return _connect_error(exc)
        except httpx.HTTPError as exc:
            return f"failed ({type(exc).__name__})"
        if response.status_code >= 400:
            return f"answered {response.status_code}"
        return None

    async def _client_for(self, backend: Backend) -> Any:
        from .httpx_clients import async_client

        if self._client is not None and self._backend == backend:
            return self._client
        await self.aclose()
        # With backend_tls, the relay's TLS settings (verification included).
        verify: Any = backend.tls.context if backend.tls is not None else False
        # The caller's deadline bounds each check; httpx's own timeouts are off.
        self._client = async_client(verify=verify, uds=backend.unix_socket, timeout=None, trust_env=False)
        self._backend = backend
        return self._client

    async def aclose(self) -> None:
        client, self._client, self._backend = self._client, None, None
        if client is not None:
            with trio.CancelScope(shield=True):
                await client.aclose()


async def accepts(backend: Backend) -> str | None:
    """None if the backend accepts a connection, else why not."""
    try:
        # The port, not TLS: a backend_tls handshake that fails is the relay's 502 to explain.
        stream = await connect_tcp(backend)
    except OSError as exc:
        return _connect_error(exc)
    await stream.aclose()
    return None


async def probe(backend: Backend, check: HealthCheck, prober: Prober | None = None) -> str | None:
    """One check: None if it passed, else what went wrong (``timed out``, ``answered 503``…)."""
    with trio.move_on_after(check.timeout):
        if check.path is None:
            return await accepts(backend)
        if prober is None:
            prober = Prober()
            try:
                return await prober.get(backend, check.path)
            finally:
                await prober.aclose()
        return await prober.get(backend, check.path)
    return "timed out"


async def wait_until_ready(backend: Backend, check_path: str | None, prober: Prober) -> None:
    """Poll until the backend accepts a connection (and answers ``check_path`` below 400).

    No end of its own: the caller bounds it (the server's ``timeout``).
    """
    began = trio.current_time()
    while True:
        # With a path, its answer says that connections are accepted too.
        if await (accepts(backend) if check_path is None else prober.get(backend, check_path)) is None:
            return
        await trio.sleep(ready_poll_interval(trio.current_time() - began))


def ready_poll_interval(waited: float) -> float:
    """How long to wait before the next readiness check, after ``waited`` seconds.

    5 ms for the first 5 s (jupyter-server-proxy's default ``timeout``: a server is noticed
    within milliseconds of opening its port, whatever its start-up time), then 1 % of the
    time waited beyond that, up to READY_POLL_LONGEST: a connection attempt costs tens of
    microseconds, and a start that takes long is polled ten times a second.
    """
    return min(READY_POLL_LONGEST, max(READY_POLL_FIRST, (waited - 5) / 100))


def _tls_error(exc: BaseException) -> str | None:
    """What TLS said, if an httpx connection failed in its TLS handshake."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"failed TLS verification ({cause.verify_message or cause.reason})"
    if isinstance(cause, ssl.SSLError):
        return f"failed its TLS handshake ({cause.reason or cause})"
    return None


def _connect_error(exc: BaseException) -> str:
    # trio's open_tcp_stream reports "all attempts ... failed", with the attempts' errors
    # in a group below it.
    errors = [exc]
    if exc.__cause__ is not None:
        errors += getattr(exc.__cause__, "exceptions", [exc.__cause__])
    if any(isinstance(error, ConnectionRefusedError) for error in errors):
        return "was refused"
    text = " ".join(str(error).lower() for error in errors)
    if "refused" in text:
        return "was refused"
    if "no such file" in text or isinstance(exc, FileNotFoundError):
        return "found no socket"
    return "could not connect"
