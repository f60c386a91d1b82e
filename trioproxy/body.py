"""A relayed request's body, bounded in size and in time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import trio

from .relay.headers import Headers


class BodyRefused(Exception):
    """Raised from a guarded ``receive`` so the relay stops; the guard keeps the reason."""


class BodyGuard:
    """An ASGI ``receive`` for a relayed request that bounds its body in size and in time.

    ``max_size`` caps the bytes accepted (413). ``idle_timeout`` caps the wait for each next
    piece of the body (408), so a client trickling a body cannot hold a connection and a
    backend forever; Hypercorn's ``read_timeout`` cannot do that, as it would also cut long
    downloads and idle WebSockets. Once the body is complete, reads (the relay watching for a
    disconnect) are passed through untimed.
    """

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]], max_size: int | None, idle_timeout: float):
        self._receive = receive
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.received = 0
        self.complete = False
        self.expect_empty = False
        self.failure: tuple[int, str] | None = None

    @property
    def too_large_message(self) -> str:
        return f"The request body is larger than the limit of {self.max_size} bytes."

    def declared_too_large(self, headers: Headers, http_version: str = "1.1") -> bool:
        """Whether Content-Length is over the limit; also notes a request with no body."""
        length = next((v for n, v in headers if n == b"content-length"), None)
        if length is None and http_version == "1.1":
            self.expect_empty = not any(n == b"transfer-encoding" for n, _ in headers)
        if self.max_size is None:
            return False
        return length is not None and length.strip().isdigit() and int(length) > self.max_size

    async def __call__(self) -> dict[str, Any]:
        if self.complete:
            return await self._receive()
        if self.expect_empty:
            # No body announced (HTTP/1.1): the server has the whole request already.
            message = await self._receive()
            self._account(message)
            return message
        with trio.move_on_after(self.idle_timeout):
            message = await self._receive()
            self._account(message)
            return message
        self._refuse(408, f"The request body stalled for {self.idle_timeout:g} s.")

    def _account(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.request":
            self.complete = True
            return
        self.received += len(message.get("body", b""))
        if self.max_size is not None and self.received > self.max_size:
            self._refuse(413, self.too_large_message)
        if not message.get("more_body", False):
            self.complete = True

    def _refuse(self, status: int, message: str) -> NoReturn:
        self.failure = (status, message)
        raise BodyRefused(message)
