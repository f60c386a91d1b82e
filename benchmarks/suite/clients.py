"""Small, dependency-free clients: blocking HTTP/1.1 and WebSocket for one-connection
measurements, asyncio ones for load. Only for 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# websockets' C masking: in pure Python, masking 0.9 MB took 3.2 ms, which capped every target
# of the large-message scenario (direct included) near 160 MB/s.
from websockets.speedups import apply_mask

HOST = "127.0.0.1"
PATTERN = bytes(range(256)) * 256  # the backend's 64 KiB pattern
BLOCK = PATTERN * 16  # 1 MiB


class ProtocolFailure(Exception):
    """The peer broke the HTTP or WebSocket protocol, or closed too early."""


def pattern_crc32(size: int, _cache: dict[int, int] = {}) -> int:  # noqa: B006 - a cache
    """crc32 of the first ``size`` bytes of the repeated pattern."""
    if size not in _cache:
        crc, remaining = 0, size
        view = memoryview(BLOCK)
        while remaining:
            n = min(remaining, len(BLOCK))
            crc = zlib.crc32(view[:n], crc)
            remaining -= n
        _cache[size] = crc
    return _cache[size]


# -- blocking HTTP/1.1 -------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    conn: "HTTPConnection"
    _remaining: int | None = None  # Content-Length left, None: chunked or until close
    _chunked: bool = False
    _done: bool = False

    def iter_body(self, size: int = 1 << 20) -> Iterator[bytes]:
        conn = self.conn
        if self._done:
            return
        if self._chunked:
            while True:
                line = conn.readline()
                if not line:
                    raise ProtocolFailure("connection closed inside a chunked body")
                length = int(line.split(b";")[0], 16)
                if length == 0:
                    while conn.readline() not in (b"\r\n", b""):
                        pass
                    break
                while length:
                    data = conn.read_some(min(length, size))
                    if not data:
                        raise ProtocolFailure("connection closed inside a chunk")
                    length -= len(data)
                    yield data
                conn.readline()
        elif self._remaining is not None:
            while self._remaining:
                data = conn.read_some(min(self._remaining, size))
                if not data:
                    raise ProtocolFailure(f"connection closed with {self._remaining} bytes still to come")
                self._remaining -= len(data)
                yield data
        else:
            while True:
                data = conn.read_some(size)
                if not data:
                    break
                yield data
            conn.close()
        self._done = True

    def read(self) -> bytes:
        return b"".join(self.iter_body())

    def iter_views(self) -> Iterator[memoryview | bytes]:
        """Like iter_body, without copying Content-Length bodies: each view is only valid
        until the next one is asked for."""
        if self._chunked or self._remaining is None or self._done:
            yield from self.iter_body()
            return
        conn = self.conn
        if conn.buf and self._remaining:
            data = bytes(conn.buf[: self._remaining])
            del conn.buf[: len(data)]
            self._remaining -= len(data)
            yield data
        view = memoryview(conn.recv_buf)
        while self._remaining:
            n = conn.sock.recv_into(conn.recv_buf, min(self._remaining, len(conn.recv_buf)))
            if n == 0:
                raise ProtocolFailure(f"connection closed with {self._remaining} bytes still to come")
            self._remaining -= n
            yield view[:n]
        self._done = True


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection with a read buffer."""

    def __init__(self, port: int, timeout: float = 30.0, host: str = HOST) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.recv_buf = bytearray(1 << 20)
        self.host = f"{host}:{port}"

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "HTTPConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> bool:
        n = self.sock.recv_into(self.recv_buf)
        if n == 0:
            return False
        self.buf += memoryview(self.recv_buf)[:n]
        return True

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if not self._fill():
                line = bytes(self.buf)
                self.buf.clear()
                return line

    def read_some(self, size: int) -> bytes:
        if self.buf:
            data = bytes(self.buf[:size])
            del self.buf[:size]
            return data
        n = self.sock.recv_into(self.recv_buf, min(size, len(self.recv_buf)))
        return bytes(memoryview(self.recv_buf)[:n])

    def send_request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        content_length: int | None = None,
    ) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}"]
        all_headers = dict(headers or {})
        if body is not None:
            all_headers["Content-Length"] = str(len(body))
        elif content_length is not None:
            all_headers["Content-Length"] = str(content_length)
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock.sendall(head + (body or b""))

    def read_response(self) -> Response:
        while True:
            line = self.readline()
            if not line:
                raise ProtocolFailure("connection closed before a response")
            parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/"):
                raise ProtocolFailure(f"bad status line {line[:80]!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            while True:
                h = self.readline()
                if h in (b"\r\n", b"\n"):
                    break
                if not h:
                    raise ProtocolFailure("connection closed inside the response head")
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200 and status != 101:
                continue
            response = Response(status, parts[2] if len(parts) > 2 else "", headers, self)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                response._chunked = True
            elif "content-length" in headers:
                response._remaining = int(headers["content-length"])
            elif status in (204, 304, 101):
                response._remaining = 0
            return response

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> tuple[int, bytes]:
        self.send_request(method, path, headers, body)
        response = self.read_response()
        return response.status, response.read()


def get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    with HTTPConnection(port, timeout=timeout) as conn:
        return conn.request("GET", path, headers)


def wait_listening(port: int, timeout: float, interval: float = 0.001) -> float:
    """Poll until something accepts on ``port``; return when (time.perf_counter)."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return time.perf_counter()
        except OSError:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"nothing listens on {port} after {timeout} s") from None
            time.sleep(interval)


# -- WebSocket framing (client side: masked) --------------------------------------------------


def ws_frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    n = len(payload)
    mask = os.urandom(4)
    first = 0x80 | opcode | (0x40 if rsv1 else 0)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


def ws_handshake_request(path: str, host: str, headers: dict[str, str] | None) -> tuple[bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


class WebSocket:
    """A blocking WebSocket client connection."""

    def __init__(
        self,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
        offer_deflate: bool = False,
    ) -> None:
        """``offer_deflate``: offer ``permessage-deflate`` as browsers do; used if accepted."""
        self.conn = HTTPConnection(port, timeout=timeout)
        headers = dict(headers or {})
        if offer_deflate:
            headers["Sec-WebSocket-Extensions"] = "permessage-deflate; client_max_window_bits"
        request, _ = ws_handshake_request(path, self.conn.host, headers)
        self.conn.sock.sendall(request)
        response = self.conn.read_response()
        if response.status != 101:
            body = b""
            try:
                body = response.read()[:200]
            except Exception:
                pass
            self.conn.close()
            raise ProtocolFailure(f"handshake answered {response.status} {body!r}")
        # The server's choice; RFC 7692 §7: raw deflate, each message ends with an empty
        # stored block whose 4 trailing bytes are left out on the wire.
        self.extensions = response.headers.get("sec-websocket-extensions", "")
        self.deflate = "permessage-deflate" in self.extensions
        if self.deflate:
            self._compress = zlib.compressobj(wbits=-15)
            self._decompress = zlib.decompressobj(wbits=-15)

    def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self.conn.read_some(n - len(out))
            if not data:
                raise ProtocolFailure("connection closed inside a WebSocket frame")
            out += data
        return bytes(out)

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        if self.deflate and opcode in (0x1, 0x2):
            data = self._compress.compress(payload) + self._compress.flush(zlib.Z_SYNC_FLUSH)
            self.conn.sock.sendall(ws_frame(opcode, data[:-4], rsv1=True))
            return
        self.conn.sock.sendall(ws_frame(opcode, payload))

    def receive(self) -> tuple[int, bytes]:
        b0, b1 = self._read_exact(2)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(self._read_exact(2), "big")
        elif length == 127:
            length = int.from_bytes(self._read_exact(8), "big")
        if b1 & 0x80:
            raise ProtocolFailure("server frames must not be masked")
        payload = self._read_exact(length) if length else b""
        if b0 & 0x40:  # RSV1: a compressed message
            if not self.deflate:
                raise ProtocolFailure("a compressed frame without permessage-deflate negotiated")
            payload = self._decompress.decompress(payload + b"\x00\x00\xff\xff")
        return b0 & 0x0F, payload

    def close(self) -> None:
        try:
            self.send((1000).to_bytes(2, "big"), opcode=0x8)
        except OSError:
            pass
        self.conn.close()


# -- asyncio load --------------------------------------------------------------------------------


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # successful requests, seconds
    # (start, end, status or error text) of every request, when asked to keep them
    records: list[tuple[float, float, object]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)


async def _read_response_async(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return (status, whether the connection may be reused)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked = False
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            close = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                break
            await reader.readexactly(size + 2)
    elif length is not None:
        if length:
            await reader.readexactly(length)
    else:
        await reader.read()  # until close
        close = True
    return status, not close


async def http_load(
    port: int,
    path: str,
    headers: dict[str, str] | None,
    concurrency: int,
    duration: float,
    keep_records: bool = False,
    stop: Callable[[], bool] | None = None,
    error_pause: float = 0.001,
    pause: float = 0.0,
    request_timeout: float = 10.0,
    on_record: Callable[[float, float, object], None] | None = None,
) -> LoadResult:
    """Closed-loop GET load: ``concurrency`` keep-alive connections for ``duration`` seconds
    (or until ``stop()``), each pausing ``pause`` s between requests; a failure reconnects
    and goes on after ``error_pause`` s."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    result = LoadResult()
    start = time.perf_counter()
    deadline = start + duration

    def done() -> bool:
        return time.perf_counter() >= deadline or (stop is not None and stop())

    async def worker() -> None:
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        while not done():
            t0 = time.perf_counter()
            outcome: object
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, port), request_timeout
                    )
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                writer.write(request)
                assert reader is not None
                status, reusable = await asyncio.wait_for(_read_response_async(reader), request_timeout)
                outcome = status
                if not reusable:
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
                outcome = _describe(exc)
            except asyncio.TimeoutError:
                outcome = "timeout"
            t1 = time.perf_counter()
            if keep_records:
                result.records.append((t0, t1, outcome))
            if on_record is not None:
                on_record(t0, t1, outcome)
            if outcome == 200:
                result.latencies.append(t1 - t0)
                if pause:
                    await asyncio.sleep(pause)
            else:
                key = f"HTTP {outcome}" if isinstance(outcome, int) else str(outcome)
                result.errors[key] = result.errors.get(key, 0) + 1
                if writer is not None:
                    writer.close()
                    writer = None
                await asyncio.sleep(error_pause)
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    return result


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "connection reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed"
    return type(exc).__name__


