"""Fault injection, backpressure: a client that never reads while the backend floods.

The backend sends as fast as it is taken (a chunked download, or WebSocket binary frames) and the
client takes nothing; over HTTP/2 the client first opens its flow-control windows wide, so only
trioproxy's own bounds can hold the data back. After a few seconds of flooding trioproxy's RSS
must stay within a fixed bound of its baseline.
"""

from __future__ import annotations

import struct
import time

import pytest

from tests.conftest import TOKEN
from tests.faults import client
from tests.faults import h2raw as h2
from tests.faults.harness import ProxyPool, ProxyUnderTest, fault_pool  # noqa: F401

pytestmark = pytest.mark.faults

FLOOD_SECONDS = 3.0
RSS_BOUND_KIB = 100 * 1024


def open_http1(proxy: ProxyUnderTest, kind: str) -> object:
    sock = client.connect(proxy.port, proxy.tls)
    sock.setsockopt(client.socket.SOL_SOCKET, client.socket.SO_RCVBUF, 65536)
    if kind == "download":
        sock.sendall(client.head("GET", "/faulty/flood", client.auth_headers(TOKEN)))
    else:
        sock.sendall(client.upgrade_head("/faulty/ws-flood", TOKEN))
    return sock


def open_http2(proxy: ProxyUnderTest, kind: str) -> object:
    conn = h2.H2Client(proxy.port, tls=proxy.tls is not None)
    # SETTINGS_INITIAL_WINDOW_SIZE at its maximum opens every stream's window; the connection's
    # window is opened by WINDOW_UPDATE (one more on a stream would overflow it: FLOW_CONTROL_ERROR).
    wide = h2.frame(h2.SETTINGS, 0, 0, struct.pack("!HI", 0x4, (1 << 31) - 1))
    conn.send_raw(h2.PREFACE + wide + h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack("!I", (1 << 31) - 1 - 65535)))
    if kind == "download":
        headers = h2.request(path=b"/faulty/flood", token=TOKEN, scheme=conn.scheme)
        conn.send_raw(h2.headers_frame(1, headers))
    else:
        conn.send_raw(h2.headers_frame(1, h2.websocket_connect(b"/faulty/ws-flood", TOKEN, conn.scheme), end_stream=False))
    return conn.sock


@pytest.mark.parametrize("kind", ["download", "websocket"])
@pytest.mark.parametrize("protocol", ["http1", "http2-tls"])  # plain HTTP/2: see the next test
def test_a_client_that_never_reads(fault_pool: ProxyPool, protocol: str, kind: str) -> None:  # noqa: F811
    proxy = fault_pool.get(tls=protocol.endswith("tls"))
    assert proxy.backend is not None
    growth: list[int] = []

    def action(number: int) -> None:
        before = proxy.rss_kib()
        sent_before = proxy.backend.sent.get("flood" if kind == "download" else "ws-flood", 0)  # type: ignore[union-attr]
        sock = (open_http1 if protocol == "http1" else open_http2)(proxy, kind)
        try:
            time.sleep(FLOOD_SECONDS)
            grown = proxy.rss_kib() - before
            growth.append(grown)
            flooded = proxy.backend.sent.get("flood" if kind == "download" else "ws-flood", 0) - sent_before  # type: ignore[union-attr]
            growth.append(flooded // 1024)
            assert grown < RSS_BOUND_KIB, (
                f"{protocol} {kind}: RSS grew {grown // 1024} MiB in {FLOOD_SECONDS:.0f} s of a client not reading "
                f"(the backend got {flooded // (1 << 20)} MiB out)"
            )
        finally:
            client.reset(sock)  # type: ignore[arg-type]

    with proxy.family(f"client never reads, {protocol} {kind}") as family:
        family.repeat(action, 2)
    print(f"RSS growth and backend output (KiB), per round: {growth}")


@pytest.mark.parametrize("kind", ["download", "websocket"])
@pytest.mark.parametrize("protocol", ["http1", "http2", "http2-rst-stream"])
def test_a_client_that_leaves_a_flood_lets_go_of_the_backend(fault_pool: ProxyPool, protocol: str, kind: str) -> None:  # noqa: F811
    """The client resets the connection (HTTP/1.1) or only the stream (RST_STREAM, HTTP/2) while the
    backend floods: trioproxy must close the backend connection, not keep draining it."""
    proxy = fault_pool.get(tls=False)
    backend = proxy.backend
    assert backend is not None

    def action(number: int) -> None:
        sock = (open_http1 if protocol == "http1" else open_http2)(proxy, kind)
        client.recv_until(sock, b"\x00never\x00", timeout=0.2)  # type: ignore[arg-type]  # the head, the SETTINGS
        deadline = time.monotonic() + 10
        while backend.flooding == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.flooding, f"{protocol} {kind}: the flood never started"
        if protocol == "http2-rst-stream":
            client.send(sock, h2.frame(h2.RST_STREAM, 0, 1, struct.pack("!I", 8)))  # type: ignore[arg-type]
        else:
            client.reset(sock)  # type: ignore[arg-type]
        deadline = time.monotonic() + 15
        while backend.flooding and time.monotonic() < deadline:
            time.sleep(0.05)
        mode = "flood" if kind == "download" else "ws-flood"
        assert not backend.flooding, (
            f"{protocol} {kind}: 15 s after the client left, trioproxy still reads the flooding backend "
            f"({backend.sent.get(mode, 0) >> 20} MiB taken from it in all)"
        )
        if protocol == "http2-rst-stream":
            client.reset(sock)  # type: ignore[arg-type]

    with proxy.family(f"client leaves a flood, {protocol} {kind}") as family:
        family.repeat(action, 2)
