"""Fault injection, WebSocket and header parsing: malformed frames from clients, non-ASCII bytes in
every header trioproxy reads itself (first request of a connection, the fast path, and second,
after a keep-alive request), an unparsable Origin, and frames sent right behind the upgrade head.
"""

from __future__ import annotations

import struct

import pytest

from tests.conftest import TOKEN
from tests.faults import client
from tests.faults import h2raw as h2
from tests.faults.harness import ProxyPool, ProxyUnderTest, fault_pool, pause, proxy  # noqa: F401

pytestmark = pytest.mark.faults

MALFORMED = {
    "length-2^63": client.frame(b"x" * 10, opcode=0x2, length=1 << 63),
    "length-2^64-1": client.frame(b"x" * 10, opcode=0x2, length=(1 << 64) - 1),
    "reserved-opcode-3": client.frame(b"r", opcode=0x3),
    "reserved-opcode-B": client.frame(b"r", opcode=0xB),
    "unmasked": client.frame(b"not masked", mask=False),
    "oversized-ping": client.frame(b"p" * 200, opcode=0x9),
    "fragmented-ping": client.frame(b"p", opcode=0x9, fin=False),
    "fragmented-close": client.frame(struct.pack("!H", 1000), opcode=0x8, fin=False),
    "rsv-bits": client.frame(b"rsv", rsv=0x7),
    "continuation-first": client.frame(b"c", opcode=0x0),
    "close-1-byte": client.frame(b"\x03", opcode=0x8),
    "close-bad-code": client.frame(struct.pack("!H", 999), opcode=0x8),
    "text-bad-utf8": client.frame(b"\xff\xfe", opcode=0x1),
}


@pytest.fixture(params=[False, True], ids=["plain", "tls"])
def any_proxy(request: pytest.FixtureRequest, fault_pool: ProxyPool) -> ProxyUnderTest:  # noqa: F811
    return fault_pool.get(tls=request.param)


@pytest.mark.parametrize("target", ["/ws/echo", "/faulty/echo"])
def test_malformed_frames_from_the_client(any_proxy: ProxyUnderTest, target: str) -> None:
    names = list(MALFORMED)
    unanswered: list[str] = []

    def action(number: int) -> None:
        name = names[number % len(names)]
        with client.connect(any_proxy.port, any_proxy.tls) as sock:
            sock.sendall(client.upgrade_head(target, TOKEN))
            response = client.recv_until(sock, b"\r\n\r\n")
            assert client.status_of(response) == 101, response[:200]
            pause()
            client.send(sock, MALFORMED[name] + client.frame(b"after"))
            buffer = bytearray(response.split(b"\r\n\r\n", 1)[1])
            while (got := client.read_frame(sock, buffer, timeout=15)) is not None and got[0] != 0x8:
                continue  # the echo of what came through before the refusal
            if got is not None:  # a close frame: answer it, as a client does
                client.send(sock, client.frame(got[1][:2], opcode=0x8))
            _, closed = client.read_to_end(sock, timeout=15)
            if not closed:
                unanswered.append(name)

    with any_proxy.family(f"malformed frames to {target}") as family:
        family.repeat(action, max(len(names), 12))
    assert not unanswered, f"WebSockets still open 15 s after a malformed frame: {unanswered}"


def test_malformed_frames_over_http2(fault_pool: ProxyPool) -> None:  # noqa: F811
    plain = fault_pool.get(tls=False)
    names = list(MALFORMED)

    def action(number: int) -> None:
        conn = h2.H2Client(plain.port).start()
        try:
            conn.send_raw(h2.headers_frame(1, h2.websocket_connect(b"/ws/echo", TOKEN), end_stream=False))
            assert conn.status(conn.read(until="response")) == 200
            pause()
            conn.send_raw(h2.frame(h2.DATA, 0, 1, MALFORMED[names[number % len(names)]]))
            conn.read(timeout=0.5, until=None)
        finally:
            client.end(conn.sock, ("reset", "close")[number % 2])

    with plain.family("malformed frames over HTTP/2") as family:
        family.repeat(action, max(len(names), 12))


BAD = "\xff\xc3("  # latin-1 bytes that are not UTF-8, let alone ASCII
HEADERS = [
    "Upgrade", "Connection", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "Sec-WebSocket-Key",
    "Sec-WebSocket-Version", "Origin", "Host", "Authorization", "Cookie", "X-Forwarded-For",
    "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port", "X-Forwarded-Prefix",
]  # fmt: skip


