"""HTTP/1.1 to backends, sans I/O: request heads and bodies out, responses in.

Responses are parsed by httptools (llhttp, the parser of Node.js), which costs about a
microsecond per small response where a pure-Python parser costs tens; on the relay's hot path
that difference is most of the proxy's own cost. Requests are simple to write: their header
values come from an HTTP server that has already validated them (Hypercorn) or from
configuration checked for line breaks.
"""

from __future__ import annotations

import httptools

from .framing import response_framing_error
from .headers import canonical_name

Headers = list[tuple[bytes, bytes]]


class ProtocolError(Exception):
    """The backend's response is malformed or was cut off."""


def encode_request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """The request line and headers, names in canonical case (as jupyter-server-proxy sends them)."""
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (canonical_name(name), b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

# llhttp itself puts no bound on a response head; a backend must not make trioproxy hold an
# endless one in memory.
MAX_HEAD = 256 * 1024


class ResponseReader:
    """One response from a backend, fed as it arrives; the body comes out in pieces.

    After :meth:`feed`: ``headers_done`` once the head is in (status, reason, headers),
    :meth:`take_body` gives the body pieces parsed so far, ``complete`` once the message
    has ended. Interim 1xx responses are skipped.
    """

    __slots__ = (
        "_parser",
        "_head_request",
        "status",
        "reason",
        "headers",
        "headers_done",
        "complete",
        "_body",
        "buffered",
        "length",
        "_delimited",
        "_interim",
        "_extra",
        "_keep_alive",
        "_head_size",
    )

    def __init__(self, head_request: bool = False) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._extra = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        self.headers_done = False
        self.complete = False
        self._body: list[bytes] = []
        self.buffered = 0  # bytes of body parsed and not yet taken
        self.length: int | None = None  # the Content-Length, if the response has one
        self._delimited = False  # length or chunks mark the end (not the connection closing)
        self._interim = False
        self._keep_alive = False
        self._head_size = 0

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self._extra = True  # bytes after the response: the connection is not reusable
        elif self._interim:
            self._reset()

    def on_status(self, status: bytes) -> None:
        self._count(len(status))
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        self.headers.append((name.lower(), value))

    def _count(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD:
            raise ProtocolError(f"the backend's response head is larger than {MAX_HEAD // 1024} KiB")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True
            return
        problem = response_framing_error(self.headers)
        if problem is not None:
            raise ProtocolError(problem)
        self.status = status
        self.headers_done = True
        # (A response with both Transfer-Encoding and Content-Length never gets here: llhttp
        # refuses it, as RFC 9112 §6.3 allows, so the relay answers 502.)
        for name, value in self.headers:
            if name == b"content-length":
                self._delimited = True
                self.length = int(value)  # llhttp checked it
            elif name == b"transfer-encoding":
                self._delimited = True
        if self._head_request or status in (204, 304):
            self._delimited = True
            self.complete = True

    def on_body(self, data: bytes) -> None:
        self._body.append(data)
        self.buffered += len(data)

    def on_message_complete(self) -> None:
        if not self._interim and not self._extra:
            self.complete = True
            # Asked now: llhttp resets its flags for the next message after this callback.
            self._keep_alive = self._parser.should_keep_alive()

    # feeding

    def feed(self, data: bytes | bytearray) -> None:
        if self.complete and self._head_request:
            return  # a HEAD response's promised length is not sent
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ProtocolError):  # raised by a callback here
                raise cause from None
            if self.complete:
                # Garbage after a complete response (say, a body sent with a 204): the
                # response stands, the connection is not reused.
                self._extra = True
                return
            raise ProtocolError(f"malformed response from the backend: {exc}") from None

    def feed_eof(self) -> None:
        """The backend closed the connection; that ends a body with no length, or breaks one."""
        if self.complete:
            return
        if self.headers_done and not self._delimited:
            self.complete = True
            return
        if self.headers_done:
            raise ProtocolError("the backend closed the connection mid-response")
        raise ProtocolError("the backend closed the connection before responding")

    def take_body(self) -> list[bytes]:
        parts, self._body = self._body, []
        self.buffered = 0
        return parts

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry another request after this response."""
        return (
            self.complete
            and self._delimited
            and not self._extra
            and not self._head_request
            and self._keep_alive
        )
