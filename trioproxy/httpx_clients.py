"""httpx clients that close every socket they open, even when a TLS handshake is cancelled.

httpcore (1.0) closes a connection whose TLS handshake fails with an error, but not one whose
handshake is *cancelled*: the socket is left to the garbage collector. A readiness check
stopped by its deadline in mid-handshake, or a Hub call cut short by a stop, then holds a
descriptor until a collection happens to run, and the collection's ``ResourceWarning`` lands
in whatever code runs at that moment. The clients made here have a thin network backend
under httpx's connection pool that closes the socket itself.

trioproxy's own relay does not use httpx; this is for the convenience calls (readiness and
health checks, the Hub's API).
"""

from __future__ import annotations

import ssl
from typing import Any

import httpcore
import httpx


def async_client(*, verify: ssl.SSLContext | bool, uds: str | None = None, **options: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` (``options`` as httpx takes them) over a transport whose
    cancelled TLS handshakes close their sockets."""
    transport = httpx.AsyncHTTPTransport(verify=verify, uds=uds, trust_env=options.get("trust_env", True))
    # httpx has no parameter for httpcore's network backend; its pool is where one goes.
    # tests/test_httpx_clients.py fails when a release moves either attribute.
    pool = transport._pool
    pool._network_backend = _ClosingBackend(pool._network_backend)
    return httpx.AsyncClient(transport=transport, **options)


class _ClosingBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, with streams that close themselves when ``start_tls`` does not finish."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        return _ClosingStream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        return _ClosingStream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _ClosingStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        try:
            return await self._inner.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            # Synchronously: a cancelled task cannot await a close.
            sock = self._inner.get_extra_info("socket")
            if sock is not None:
                sock.close()
            raise

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)
