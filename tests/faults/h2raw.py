"""HTTP/2 by hand: raw frames, read and written by the client itself (``hpack`` for header blocks).

A raw frame is written byte by byte (``frame``) and header blocks are HPACK-encoded without any
validation (``header_block``), so non-ASCII pseudo-headers, frames on streams in the wrong state
and frames that break the framing layer can all be sent.
"""

from __future__ import annotations

import base64
import socket
import ssl
import struct
import time
from dataclasses import dataclass

import hpack

from . import client

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 2, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"", length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack("!I", size)[1:] + struct.pack("!BBI", kind, flags, stream & 0x7FFFFFFF) + payload


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return hpack.Encoder().encode(headers)


def request(
    method: bytes = b"GET",
    path: bytes = b"/echo/h2",
    token: str | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
    scheme: bytes = b"http",
) -> list[tuple[bytes, bytes]]:
    headers = [(b":method", method), (b":scheme", scheme), (b":authority", b"127.0.0.1"), (b":path", path)]
    if token:
        headers.append((b"authorization", f"token {token}".encode()))
    return headers + (extra or [])


def websocket_connect(path: bytes, token: str | None, scheme: bytes = b"http") -> list[tuple[bytes, bytes]]:
    """An RFC 8441 extended CONNECT for a WebSocket."""
    headers = [
        (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", scheme),
        (b":authority", b"127.0.0.1"), (b":path", path), (b"sec-websocket-version", b"13"),
    ]  # fmt: skip
    if token:
        headers.append((b"authorization", f"token {token}".encode()))
    return headers


def headers_frame(stream: int, headers: list[tuple[bytes, bytes]], end_stream: bool = True) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream, header_block(headers))


@dataclass
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes
    headers: list[tuple[bytes, bytes]] | None = None  # decoded, for HEADERS


class H2Client:
    """A client HTTP/2 connection that reads frames itself: raw frames sent behind a state machine's
    back would make one refuse the answers. Prior knowledge on a plain socket, ALPN ``h2`` over TLS."""

    def __init__(self, port: int, tls: bool = False) -> None:
        context = client.client_tls(("h2",)) if tls else None
        self.sock = client.connect(port, context)
        if isinstance(self.sock, ssl.SSLSocket):
            assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.scheme = b"https" if tls else b"http"
        self.buffer = bytearray()
        self.decoder = hpack.Decoder()
        self.frames: list[Frame] = []
        self.closed = False

    def start(self) -> H2Client:
        self.send_raw(PREFACE + frame(SETTINGS, 0, 0, struct.pack("!HI", 0x2, 0)))
        return self

    def send_raw(self, data: bytes) -> bool:
        return client.send(self.sock, data)

    def read(self, timeout: float = 5.0, until: str | None = "end", stream: int = 1) -> list[Frame]:
        """Read frames until ``until`` happens on ``stream`` ("response": its HEADERS, "data": a
        DATA, "end": END_STREAM or RST_STREAM), a GOAWAY, the end of the connection or ``timeout``."""
        got: list[Frame] = []
        deadline = time.monotonic() + timeout
        while not self.closed:
            for item in self._parse():
                got.append(item)
                if item.kind == GOAWAY:
                    return got
                if until is not None and item.stream == stream and self._is(item, until):
                    return got
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout, OSError, ssl.SSLError):
                return got
            if not data:
                self.closed = True
                return got
            self.buffer.extend(data)
        return got

    @staticmethod
    def _is(item: Frame, until: str) -> bool:
        if until == "response":
            return item.kind in (HEADERS, RST_STREAM)
        if until == "data":
            return item.kind in (DATA, RST_STREAM)
        return item.kind == RST_STREAM or (item.kind in (HEADERS, DATA) and bool(item.flags & END_STREAM))

    def _parse(self) -> list[Frame]:
        parsed = []
        while len(self.buffer) >= 9:
            size = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + size:
                break
            kind, flags, stream = self.buffer[3], self.buffer[4], int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            item = Frame(kind, flags, stream, bytes(self.buffer[9 : 9 + size]))
            del self.buffer[: 9 + size]
            if kind == SETTINGS and not flags & 0x1:
                self.send_raw(frame(SETTINGS, 0x1, 0))
            elif kind == PING and not flags & 0x1:
                self.send_raw(frame(PING, 0x1, 0, item.payload))
            elif kind == HEADERS:
                block = item.payload
                if flags & 0x8:
                    block = block[1 : len(block) - block[0]]
                if flags & 0x20:
                    block = block[5:]
                try:
                    item.headers = self.decoder.decode(block, raw=True)
                except hpack.HPACKError:
                    item.headers = []
            self.frames.append(item)
            parsed.append(item)
        return parsed

    @staticmethod
    def status(frames: list[Frame], stream: int = 1) -> int | None:
        for item in frames:
            if item.kind == HEADERS and item.stream == stream and item.headers:
                value = dict(item.headers).get(b":status")
                if value is not None:
                    return int(value)
        return None


def settings_payload() -> str:
    """A valid HTTP2-Settings header value (RFC 7540 3.2.1): base64url of a SETTINGS payload."""
    payload = struct.pack("!HI", 0x3, 100) + struct.pack("!HI", 0x4, 65535)
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