async def ws_load(
    port: int,
    path: str,
    headers: dict[str, str] | None,
    connections: int,
    duration: float,
    size: int = 1024,
    keep_times: bool = False,
) -> tuple[LoadResult, int]:
    """``connections`` WebSockets each doing echo round trips one at a time; returns the
    result and how many connections opened. ``keep_times``: each round trip's (start, end)
    in ``records`` too."""
    result = LoadResult()
    opened = 0
    payload = os.urandom(size)
    ready = asyncio.Event()
    start_box: list[float] = []

    async def one() -> None:
        nonlocal opened
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request, _ = ws_handshake_request(path, f"{HOST}:{port}", headers)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = int(head.split(b" ", 2)[1])
            if status != 101:
                key = f"handshake HTTP {status}"
                result.errors[key] = result.errors.get(key, 0) + 1
                writer.close()
                return
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
            key = f"handshake {_describe(exc)}"
            result.errors[key] = result.errors.get(key, 0) + 1
            return
        opened += 1
        await ready.wait()
        deadline = start_box[0] + duration
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                writer.write(ws_frame(0x2, payload))
                b0, b1 = await asyncio.wait_for(reader.readexactly(2), 10)
                length = b1 & 0x7F
                if length == 126:
                    length = int.from_bytes(await reader.readexactly(2), "big")
                elif length == 127:
                    length = int.from_bytes(await reader.readexactly(8), "big")
                data = await reader.readexactly(length)
                if (b0 & 0x0F) != 0x2 or data != payload:
                    result.errors["wrong echo"] = result.errors.get("wrong echo", 0) + 1
                    break
                t1 = time.perf_counter()
                result.latencies.append(t1 - t0)
                if keep_times:
                    result.records.append((t0, t1, "ok"))
            writer.write(ws_frame(0x8, (1000).to_bytes(2, "big")))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            key = _describe(exc)
            result.errors[key] = result.errors.get(key, 0) + 1
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(one()) for _ in range(connections)]
    # Let every handshake finish (or fail) before the clock starts.
    while True:
        pending = connections - opened - sum(v for k, v in result.errors.items() if k.startswith("handshake"))
        if pending <= 0:
            break
        await asyncio.sleep(0.01)
    start_box.append(time.perf_counter())
    ready.set()
    await asyncio.gather(*tasks)
    result.elapsed = time.perf_counter() - start_box[0]
    return result, opened