def bad_head(name: str, websocket: bool, token: str | None) -> bytes:
    headers = [*client.upgrade_headers()] if websocket else []
    headers += client.auth_headers(token)
    base = {"Upgrade": "websocket", "Connection": "Upgrade", "Origin": "http://127.0.0.1", "Host": "127.0.0.1"}
    value = base.get(name, "v") + BAD
    if name == "Authorization":
        value = f"token {token}{BAD}"
    replaced = [(n, value) for n, v in headers if n == name]
    headers = [(n, v) for n, v in headers if n != name] + (replaced or [(name, value)])
    target = "/ws/echo" if websocket else "/echo/x"
    if name == "Host":
        return client.head("GET", target, headers, host="127.0.0.1" + BAD).replace(b"Host: 127.0.0.1" + BAD.encode("latin-1") + b"\r\nHost", b"Host", 1)
    return client.head("GET", target, headers)


def check_non_ascii(any_proxy: ProxyUnderTest, names: list[str], position: str, count: int) -> None:
    bad_answers: list[str] = []

    def action(number: int) -> None:
        websocket = number % 2 == 0
        token = (TOKEN, None)[(number // 2) % 2]
        name = names[number % len(names)] if len(names) > 1 else names[0]
        with client.connect(any_proxy.port, any_proxy.tls) as sock:
            if position == "second":
                sock.sendall(client.head("GET", "/echo/first", client.auth_headers(TOKEN)))
                first = client.recv_until(sock, b'"peer"')
                assert client.status_of(first) == 200, first[:200]
            client.send(sock, bad_head(name, websocket, token))
            response = client.recv_until(sock, b"\r\n\r\n", timeout=10)
            status = client.status_of(response)
            if status is None or status >= 500:
                kind = "WebSocket" if websocket else "HTTP"
                body = response.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in response else b""
                body += client.recv_until(sock, b"}", timeout=2) if response else b""
                bad_answers.append(f"{name}, {kind} {'with' if token else 'without'} token: {response[:14]!r} {body[:160]!r}")

    with any_proxy.family(f"non-ASCII {', '.join(names)} ({position} request)") as family:
        family.repeat(action, count)
    assert not bad_answers, f"non-ASCII bytes as the {position} request got no clear answer: {sorted(set(bad_answers))}"


@pytest.mark.parametrize("position", ["first", "second"])
@pytest.mark.parametrize("name", HEADERS)
def test_non_ascii_bytes_in_headers(proxy: ProxyUnderTest, name: str, position: str) -> None:  # noqa: F811
    check_non_ascii(proxy, [name], position, 8)


@pytest.mark.parametrize("position", ["first", "second"])
def test_non_ascii_bytes_in_headers_over_tls(fault_pool: ProxyPool, position: str) -> None:  # noqa: F811
    """Every header in turn, WebSocket and HTTP, with and without a token (four rounds each)."""
    check_non_ascii(fault_pool.get(tls=True), HEADERS, position, 4 * len(HEADERS))


def test_unparsable_origin_with_a_token(any_proxy: ProxyUnderTest) -> None:
    statuses: list[int | None] = []

    def action(number: int) -> None:
        origin = ("http://[", "http://[::1", "http://]x[", "ht!tp://x:99999")[number % 4]
        websocket = number % 2 == 0
        with client.connect(any_proxy.port, any_proxy.tls) as sock:
            headers = [*(client.upgrade_headers() if websocket else []), *client.auth_headers(TOKEN), ("Origin", origin)]
            sock.sendall(client.head("GET", "/ws/echo" if websocket else "/echo/x", [*headers, ("Connection", "close")] if not websocket else headers))
            statuses.append(client.status_of(client.recv_until(sock, b"\r\n\r\n")))

    with any_proxy.family("Origin: http://[ with a token") as family:
        family.repeat(action, 8)
    assert all(status is not None and status < 500 for status in statuses), f"statuses: {statuses}"


def test_a_frame_right_behind_the_upgrade_head_is_echoed(any_proxy: ProxyUnderTest) -> None:
    wrong: list[str] = []

    def action(number: int) -> None:
        with client.connect(any_proxy.port, any_proxy.tls) as sock:
            head = client.upgrade_head("/ws/echo", TOKEN)
            if number % 2:
                sock.sendall(head + client.frame(b"early"))
            else:
                sock.sendall(head)
                pause()
                sock.sendall(client.frame(b"early"))
            response = client.recv_until(sock, b"\r\n\r\n")
            buffer = bytearray(response.split(b"\r\n\r\n", 1)[1])
            got = client.read_frame(sock, buffer) if client.status_of(response) == 101 else None
            if got != (0x1, b"early"):
                wrong.append(f"{response[:60]!r} then {got}")

    with any_proxy.family("a frame right behind the upgrade head") as family:
        family.repeat(action)
    assert not wrong, f"early frames not echoed: {wrong[:5]}"
