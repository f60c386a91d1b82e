"""A TLS handshake cut short closes its socket at once (trioproxy.httpx_clients).

The backend is a real listener that reads the ClientHello and never answers it. Garbage
collection is off while each test runs, so that a socket closed only by the collector stays
open and shows.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest
import trio

from trioproxy import backend_tls
from trioproxy.backend import Backend
from trioproxy.health import Prober
from trioproxy.httpx_clients import async_client


@pytest.fixture(autouse=True)
def no_collection() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


async def closed_after_a_cancelled_handshake(
    nursery: trio.Nursery, get: Callable[[int], Awaitable[object]], wait: float
) -> bool:
    """Whether the client's side closed within ``wait`` s of cancelling ``get(port)`` in mid-handshake."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    hello = trio.Event()
    closed = trio.Event()

    async def silent_tls_server() -> None:
        async with listener, await listener.accept() as stream:
            await stream.receive_some()  # the ClientHello
            hello.set()
            with contextlib.suppress(trio.BrokenResourceError):  # a reset ends it too
                while await stream.receive_some():
                    continue
            closed.set()

    nursery.start_soon(silent_tls_server)
    with trio.CancelScope() as request:
        nursery.start_soon(_cancel_on, hello, request)
        await get(port)
    assert request.cancelled_caught
    with trio.move_on_after(wait):
        await closed.wait()
    return closed.is_set()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def test_a_readiness_check_cancelled_in_its_tls_handshake_closes_its_connection(nursery: trio.Nursery) -> None:
    prober = Prober()
    tls = backend_tls.parse({"verify": False})

    async def check(port: int) -> object:
        return await prober.get(Backend(host="127.0.0.1", port=port, tls=tls), "/ready")

    try:
        assert await closed_after_a_cancelled_handshake(nursery, check, wait=30)
    finally:
        await prober.aclose()


async def test_any_client_made_here_closes_a_cancelled_handshake(nursery: trio.Nursery) -> None:
    async with async_client(verify=False, trust_env=False) as client:
        assert await closed_after_a_cancelled_handshake(nursery, lambda port: client.get(f"https://127.0.0.1:{port}/"), 30)


async def test_plain_httpx_still_leaves_it_open(nursery: trio.Nursery) -> None:
    """Why trioproxy.httpx_clients exists. When this fails, httpcore closes cancelled handshakes
    itself: the module can go, and this test with it."""
    async with httpx.AsyncClient(verify=False, trust_env=False) as client:
        assert not await closed_after_a_cancelled_handshake(
            nursery, lambda port: client.get(f"https://127.0.0.1:{port}/"), 0.5
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()  # the socket left behind, closed by the collector
