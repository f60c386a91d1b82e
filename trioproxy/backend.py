"""Backends: where a server listens, and connections to it."""

from __future__ import annotations

from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class Backend:
    """Where a ready server listens."""

    host: str = "127.0.0.1"
    port: int = 0
    unix_socket: str | None = None

    def describe(self) -> str:
        return f"unix:{self.unix_socket}" if self.unix_socket else f"{self.host}:{self.port}"


async def connect(backend: Backend) -> trio.SocketStream:
    if backend.unix_socket:
        return await trio.open_unix_socket(backend.unix_socket)
    return await trio.open_tcp_stream(backend.host, backend.port)
