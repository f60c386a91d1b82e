"""The benchmark backend: one small, fast HTTP/1.1 + WebSocket server, standard library only
(plus websockets' C masking, imported on the first masked frame).

    python backend.py PORT [--sleep SECONDS] [--name NAME]

Every target (direct, trioproxy, jupyter-server-proxy) talks to this same program.

Routes (keep-alive everywhere):
  GET  /small                100-byte body (Content-Length)
  GET  /bytes?size=N         N bytes of the 64 KiB pattern below (Content-Length)
  POST|PUT /upload           reads the body (Content-Length or chunked); answers
                             {"length": N, "crc32": C}
  GET  /sse?n=N&interval=S   N server-sent events, S seconds apart; each carries the
                             wall-clock time it was sent: "data: <i> <time.time()>"
  GET  /ws (Upgrade)         WebSocket echo (text, binary, ping -> pong, close)
  anything else              like /small

``--sleep S`` waits S seconds before listening (a slow-starting server). When the environment
variable TRIOPROXY_BENCH_DIR names a directory, a line "<name> <pid> <script start> <listening>"
(wall-clock times: when this script began to run, when its socket listens) is appended to its
``listen.log``, so the benchmark can tell the backend's own start-up time from the proxy's.
"""

from __future__ import annotations

import time

T_SCRIPT = time.time()  # the script's first moment (the interpreter is up)

import asyncio
import base64
import hashlib
import json
import os
import socket
import sys
import zlib
from urllib.parse import parse_qs, urlsplit

PATTERN = bytes(range(256)) * 256  # 64 KiB; the benchmark checks downloads against it
BLOCK = memoryview(PATTERN * 16)  # 1 MiB
SMALL_BODY = b"x" * 99 + b"\n"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _response(status: str, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


SMALL_RESPONSE = _response("200 OK", SMALL_BODY)


def _headers(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> tuple[int, int]:
    """Read a request body; return (length, crc32)."""
    crc, total = 0, 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return total, crc
            remaining = size
            while remaining:
                chunk = await reader.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConnectionError("body cut short")
                crc = zlib.crc32(chunk, crc)
                remaining -= len(chunk)
                total += len(chunk)
            await reader.readline()
    remaining = int(headers.get("content-length") or 0)
    while remaining:
        chunk = await reader.read(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("body cut short")
        crc = zlib.crc32(chunk, crc)
        remaining -= len(chunk)
        total += len(chunk)
    return total, crc


async def _send_bytes(writer: asyncio.StreamWriter, size: int) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: "
        + str(size).encode() + b"\r\n\r\n"
    )
    remaining = size
    while remaining:
        n = min(remaining, len(BLOCK))
        writer.write(BLOCK[:n])
        remaining -= n
        await writer.drain()


async def _send_sse(writer: asyncio.StreamWriter, count: int, interval: float) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    for i in range(count):
        if i:
            await asyncio.sleep(interval)
        event = f"data: {i} {time.time():.6f}\n\n".encode()
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def _unmask(payload: bytes, mask: bytes) -> bytes:
    # websockets' C masking (pure Python took 3.2 ms per 0.9 MB, which capped every target of
    # the large-message scenario); imported on first use, so that start-up stays standard-library.
    from websockets.speedups import apply_mask

    return apply_mask(payload, mask)


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


async def _websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
    key = headers.get("sec-websocket-key", "").encode()
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: " + accept + b"\r\n\r\n"
    )
    fragments: list[bytes] = []
    first_opcode = 0
    while True:
        b0, b1 = await reader.readexactly(2)
        opcode, fin, length = b0 & 0x0F, b0 & 0x80, b1 & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        mask = await reader.readexactly(4) if b1 & 0x80 else b""
        payload = await reader.readexactly(length) if length else b""
        if mask:
            payload = _unmask(payload, mask)
        if opcode == 0x8:  # close: answer with the same code
            writer.write(_frame(0x8, payload[:2]))
            await writer.drain()
            return
        if opcode == 0x9:
            writer.write(_frame(0xA, payload))
        elif opcode == 0xA:
            pass
        elif opcode == 0x0 or not fin:
            if opcode:
                first_opcode = opcode
            fragments.append(payload)
            if fin:
                writer.write(_frame(first_opcode, b"".join(fragments)))
                fragments.clear()
        else:
            writer.write(_frame(opcode, payload))
        await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.transport.set_write_buffer_limits(high=4 << 20)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            method, target, headers = _headers(head)
            url = urlsplit(target)
            path = url.path
            if path == "/small":
                writer.write(SMALL_RESPONSE)
            elif path == "/bytes":
                query = parse_qs(url.query)
                await _send_bytes(writer, int(query.get("size", ["0"])[0]))
                continue
            elif path == "/upload":
                length, crc = await _read_body(reader, headers)
                body = json.dumps({"length": length, "crc32": crc}).encode()
                writer.write(_response("200 OK", body, b"application/json"))
            elif path == "/sse":
                query = parse_qs(url.query)
                await _send_sse(
                    writer, int(query.get("n", ["10"])[0]), float(query.get("interval", ["0.05"])[0])
                )
                continue
            elif path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
                await _websocket(reader, writer, headers)
                return
            else:
                if method in ("POST", "PUT", "PATCH"):
                    await _read_body(reader, headers)
                writer.write(SMALL_RESPONSE)
            if headers.get("connection", "").lower() == "close":
                await writer.drain()
                return
            if writer.transport.get_write_buffer_size() > 1 << 16:
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return
    finally:
        writer.close()


async def main() -> None:
    args = sys.argv[1:]
    port = int(args[0])
    sleep = float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0.0
    name = args[args.index("--name") + 1] if "--name" in args else "backend"
    if sleep:
        time.sleep(sleep)  # a slow start: nothing listens yet
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024, limit=1 << 20)
    directory = os.environ.get("TRIOPROXY_BENCH_DIR")
    if directory:
        line = f"{name} {os.getpid()} {T_SCRIPT:.6f} {time.time():.6f}\n".encode()
        fd = os.open(os.path.join(directory, "listen.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
