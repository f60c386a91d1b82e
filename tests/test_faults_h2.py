"""Fault injection, HTTP/2: prior knowledge on the plain port and ALPN ``h2`` over TLS.

Cut prefaces and streams, RST_STREAM floods and GOAWAY, refused WebSockets over extended CONNECT,
frames out of order and malformed, non-ASCII pseudo-headers, PRIORITY for many idle streams,
CONNECT without ``:path`` and h2c upgrades; each repeated, then the harness's checks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from tests.conftest import TOKEN
from tests.faults import client
from tests.faults import h2raw as h2
from tests.faults.harness import ProxyPool, ProxyUnderTest, fault_pool, pause, rounds  # noqa: F401

pytestmark = pytest.mark.faults


@pytest.fixture(params=[False, True], ids=["prior-knowledge", "alpn"])
def h2_proxy(request: pytest.FixtureRequest, fault_pool: ProxyPool) -> ProxyUnderTest:  # noqa: F811
    return fault_pool.get(tls=request.param)


def combination(number: int) -> tuple[str, str | None]:
    return ("reset", "close")[number % 2], (None, TOKEN)[(number // 2) % 2]


def run(
    proxy: ProxyUnderTest,
    name: str,
    act: Callable[[h2.H2Client, int, str | None], None],
    preface: bool = True,
    count: int | None = None,
) -> None:
    def action(number: int) -> None:
        how, token = combination(number)
        conn = h2.H2Client(proxy.port, tls=proxy.tls is not None)
        try:
            if preface:
                conn.start()
            act(conn, number, token)
            pause()
        finally:
            client.end(conn.sock, how)

    with proxy.family(f"HTTP/2 {name} ({'alpn' if proxy.tls else 'prior knowledge'})") as family:
        family.repeat(action, count)


def test_cut_preface(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        conn.send_raw(h2.PREFACE[: number % len(h2.PREFACE)])

    run(h2_proxy, "mid preface", act, preface=False)


def test_cut_stream(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        if number % 3 == 0:  # mid headers: HEADERS without END_HEADERS, no CONTINUATION
            conn.send_raw(h2.frame(h2.HEADERS, 0, 1, h2.header_block(h2.request(token=token, scheme=conn.scheme))))
        elif number % 3 == 1:  # mid body
            headers = h2.request(b"POST", b"/echo/upload", token, [(b"content-length", b"100000")], conn.scheme)
            conn.send_raw(h2.headers_frame(1, headers, end_stream=False) + h2.frame(h2.DATA, 0, 1, b"d" * 1000))
        else:  # waiting for a slow answer
            conn.send_raw(h2.headers_frame(1, h2.request(path=b"/echo/slow?delay=0.2", token=token, scheme=conn.scheme)))

    run(h2_proxy, "mid stream", act, count=rounds(60))  # cheap, and a leak shows only every few rounds


def test_cut_large_response(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        conn.send_raw(h2.headers_frame(1, h2.request(path=b"/echo/bytes?size=50000000", token=token, scheme=conn.scheme)))
        conn.read(timeout=1, until="data")

    run(h2_proxy, "during a large response", act)


def test_rst_stream_flood_and_goaway(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        burst = b"".join(
            h2.headers_frame(stream, h2.request(path=b"/echo/slow?delay=0.1", token=token, scheme=conn.scheme))
            + h2.frame(h2.RST_STREAM, 0, stream, struct.pack("!I", 8))
            for stream in range(1, 400, 2)
        )
        conn.send_raw(burst + h2.frame(h2.GOAWAY, 0, 0, struct.pack("!II", 399, 0)))
        conn.read(timeout=0.5, until=None)

    run(h2_proxy, "RST_STREAM flood then GOAWAY", act)


def test_goaway_with_requests_under_way(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        requests = b"".join(
            h2.headers_frame(stream, h2.request(path=b"/echo/bytes?size=1000000", token=token, scheme=conn.scheme))
            for stream in (1, 3, 5)
        )
        conn.send_raw(requests + h2.frame(h2.GOAWAY, 0, 0, struct.pack("!II", 0, 2)))
        conn.read(timeout=0.3, until=None)

    run(h2_proxy, "GOAWAY with requests under way", act)


def test_refused_websockets_give_their_connections_back(h2_proxy: ProxyUnderTest) -> None:
    """Extended CONNECT without a token is refused, and neither way of leaving keeps a socket."""

    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        path = (b"/ws/echo", b"/no-such-server/", b"/server-proxy/api/servers")[number % 3]
        conn.send_raw(h2.headers_frame(1, h2.websocket_connect(path, None, conn.scheme), end_stream=False))
        events = conn.read(timeout=5, until="response")
        status = conn.status(events)
        assert status is not None and status >= 400, f"extended CONNECT to {path!r} without a token: {events}"

    run(h2_proxy, "refused extended CONNECT", act)


def test_websocket_over_h2_cut(h2_proxy: ProxyUnderTest) -> None:
    """With a token: an extended CONNECT cut right after its response, or mid frame."""

    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        conn.send_raw(h2.headers_frame(1, h2.websocket_connect(b"/ws/echo", TOKEN, conn.scheme), end_stream=False))
        conn.read(timeout=5, until="response")
        if number % 2:
            conn.send_raw(h2.frame(h2.DATA, 0, 1, client.frame(b"x" * 4000)[:500]))

    run(h2_proxy, "extended CONNECT cut", act)


OUT_OF_ORDER: list[Callable[[h2.H2Client, str | None], bytes]] = [
    # DATA on a stream whose request and response have both ended
    lambda conn, token: h2.frame(h2.DATA, h2.END_STREAM, 1, b"late"),
    # DATA on an idle stream
    lambda conn, token: h2.frame(h2.DATA, 0, 5, b"idle"),
    # CONTINUATION without HEADERS
    lambda conn, token: h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, h2.header_block([(b"x", b"y")])),
    # HEADERS on an even (server) stream
    lambda conn, token: h2.headers_frame(2, h2.request(token=token, scheme=conn.scheme)),
    # a stream id going backwards
    lambda conn, token: h2.headers_frame(7, h2.request(token=token, scheme=conn.scheme))
    + h2.headers_frame(5, h2.request(token=token, scheme=conn.scheme)),
    # WINDOW_UPDATE of 0 and RST_STREAM on an idle stream
    lambda conn, token: h2.frame(h2.WINDOW_UPDATE, 0, 1, struct.pack("!I", 0)) + h2.frame(h2.RST_STREAM, 0, 9, struct.pack("!I", 0)),
    # trailers twice, then DATA after them
    lambda conn, token: h2.headers_frame(11, h2.request(b"POST", b"/echo/upload", token, scheme=conn.scheme), end_stream=False)
    + h2.headers_frame(11, [(b"x-trailer", b"1")], end_stream=False)
    + h2.frame(h2.DATA, h2.END_STREAM, 11, b"after"),
]


def test_frames_out_of_order(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        conn.send_raw(h2.headers_frame(1, h2.request(token=token, scheme=conn.scheme)))
        conn.read(timeout=5)  # stream 1's response has ended
        conn.send_raw(OUT_OF_ORDER[number % len(OUT_OF_ORDER)](conn, token))
        conn.read(timeout=0.2, until=None)

    run(h2_proxy, "frames out of order", act)


MALFORMED: list[bytes] = [
    h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"", length=1 << 20),  # beyond SETTINGS_MAX_FRAME_SIZE
    h2.frame(h2.SETTINGS, 0, 0, b"\x00\x01\x00"),  # not a multiple of 6
    h2.frame(h2.SETTINGS, 0, 0, struct.pack("!HI", 0x4, 1 << 31)),  # window beyond 2^31-1
    h2.frame(h2.PING, 0, 0, b"abc"),  # PING of 3 bytes
    h2.frame(0xEE, 0xFF, 1, b"unknown type"),  # unknown frame types are to be ignored
    h2.frame(h2.HEADERS, h2.END_HEADERS | 0x8, 1, b"\xff" + b"x" * 10),  # padding longer than the frame
    h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff\xff\xff garbage hpack"),
    h2.frame(h2.PRIORITY, 0, 1, struct.pack("!IB", 1, 16)),  # a stream depending on itself
    b"\x00\x00",  # a cut frame header
]


def test_malformed_frames(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        conn.send_raw(MALFORMED[number % len(MALFORMED)])
        conn.read(timeout=0.2, until=None)

    run(h2_proxy, "malformed frames", act)


NON_ASCII = [
    (b":path", b"/echo/\xff\xfe"),
    (b":method", b"G\xc3\xa9T"),
    (b":authority", b"h\xf6st"),
    (b":scheme", b"htt\xff"),
    (b"authorization", b"token \xff"),
    (b"x-caf\xc3\xa9", b"1"),
    (b"cookie", b"a=\xff"),
    (b"origin", b"http://\xff"),
]


def test_non_ascii_pseudo_headers(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        name, value = NON_ASCII[number % len(NON_ASCII)]
        base = h2.websocket_connect(b"/ws/echo", token, conn.scheme) if number % 3 == 2 else h2.request(token=token, scheme=conn.scheme)
        headers = [(n, value if n == name else v) for n, v in base]
        if name not in dict(base):
            headers.append((name, value))
        conn.send_raw(h2.headers_frame(1, headers, end_stream=number % 3 != 2))
        conn.read(timeout=2, until="response")

    run(h2_proxy, "non-ASCII pseudo-headers", act)


def test_priority_for_many_idle_streams(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        conn.send_raw(b"".join(h2.frame(h2.PRIORITY, 0, s, struct.pack("!IB", 0, 16)) for s in range(1, 2004, 2)))
        conn.read(timeout=0.3, until=None)

    run(h2_proxy, "PRIORITY for 1,002 idle streams", act)


def test_connect_without_path(h2_proxy: ProxyUnderTest) -> None:
    def act(conn: h2.H2Client, number: int, token: str | None) -> None:
        headers = [(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:1")]
        if token:
            headers.append((b"authorization", f"token {token}".encode()))
        conn.send_raw(h2.headers_frame(1, headers, end_stream=False))
        conn.read(timeout=2, until="response")

    run(h2_proxy, "CONNECT without :path", act)


SETTINGS_VALUES = [h2.settings_payload(), "!!not base64!!", "AAMAAABk=x", "\xff\xfe", "", "A"]


def test_h2c_upgrades(proxy: ProxyUnderTest) -> None:  # the plain port only: h2c is cleartext
    def action(number: int) -> None:
        how, token = combination(number)
        settings = SETTINGS_VALUES[number % len(SETTINGS_VALUES)]
        headers = [
            ("Upgrade", "h2c"), ("Connection", "Upgrade, HTTP2-Settings"), ("HTTP2-Settings", settings),
            *client.auth_headers(token),
        ]  # fmt: skip
        sock = client.connect(proxy.port)
        try:
            client.send(sock, client.head("GET", "/echo/h2c", headers))
            response = client.recv_until(sock, b"\r\n\r\n", timeout=2)
            if client.status_of(response) == 101 and number % 3 == 0:
                client.send(sock, h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0))
            pause()
        finally:
            client.end(sock, how)

    with proxy.family("h2c upgrades") as family:
        family.repeat(action, rounds(60))


@pytest.fixture
def proxy(fault_pool: ProxyPool) -> ProxyUnderTest:  # noqa: F811
    return fault_pool.get(tls=False)
