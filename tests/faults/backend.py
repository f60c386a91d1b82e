"""A backend in the test's process that records exactly what reached it and misbehaves on command.

trioproxy relays to it as a server without a command (``{"port": N}``). Each connection runs in a
thread of its own with blocking sockets. What it does is chosen by the first segment of the
request path (the proxy strips its ``/<name>`` prefix), or, before any byte is read, by
:attr:`FaultBackend.on_accept`:

  /ok                  200 with a short body (any other path too); WebSocket upgrades are echoed
  /reset-after-head    read the head, then reset
  /close-after-head    read the head, then close
  /ws-101-reset        answer 101, then reset
  /ws-101-close        answer 101, then close
  /ws-mid-frame        answer 101 and half a frame, then reset
  /ws-garbage          answer garbage instead of a 101, then close
  /ws-flood            answer 101, then send binary frames for as long as they are taken
  /flood               answer 200 chunked, then send chunks for as long as they are taken
  /big-then-close      answer a 64 MiB body as fast as it is taken, then close (mid-body if the
                       client stopped reading: the send times out)
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from .client import reset, ws_accept_key

FLOOD_LIMIT = 30.0  # seconds a flood lasts at most, whoever reads it
CHUNK = b"f" * 65536


@dataclass
class FaultBackend:
    on_accept: str | None = None  # "reset" or "close": before reading anything
    port: int = 0
    raw: list[bytes] = field(default_factory=list)  # what arrived, per connection
    sent: dict[str, int] = field(default_factory=dict)  # bytes flooded, per mode
    open: int = 0
    flooding: int = 0  # floods under way now

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="fault-backend", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self.open += 1
            number = len(self.raw)
            self.raw.append(b"")
        try:
            sock.settimeout(10)
            if self.on_accept == "reset":
                reset(sock)
                return
            if self.on_accept == "close":
                sock.close()
                return
            self._converse(sock, number)
        except OSError:
            pass  # the proxy went away: that is what these tests provoke
        finally:
            with self._lock:
                self.open -= 1
            sock.close()

    def _read_head(self, sock: socket.socket, number: int, buffer: bytearray) -> bytes | None:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buffer.extend(chunk)
            self.raw[number] += chunk
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        buffer[:] = rest
        return head

    def _converse(self, sock: socket.socket, number: int) -> None:
        buffer = bytearray()
        while True:
            head = self._read_head(sock, number, buffer)
            if head is None:
                return
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1].decode("latin-1") if len(lines[0].split(b" ")) > 1 else "/"
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            mode = target.split("?")[0].strip("/").split("/")[0]
            length = int(headers.get(b"content-length", b"0") or 0)
            while len(buffer) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer.extend(chunk)
                self.raw[number] += chunk
            del buffer[:length]
            upgrade = headers.get(b"upgrade", b"").lower() == b"websocket"
            key = headers.get(b"sec-websocket-key", b"").decode("latin-1")
            if not self._answer(sock, mode, upgrade, key, buffer):
                return

    def _switch(self, sock: socket.socket, key: str) -> None:
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + ws_accept_key(key).encode() + b"\r\n\r\n"
        )

    def _answer(self, sock: socket.socket, mode: str, upgrade: bool, key: str, buffer: bytearray) -> bool:
        """Answer one request; False when the connection is over."""
        if mode == "reset-after-head":
            reset(sock)
            return False
        if mode == "close-after-head":
            return False
        if mode == "ws-garbage":
            sock.sendall(b"\x00\xff garbage, not a status line \x81\x05hello\r\n\r\n")
            return False
        if mode in ("ws-101-reset", "ws-101-close", "ws-mid-frame"):
            self._switch(sock, key)
            if mode == "ws-mid-frame":
                sock.sendall(b"\x82\x7e\x10\x00" + b"x" * 100)  # a 4 KiB frame cut after 100 bytes
                time.sleep(0.005)
            if mode != "ws-101-close":
                reset(sock)
            return False
        if mode in ("flood", "ws-flood", "big-then-close"):
            self._flood(sock, mode, key)
            return False
        if upgrade:
            self._switch(sock, key)
            self._echo_websocket(sock, buffer)
            return False
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
        return True

    def _flood(self, sock: socket.socket, mode: str, key: str) -> None:
        with self._lock:
            self.flooding += 1
        try:
            self._flood_until_stopped(sock, mode, key)
        finally:
            with self._lock:
                self.flooding -= 1

    def _flood_until_stopped(self, sock: socket.socket, mode: str, key: str) -> None:
        if mode == "ws-flood":
            self._switch(sock, key)
            piece = struct.pack("!BBH", 0x82, 126, 60000) + CHUNK[:60000]
        elif mode == "flood":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK)
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1024 * len(CHUNK)))
            piece = CHUNK
        # A send that waits this long: nobody is reading; a flood keeps trying, the big body closes.
        sock.settimeout(0.3 if mode == "big-then-close" else 2)
        deadline = time.monotonic() + FLOOD_LIMIT
        count = 1024 if mode == "big-then-close" else None
        while time.monotonic() < deadline and not self._stopping.is_set() and count != 0:
            try:
                sock.sendall(piece)
            except (TimeoutError, socket.timeout):
                if mode == "big-then-close":
                    return  # close while the client is not reading
                continue  # keep pushing: the flood lasts until the proxy closes or the limit
            with self._lock:
                self.sent[mode] = self.sent.get(mode, 0) + len(piece)
            if count is not None:
                count -= 1

    @staticmethod
    def _refuse(sock: socket.socket, close: bytes) -> None:
        """Send a close frame and wait (a little) for the peer's before closing, as RFC 6455 asks."""
        sock.sendall(close)
        sock.settimeout(2)
        with contextlib.suppress(OSError):
            sock.recv(65536)  # the peer's close frame (or its end)

    def _echo_websocket(self, sock: socket.socket, buffer: bytearray) -> None:
        while True:
            while len(buffer) < 2:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer.extend(chunk)
            opcode, size = buffer[0] & 0x0F, buffer[1] & 0x7F
            offset = 2
            if size == 126:
                offset = 4
            elif size == 127:
                offset = 10
            while len(buffer) < offset + 4:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer.extend(chunk)
            if size == 126:
                size = struct.unpack("!H", buffer[2:4])[0]
            elif size == 127:
                size = struct.unpack("!Q", buffer[2:10])[0]
            masked = bool(buffer[1] & 0x80)
            fin, rsv = bool(buffer[0] & 0x80), buffer[0] & 0x70
            # Only what the checks send is echoed; anything else is refused with 1002 at once, as
            # a strict backend would (a lenient one would leave the tunnel open: nothing to see).
            if not masked or rsv or not fin or opcode not in (0x1, 0x2, 0x8) or size > 125:
                self._refuse(sock, b"\x88\x02\x03\xea")
                return
            start = offset + (4 if masked else 0)
            while len(buffer) < start + size:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer.extend(chunk)
            payload = bytes(buffer[start : start + size])
            if masked:
                key = buffer[offset : offset + 4]
                payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            del buffer[: start + size]
            if opcode == 0x8:
                valid = size == 0 or (size >= 2 and struct.unpack("!H", payload[:2])[0] in (1000, 1001))
                sock.sendall(b"\x88\x02\x03\xe8" if valid else b"\x88\x02\x03\xea")
                return  # the client's close came first: the handshake is complete
            if opcode == 0x1:
                try:
                    payload.decode()
                except UnicodeDecodeError:
                    self._refuse(sock, b"\x88\x02\x03\xef")  # 1007
                    return
            header = struct.pack("!BB", 0x80 | opcode, size) if size < 126 else struct.pack("!BBH", 0x80 | opcode, 126, size)
            sock.sendall(header + payload)
