"""Fault injection, HTTP/1.1 and TLS: a client that resets or closes at every phase of a connection.

Each phase runs with a reset (SO_LINGER {1, 0}) and a plain close, with and without the token,
repeated (``TRIOPROXY_FAULT_ROUNDS``) with random 0-5 ms delays, half of it while a background
client keeps trioproxy busy; afterwards trioproxy must be alive, answer, and have its file
descriptors back (see tests/faults/harness.py).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

import pytest

from tests.conftest import TOKEN
from tests.faults import client
from tests.faults.harness import ProxyUnderTest, fault_pool, pause, proxy, rounds, tls_proxy  # noqa: F401

pytestmark = pytest.mark.faults

Send = Callable[[socket.socket, str | None], None]


def combination(number: int) -> tuple[str, str | None]:
    """Round ``number``'s way to end and credentials: all four combinations in turn."""
    return ("reset", "close")[number % 2], (None, TOKEN)[(number // 2) % 2]


def sends(data: Callable[[str | None], bytes]) -> Send:
    def run(sock: socket.socket, token: str | None) -> None:
        client.send(sock, data(token))

    return run


def after_101(frame_part: bytes = b"") -> Send:
    def run(sock: socket.socket, token: str | None) -> None:
        if client.send(sock, client.upgrade_head("/ws/echo", token)):
            client.recv_until(sock, b"\r\n\r\n", timeout=5)
            if frame_part:
                client.send(sock, frame_part)

    return run


def large_response(sock: socket.socket, token: str | None) -> None:
    if client.send(sock, client.head("GET", "/echo/bytes?size=50000000", client.auth_headers(token))):
        client.recv_until(sock, b"\r\n\r\n", timeout=5)
        with_body = client.recv_until(sock, b"\x00" * 1024 * 1024, limit=256 * 1024, timeout=2)
        assert with_body is not None


def fixed_body(token: str | None) -> bytes:
    headers = [*client.auth_headers(token), ("Content-Length", "100000")]
    return client.head("POST", "/echo/upload", headers) + b"b" * 1000


def chunked_body(token: str | None) -> bytes:
    headers = [*client.auth_headers(token), ("Transfer-Encoding", "chunked")]
    return client.head("POST", "/echo/upload", headers) + b"1000\r\n" + b"c" * 100


PHASES: dict[str, Send] = {
    "nothing-sent": lambda sock, token: None,
    "mid-request-line": sends(lambda token: b"GET /echo/x HT"),
    "mid-headers": sends(lambda token: client.head("GET", "/echo/x", client.auth_headers(token))[:-4] + b"\r\nX-Cut: va"),
    "after-head": sends(lambda token: client.head("GET", "/echo/slow?delay=0.2", client.auth_headers(token))),
    "mid-body-fixed": sends(fixed_body),
    "mid-body-chunked": sends(chunked_body),
    "upgrade-head-relayed": sends(lambda token: client.upgrade_head("/ws/echo", token)),
    "upgrade-head-unknown-route": sends(lambda token: client.upgrade_head("/no-such-server/", token)),
    "upgrade-head-own-route": sends(lambda token: client.upgrade_head("/server-proxy/api/servers", token)),
    "upgrade-head-fault-backend": sends(lambda token: client.upgrade_head("/faulty/ok", token)),
    "after-101": after_101(),
    "mid-frame": after_101(client.frame(b"x" * 4000)[:1000]),
    "frame-right-after-head": sends(lambda token: client.upgrade_head("/ws/echo", token) + client.frame(b"early")),
    "during-large-response": large_response,
}


def run_phase(proxy: ProxyUnderTest, phase: str, tls: ssl.SSLContext | None = None) -> None:  # noqa: F811
    send = PHASES[phase]

    def action(number: int) -> None:
        how, token = combination(number)
        sock = client.connect(proxy.port, tls or proxy.tls)
        try:
            send(sock, token)
            pause()
        finally:
            client.end(sock, how)

    with proxy.family(f"client ends {phase}") as family:
        family.repeat(action, max(2, rounds() // 2) if phase == "during-large-response" else None)


@pytest.mark.parametrize("phase", list(PHASES))
def test_client_resets_and_closes_at_every_phase(proxy: ProxyUnderTest, phase: str) -> None:  # noqa: F811
    run_phase(proxy, phase)


TLS_PHASES = ["nothing-sent", "after-head", "mid-body-chunked", "upgrade-head-relayed", "upgrade-head-own-route", "after-101", "mid-frame"]


@pytest.mark.parametrize("phase", TLS_PHASES)
def test_tls_client_resets_and_closes_at_every_phase(tls_proxy: ProxyUnderTest, phase: str) -> None:  # noqa: F811
    run_phase(tls_proxy, phase)


def client_hello() -> bytes:
    """The first flight of a real TLS handshake, to be cut anywhere."""
    context = client.client_tls(("h2", "http/1.1"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@pytest.mark.parametrize("cut", ["nothing", "record-header", "mid-hello", "whole-hello", "garbage", "after-handshake"])
def test_tls_handshake_cut_anywhere(tls_proxy: ProxyUnderTest, cut: str) -> None:  # noqa: F811
    hello = client_hello()
    sent = {
        "nothing": b"",
        "record-header": hello[:3],
        "mid-hello": hello[: len(hello) // 2],
        "whole-hello": hello,
        "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    }

    def action(number: int) -> None:
        how = ("reset", "close")[number % 2]
        if cut == "after-handshake":
            sock = client.connect(tls_proxy.port, client.client_tls(("h2", "http/1.1")[number % 2 :][:1]))
        else:
            sock = client.connect(tls_proxy.port)
            client.send(sock, sent[cut])
            if cut == "whole-hello":
                client.recv_until(sock, b"\x00never\x00", timeout=0.05)  # the server's flight arrives
        pause()
        client.end(sock, how)

    with tls_proxy.family(f"TLS handshake cut at {cut}") as family:
        family.repeat(action)


@pytest.mark.parametrize("target", ["/echo/x", "/server-proxy/api/servers", "/no-such-server/"])
def test_connection_close_ends_the_connection(proxy: ProxyUnderTest, target: str) -> None:  # noqa: F811
    """A request with ``Connection: close`` gets its response, and then the connection ends."""
    left_open: list[str] = []

    def action(number: int) -> None:
        how, token = combination(number)
        with client.connect(proxy.port, proxy.tls) as sock:
            sock.sendall(client.head("GET", target, [*client.auth_headers(token), ("Connection", "close")]))
            data, closed = client.read_to_end(sock, timeout=5)
            if not closed:
                line = data.split(b"\r\n", 1)[0]
                left_open.append(f"{'with' if token else 'without'} token: {line!r}")

    with proxy.family(f"Connection: close to {target}") as family:
        family.repeat(action, 4)
    assert not left_open, f"{target}: still open 5 s after the response to Connection: close: {left_open}"
