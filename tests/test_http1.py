"""The relay's HTTP/1.1 codec towards backends: pure, no sockets."""

from __future__ import annotations

import pytest

from trioproxy.relay.headers import canonical_name
from trioproxy.relay.http1 import (
    MAX_HEAD,
    ProtocolError,
    ResponseReader,
    encode_chunk,
    encode_request_head,
)


def read(data: bytes, head_request: bool = False, split: int | None = None) -> ResponseReader:
    reader = ResponseReader(head_request)
    if split is None:
        reader.feed(data)
    else:
        for i in range(0, len(data), split):
            reader.feed(data[i : i + split])
    return reader


def test_request_head_and_chunks() -> None:
    head = encode_request_head(b"POST", b"/a?b=1", [(b"host", b"x"), (b"x-one", b"1")])
    assert head == b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nX-One: 1\r\n\r\n"
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"


@pytest.mark.parametrize(
    "name, written",
    [
        (b"x-forwarded-context", b"X-Forwarded-Context"),
        (b"x-proxycontextpath", b"X-Proxycontextpath"),
        (b"X-ProxyContextPath", b"X-Proxycontextpath"),
        (b"X-CUSTOM-header", b"X-Custom-Header"),
        (b"www-authenticate", b"Www-Authenticate"),
        (b"te", b"Te"),
        (b"x--odd-", b"X--Odd-"),
    ],
)
def test_header_names_are_written_as_tornado_writes_them(name: bytes, written: bytes) -> None:
    # Tornado's HTTPHeaders capitalise each dash-separated word and lower-case the rest.
    assert canonical_name(name) == written
    head = encode_request_head(b"GET", b"/", [(name, b"v")])
    assert head == b"GET / HTTP/1.1\r\n" + written + b": v\r\n\r\n"


@pytest.mark.parametrize("split", [None, 1, 7])
def test_content_length_response(split: int | None) -> None:
    reader = read(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello", split=split)
    assert reader.status == 201 and reader.reason == b"Created"
    assert reader.headers == [(b"content-length", b"5"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
    assert b"".join(reader.take_body()) == b"hello"
    assert reader.complete and reader.reusable


@pytest.mark.parametrize("split", [None, 3])
def test_chunked_response_with_trailers(split: int | None) -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
    reader = read(data, split=split)
    assert b"".join(reader.take_body()) == b"hello world"
    assert reader.complete and reader.reusable


def test_interim_responses_are_skipped() -> None:
    reader = read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert reader.status == 200 and reader.complete
    assert reader.take_body() == [b"ok"]


def test_head_and_bodyless_statuses() -> None:
    head = read(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", head_request=True)
    assert head.complete and head.take_body() == [] and not head.reusable
    no_content = read(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert no_content.complete and no_content.reusable
    # A body sent with a 204 anyway: the response stands, the connection is not reused.
    sloppy = read(b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nhi")
    assert sloppy.complete and not sloppy.reusable


def test_a_body_ended_by_closing_the_connection() -> None:
    reader = read(b"HTTP/1.1 200 OK\r\n\r\nsome bytes")
    assert not reader.complete
    reader.feed_eof()
    assert reader.complete and not reader.reusable
    assert b"".join(reader.take_body()) == b"some bytes"


def test_connection_close_and_http_1_0_are_not_reused() -> None:
    assert not read(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").reusable
    assert not read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").reusable
    assert read(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n").reusable


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"garbage\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD + 1) + b"\r\n\r\n", "larger than"),
    ],
)
def test_malformed_responses(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        read(data)


def test_cut_off_responses() -> None:
    cut = read(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(ProtocolError, match="mid-response"):
        cut.feed_eof()
    nothing = ResponseReader()
    with pytest.raises(ProtocolError, match="before responding"):
        nothing.feed_eof()
