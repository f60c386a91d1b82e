"""Raw-socket clients that can stop, reset or misbehave at any byte of a connection.

Everything here is blocking stdlib socket code with timeouts: a fault test drives one connection
at a time from the test's thread, and the timeouts bound every wait.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterable

TIMEOUT = 10.0
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def connect(port: int, tls: ssl.SSLContext | None = None, alpn: Iterable[str] | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if tls is None:
        return sock
    return tls.wrap_socket(sock, server_hostname="localhost")


def client_tls(alpn: Iterable[str] = ("http/1.1",)) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(list(alpn))
    return context


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER {1, 0}: the kernel sends RST instead of FIN."""
    raw = sock
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already torn down by the peer
    if isinstance(sock, ssl.SSLSocket):
        # Closing an SSLSocket would try a close_notify first; a reset sends nothing more.
        detached = socket.socket(fileno=sock.detach())
        detached.close()
        return
    raw.close()


def end(sock: socket.socket, how: str) -> None:
    """End a connection by ``how``: ``reset`` (RST) or ``close`` (FIN)."""
    if how == "reset":
        reset(sock)
    else:
        sock.close()


def send(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False if the proxy already closed the connection."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
        return False
    return True


def recv_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20, timeout: float = TIMEOUT) -> bytes:
    """Read until ``marker`` is in what arrived, the connection ends or ``timeout`` passes."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data and len(data) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, socket.timeout, ConnectionResetError, ssl.SSLError, OSError):
            break
        if not chunk:
            break
        data += chunk
    sock.settimeout(TIMEOUT)
    return data


def read_to_end(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[bytes, bool]:
    """Everything until the connection ends: (data, True), or (data, False) if ``timeout`` passed first."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return data, False
        except (ConnectionResetError, ssl.SSLError, OSError):
            return data, True
        if not chunk:
            return data, True
        data += chunk


def recv_all(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    return recv_until(sock, b"\x00never-sent\x00", timeout=timeout)


def auth_headers(token: str | None) -> list[tuple[str, str]]:
    return [("Authorization", f"token {token}")] if token else []


def head(method: str, target: str, headers: Iterable[tuple[str, str]] = (), host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + host.encode()]
    for name, value in headers:
        lines.append(name.encode("latin-1") + b": " + (value if isinstance(value, bytes) else value.encode("latin-1")))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def upgrade_headers(key: str = WS_KEY) -> list[tuple[str, str]]:
    return [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]


def upgrade_head(target: str, token: str | None, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    return head("GET", target, [*upgrade_headers(), *auth_headers(token), *extra])


def frame(
    payload: bytes,
    opcode: int = 0x1,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One WebSocket frame; ``length`` overrides the declared payload length (a lie)."""
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask else 0
    if declared < 126:
        header = struct.pack("!BB", first, mask_bit | declared)
    elif declared < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, declared)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, declared & ((1 << 64) - 1))
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(sock: socket.socket, buffer: bytearray, timeout: float = TIMEOUT) -> tuple[int, bytes] | None:
    """Read one (unmasked, server) frame: (opcode, payload), or None if the connection ended."""
    deadline = time.monotonic() + timeout

    def need(count: int) -> bool:
        while len(buffer) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, socket.timeout, ConnectionResetError, ssl.SSLError, OSError):
                return False
            if not chunk:
                return False
            buffer.extend(chunk)
        return True

    if not need(2):
        return None
    opcode, size = buffer[0] & 0x0F, buffer[1] & 0x7F
    offset = 2
    if size == 126:
        if not need(4):
            return None
        size, offset = struct.unpack("!H", buffer[2:4])[0], 4
    elif size == 127:
        if not need(10):
            return None
        size, offset = struct.unpack("!Q", buffer[2:10])[0], 10
    if not need(offset + size):
        return None
    payload = bytes(buffer[offset : offset + size])
    del buffer[: offset + size]
    return opcode, payload


def status_of(response: bytes) -> int | None:
    """The status code of the response head at the start of ``response``."""
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def websocket_echo(port: int, target: str, token: str | None, tls: ssl.SSLContext | None = None) -> str:
    """Open a WebSocket through the proxy, send one message, and return what came back or why not."""
    with connect(port, tls) as sock:
        sock.sendall(upgrade_head(target, token))
        response = recv_until(sock, b"\r\n\r\n")
        if status_of(response) != 101:
            return f"no 101: {response[:200]!r}"
        buffer = bytearray(response.split(b"\r\n\r\n", 1)[1])
        sock.sendall(frame(b"fault-check"))
        got = read_frame(sock, buffer)
        if got is None:
            return "no echo"
        sock.sendall(frame(struct.pack("!H", 1000), opcode=0x8))
        return got[1].decode("latin-1")


def http_get(port: int, target: str, token: str | None, tls: ssl.SSLContext | None = None) -> bytes:
    with connect(port, tls) as sock:
        sock.sendall(head("GET", target, [*auth_headers(token), ("Connection", "close")]))
        return recv_all(sock)


def ws_accept_key(key: str = WS_KEY) -> str:
    import hashlib

    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    return base64.b64encode(digest).decode()
