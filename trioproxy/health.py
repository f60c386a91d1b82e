"""Health checks: whether a ready server still answers (a liveness probe).

A server's ``health_check`` option turns them on: every ``interval`` seconds its ``path`` is
fetched (or, without a path, a connection is opened), and an answer that does not come within
``timeout``, an error status (400 or above) or a refused connection is a failure.
``failures`` failures in a row make the process unhealthy: the supervisor stops it and its
restart policy decides what follows, like Kubernetes' liveness probes and systemd's watchdog.

:class:`HealthCheck` and :class:`FailureStreak` are plain logic; :func:`probe` does the I/O.
Checks go straight to the backend, not through the relay, so they never count as activity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from .backend import Backend, connect

OPTIONS = ("path", "interval", "timeout", "failures")


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


async def probe(backend: Backend, check: HealthCheck) -> str | None:
    """One check: None if it passed, else what went wrong (``timed out``, ``answered 503``…)."""
    with trio.move_on_after(check.timeout):
        if check.path is None:
            try:
                stream = await connect(backend)
            except OSError as exc:
                return _connect_error(exc)
            await stream.aclose()
            return None
        return await _get(backend, check.path)
    return "timed out"


async def _get(backend: Backend, path: str) -> str | None:
    import httpx

    transport = httpx.AsyncHTTPTransport(uds=backend.unix_socket) if backend.unix_socket else None
    url = f"http://{backend.host}:{backend.port}{path}"
    try:
        # The caller's deadline bounds the whole check; httpx's own timeouts are off.
        async with httpx.AsyncClient(transport=transport, timeout=None) as client:
            response = await client.get(url)
    except httpx.ConnectError as exc:
        return _connect_error(exc)
    except httpx.HTTPError as exc:
        return f"failed ({type(exc).__name__})"
    if response.status_code >= 400:
        return f"answered {response.status_code}"
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
