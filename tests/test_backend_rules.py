"""The backend client's pure rules, without sockets: framing, upstream headers, schedules."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trioproxy.backend import Backend, ClientOptions, ProxyTargets
from trioproxy.health import ready_poll_interval
from trioproxy.relay.framing import FramingError, body_framing, declared_length, response_framing_error
from trioproxy.relay.upstream import trusted_proxy, upstream_headers, upstream_request
from trioproxy.routing import resolve

# -- request framing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, length",
    [
        ([], None),
        ([(b"content-length", b"12")], 12),
        ([(b"content-length", b"12"), (b"content-length", b"12")], 12),  # the same value twice: one
        ([(b"content-length", b"7, 7")], 7),
        ([(b"transfer-encoding", b"chunked")], None),
        ([(b"transfer-encoding", b" Chunked ")], None),
    ],
)
def test_declared_length(headers: list[tuple[bytes, bytes]], length: int | None) -> None:
    assert declared_length(headers) == length


@pytest.mark.parametrize(
    "headers, why",
    [
        ([(b"content-length", b"0"), (b"transfer-encoding", b"chunked")], "both"),
        ([(b"transfer-encoding", b"chunked"), (b"content-length", b"4")], "both"),
        ([(b"transfer-encoding", b"gzip, chunked")], "'chunked' alone"),
        ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], "'chunked' alone"),
        ([(b"transfer-encoding", b"chunked, identity")], "'chunked' alone"),
        ([(b"transfer-encoding", b"xchunked")], "'chunked' alone"),
        ([(b"content-length", b"4"), (b"content-length", b"5")], "conflicting"),
        ([(b"content-length", b"4, 5")], "conflicting"),
        ([(b"content-length", b"+4")], "not a number"),
        ([(b"content-length", b"-1")], "not a number"),
        ([(b"content-length", b"0x10")], "not a number"),
        ([(b"content-length", b"9" * 30)], "not a number"),
    ],
)
def test_ambiguous_framing_is_refused(headers: list[tuple[bytes, bytes]], why: str) -> None:
    with pytest.raises(FramingError, match=why):
        declared_length(headers)


def test_body_framing_is_what_the_relay_writes() -> None:
    assert body_framing(b"POST", 5, b"hello", False) == ((b"content-length", b"5"), False)
    assert body_framing(b"POST", None, b"hel", True) == ((b"transfer-encoding", b"chunked"), True)
    assert body_framing(b"POST", None, b"", False) == ((b"content-length", b"0"), False)
    assert body_framing(b"GET", None, b"", False) == (None, False)
    assert body_framing(b"DELETE", None, b"x", False) == ((b"content-length", b"1"), False)


def test_response_framing() -> None:
    assert response_framing_error([(b"transfer-encoding", b"chunked")]) is None
    assert response_framing_error([(b"content-length", b"3")]) is None
    assert "gzip, chunked" in str(response_framing_error([(b"transfer-encoding", b"gzip, chunked")]))


# -- upstream headers ------------------------------------------------------------------------------


def scope(headers: list[tuple[bytes, bytes]], client: str = "127.0.0.1") -> dict[str, object]:
    return {
        "type": "http",
        "path": "/web/x",
        "raw_path": b"/web/x",
        "query_string": b"",
        "headers": headers,
        "client": (client, 50000),
        "scheme": "http",
    }


def test_framing_and_hop_by_hop_headers_never_pass_and_host_always_does() -> None:
    headers = upstream_headers(
        scope([
            (b"host", b"public:8888"),
            (b"content-length", b"4"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"host, x-secret"),
            (b"x-secret", b"1"),
            (b"x-kept", b"2"),
        ]),
        context_path="/web",
        strip_credentials=lambda h: h,
        trusted=True,
    )
    names = [name for name, _ in headers]
    assert b"content-length" not in names and b"transfer-encoding" not in names
    assert b"connection" not in names and b"x-secret" not in names
    assert (b"host", b"public:8888") in headers and (b"x-kept", b"2") in headers


def test_a_host_is_added_when_the_client_sent_none() -> None:
    headers = upstream_headers(
        scope([]), context_path=None, strip_credentials=lambda h: h, trusted=True, default_host="127.0.0.1:9000"
    )
    assert (b"host", b"127.0.0.1:9000") in headers


def test_untrusted_forwarded_headers_are_replaced() -> None:
    sent = [
        (b"host", b"h"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-real-ip", b"1.2.3.4"),
        (b"forwarded", b"for=1.2.3.4"),
        (b"x-forwarded-port", b"443"),
    ]
    route = resolve(b"/web/x", "/", {"web"})
    request = upstream_request(scope(sent, client="10.1.2.3"), route, forwarded_allow=("127.0.0.1",))
    got = dict(request.headers)
    assert got[b"x-forwarded-proto"] == b"http" and got[b"x-forwarded-for"] == b"10.1.2.3"
    assert b"x-real-ip" not in got and b"forwarded" not in got and b"x-forwarded-port" not in got
    trusted = dict(upstream_request(scope(sent, client="10.1.2.3"), route, forwarded_allow=("10.0.0.0/8",)).headers)
    assert trusted[b"x-forwarded-proto"] == b"https" and trusted[b"x-forwarded-for"] == b"1.2.3.4, 10.1.2.3"


@pytest.mark.parametrize(
    "client, allow, trusted",
    [
        (("127.0.0.1", 1), ("127.0.0.1", "::1"), True),
        (("127.0.0.2", 1), ("127.0.0.1", "::1"), False),
        (("::1", 1), ("127.0.0.1", "::1"), True),
        (("192.0.2.7", 1), ("192.0.2.0/24",), True),
        (("192.0.3.7", 1), ("192.0.2.0/24",), False),
        (("192.0.3.7", 1), ("*",), True),
        (None, ("127.0.0.1",), True),  # a unix socket
        (("", 0), ("127.0.0.1",), True),
        (("not-an-ip", 1), ("10.0.0.0/8", "bad/net"), False),
    ],
)
def test_trusted_proxy(client: tuple[str, int] | None, allow: tuple[str, ...], trusted: bool) -> None:
    assert trusted_proxy(client, allow) is trusted


# -- schedules -----------------------------------------------------------------------------------------


def test_readiness_polling_backs_off() -> None:
    assert ready_poll_interval(0) == 0.005
    assert ready_poll_interval(4.9) == 0.005  # a start within the default timeout: 5 ms
    assert ready_poll_interval(6) == pytest.approx(0.01)
    assert ready_poll_interval(10) == pytest.approx(0.05)
    assert ready_poll_interval(600) == 0.1
    assert all(ready_poll_interval(t / 10) <= 0.02 for t in range(70))  # ≤ 20 ms at first


async def test_proxy_targets_expire_when_idle(autojump_clock: trio.testing.MockClock) -> None:
    targets = ProxyTargets(ClientOptions(), max_targets=3, idle_timeout=60)
    first = targets.client(Backend(port=1))
    await trio.sleep(30)
    second = targets.client(Backend(port=2))
    await trio.sleep(31)
    targets.expire()
    assert first.closed and not second.closed and len(targets) == 1
    assert targets.client(Backend(port=2)) is second  # the same client while it lives


async def test_proxy_targets_evict_the_least_recently_used(autojump_clock: trio.testing.MockClock) -> None:
    targets = ProxyTargets(ClientOptions(), max_targets=2)
    one = targets.client(Backend(port=1))
    two = targets.client(Backend(port=2))
    targets.client(Backend(port=1))  # used again: port 2 is now the oldest
    targets.client(Backend(port=3))
    assert two.closed and not one.closed and len(targets) == 2
