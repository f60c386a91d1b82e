"""Fault injection, backends: a relayed server that resets, closes or answers garbage at every phase.

The ``faulty`` server is :class:`tests.faults.backend.FaultBackend` in the test's process. The
client must get a clear answer (a 5xx status, or a WebSocket that ends) within a bounded time,
and trioproxy the harness's checks afterwards.
"""

from __future__ import annotations

import pytest

from tests.conftest import TOKEN
from tests.faults import client
from tests.faults.harness import ProxyPool, ProxyUnderTest, fault_pool, pause, proxy, rounds  # noqa: F401

pytestmark = pytest.mark.faults

BEFORE_101 = ["reset-after-accept", "close-after-accept", "reset-after-head", "close-after-head", "ws-garbage"]


@pytest.mark.parametrize("fault", BEFORE_101)
@pytest.mark.parametrize("kind", ["http", "websocket"])
def test_backend_fails_before_answering(proxy: ProxyUnderTest, fault: str, kind: str) -> None:  # noqa: F811
    assert proxy.backend is not None
    if fault.endswith("-after-accept"):
        proxy.backend.on_accept = fault.split("-")[0]
    path = "/faulty/" + ("ok" if fault.endswith("-after-accept") else fault)
    answers: list[int | None] = []

    def action(number: int) -> None:
        with client.connect(proxy.port, proxy.tls) as sock:
            if kind == "websocket":
                sock.sendall(client.upgrade_head(path, TOKEN))
            else:
                sock.sendall(client.head("GET", path, [*client.auth_headers(TOKEN), ("Connection", "close")]))
            pause()
            response = client.recv_until(sock, b"\r\n\r\n", timeout=15)
            answers.append(client.status_of(response))

    try:
        with proxy.family(f"backend {fault} ({kind})") as family:
            family.repeat(action)
    finally:
        proxy.backend.on_accept = None
    assert set(answers) <= {502, 503, 504}, f"backend {fault}, {kind}: statuses {answers}"


@pytest.mark.parametrize("fault", ["ws-101-reset", "ws-101-close", "ws-mid-frame"])
def test_backend_fails_after_the_101(proxy: ProxyUnderTest, fault: str) -> None:  # noqa: F811
    ends: list[str] = []

    def action(number: int) -> None:
        with client.connect(proxy.port, proxy.tls) as sock:
            sock.sendall(client.upgrade_head(f"/faulty/{fault}", TOKEN))
            if number % 2:
                pause()
                client.send(sock, client.frame(b"hello"))
            data, closed = client.read_to_end(sock, timeout=15)
            ends.append(f"{client.status_of(data)} {'closed' if closed else 'still open after 15 s'}")

    with proxy.family(f"backend {fault}") as family:
        family.repeat(action)
    assert set(ends) == {"101 closed"}, f"backend {fault}: {sorted(set(ends))}"


def test_backend_closes_while_the_client_is_not_reading(proxy: ProxyUnderTest) -> None:  # noqa: F811
    """A 64 MiB answer the client does not read; the backend gives up and closes mid-body."""
    socks = []

    def action(number: int) -> None:
        sock = client.connect(proxy.port, proxy.tls)
        socks.append(sock)
        sock.sendall(client.head("GET", "/faulty/big-then-close", client.auth_headers(TOKEN)))
        pause()

    with proxy.family("backend closes while the client is not reading") as family:
        family.repeat(action, max(2, rounds() // 3))
        assert proxy.backend is not None
        ended = []
        for sock in socks:  # now read: each response must end (cut short), none may hang
            data, closed = client.read_to_end(sock, timeout=20)
            ended.append(closed)
            sock.close()
        assert all(ended), f"{ended.count(False)} of {len(ended)} responses still open 20 s after the backend closed"
