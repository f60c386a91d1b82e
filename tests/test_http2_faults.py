"""HTTP/2 inputs that Hypercorn's own HTTP/2 code did not foresee, against a real trioproxy.

Each runs over every way a client reaches HTTP/2 (TLS with ALPN ``h2``, cleartext with prior
knowledge, an ``h2c`` upgrade on the plain port), with the ``h2`` library on a raw socket so
that frames a well-behaved client would never send can be sent. After each: the bad stream got
RST_STREAM (or the connection a GOAWAY), another stream on the same connection still answers,
the process is alive, and nothing was logged as a failure of trioproxy.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
import wsproto.connection
import wsproto.events
from hyperframe.frame import DataFrame, PriorityFrame

from tests.conftest import BACKENDS, PY, ProxyProcess, echo_command, launch_trioproxy
from tests.test_tls import make_certificate
from trioproxy import transport
from trioproxy.listener import serve

pytestmark = pytest.mark.timeout(180)
TOKEN = "h2-faults-token"
AUTH = (b"authorization", f"token {TOKEN}".encode())
MODES = ["tls", "prior", "h2c"]


# A backend that accepts connections and never answers them.
SILENT = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
held = []
while True:
    held.append(server.accept())
"""


class Proxies:
    """One trioproxy on plain HTTP and one on TLS, shared by the tests of this module."""

    def __init__(self, plain: ProxyProcess, tls: ProxyProcess) -> None:
        self.plain = plain
        self.tls = tls

    def address(self, mode: str) -> tuple[str, int]:
        proxy = self.tls if mode == "tls" else self.plain
        host_port = proxy.base.split("//", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        return host, int(port)

    def process(self, mode: str) -> ProxyProcess:
        return self.tls if mode == "tls" else self.plain


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxies]:
    directory = tmp_path_factory.mktemp("h2")
    certfile, keyfile = make_certificate(directory)
    config = directory / "config.py"
    servers = {
        "echo": {"command": echo_command()},
        "ws": {"command": [PY, str(BACKENDS / "ws_echo.py"), "{port}"]},
        "silent": {"command": [PY, "-c", SILENT, "{port}"]},
    }
    config.write_text(f"c.ServerProxy.servers = {servers!r}\n")
    common = ["--port", "0", "--token", TOKEN, "--config", str(config)]
    env = {"JUPYTER_RUNTIME_DIR": str(directory / "runtime")}
    plain = launch_trioproxy(common, env=env)
    try:
        tls = launch_trioproxy([*common, "--certfile", str(certfile), "--keyfile", str(keyfile)], env=env)
    except BaseException:
        plain.kill()
        raise
    try:
        yield Proxies(plain, tls)
    finally:
        plain.kill()
        tls.kill()


# -- a raw HTTP/2 client -------------------------------------------------------------------


def client_config() -> h2.config.H2Configuration:
    # Validation off: these tests send what a careful client never would.
    return h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )


class H2Client:
    """An HTTP/2 client connection on a blocking socket, driven one frame batch at a time."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, connection: h2.connection.H2Connection) -> None:
        self.sock = sock
        self.connection = connection
        self.events: list[h2.events.Event] = []
        self.closed = False  # the server closed the connection (EOF or reset)

    @classmethod
    def open(cls, address: tuple[str, int], mode: str, window: int | None = None) -> H2Client:
        raw = socket.create_connection(address, timeout=30)
        sock: socket.socket | ssl.SSLSocket = raw
        if mode == "tls":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(raw)
            assert sock.selected_alpn_protocol() == "h2"
        connection = h2.connection.H2Connection(config=client_config())
        if window is not None:
            connection.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        client = cls(sock, connection)
        if mode == "h2c":
            settings = connection.initiate_upgrade_connection()
            host = f"{address[0]}:{address[1]}".encode()
            sock.sendall(
                b"GET /echo/upgraded HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: token " + TOKEN.encode()
                + b"\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: " + settings
                + b"\r\n\r\n"
            )  # fmt: skip
            head = client._read_http1_head()
            assert head.startswith(b"HTTP/1.1 101"), head
            # Stream 1 is the upgrade's request; its answer comes over HTTP/2.
            client.flush()
            client.wait_ended(1)
        else:
            connection.initiate_connection()
            client.flush()
        return client

    def _read_http1_head(self) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if rest:
            self._receive(rest)
        return head

    def flush(self) -> None:
        data = self.connection.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _receive(self, data: bytes) -> None:
        self.events.extend(self.connection.receive_data(data))
        self.flush()

    def read_once(self) -> bool:
        """Read what arrives next; False once the server has closed the connection."""
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            data = b""
        if not data:
            self.closed = True
            return False
        self._receive(data)
        return True

    def wait(self, done: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; events so far: {self.events}"
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            if not self.read_once():
                return

    def wait_ended(self, stream_id: int) -> None:
        self.wait(lambda: self.ended(stream_id))

    def wait_answered(self, stream_id: int) -> None:
        self.wait(lambda: self.status(stream_id) is not None or self.ended(stream_id))

    def request(self, path: bytes, method: bytes = b"GET", headers: list[tuple[bytes, bytes]] | None = None, *, end_stream: bool = True, auth: bool = True) -> int:
        stream_id = self.connection.get_next_available_stream_id()
        pseudo = [(b":method", method), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", path)]
        extra = [AUTH] if auth else []
        self.connection.send_headers(stream_id, pseudo + extra + (headers or []), end_stream=end_stream)
        self.flush()
        return stream_id

    def ended(self, stream_id: int) -> bool:
        return any(
            isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) and event.stream_id == stream_id
            for event in self.events
        ) or self.terminated() is not None

    def status(self, stream_id: int) -> int | None:
        for event in self.events:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                return int(dict(event.headers)[b":status"])
        return None

    def body(self, stream_id: int) -> bytes:
        return b"".join(
            event.data for event in self.events if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id
        )

    def reset_code(self, stream_id: int) -> int | None:
        for event in self.events:
            if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                return int(event.error_code)
        return None

    def terminated(self) -> h2.events.ConnectionTerminated | None:
        for event in self.events:
            if isinstance(event, h2.events.ConnectionTerminated):
                return event
        return None

    def get(self, path: bytes) -> tuple[int | None, bytes]:
        stream_id = self.request(path)
        self.wait(lambda: self.ended(stream_id))
        return self.status(stream_id), self.body(stream_id)

    def close(self) -> None:
        self.sock.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_until(condition: Callable[[], bool], timeout: float = 30, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def assert_healthy(proxies: Proxies, mode: str, logged_before: int) -> None:
    """The proxy is alive, answers a new connection, and logged no failure of its own."""
    process = proxies.process(mode)
    assert process.process.poll() is None, process.output()
    client = H2Client.open(proxies.address(mode), "tls" if mode == "tls" else "prior")
    try:
        status, _ = client.get(b"/echo/after")
        assert status == 200
    finally:
        client.close()
    # (Backends' output is logged as trioproxy.server.<name>: theirs, not trioproxy's.)
    new = "".join(line for line in process.lines[logged_before:] if " trioproxy.server." not in line)
    assert "Traceback" not in new and "failed" not in new, new


# -- the faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_data_after_the_response_ended_resets_that_stream_only(proxies: Proxies, mode: str) -> None:
    logged = len(proxies.process(mode).lines)
    client = H2Client.open(proxies.address(mode), mode)
    try:
        # No credentials: refused before the body is read, so the response ends first.
        stream_id = client.request(b"/echo/upload", b"POST", end_stream=False, auth=False)
        client.wait_ended(stream_id)
        assert client.status(stream_id) == 403
        for _ in range(3):
            client.send_raw(DataFrame(stream_id, data=b"late body", flags=[]).serialize())
        client.send_raw(DataFrame(stream_id, data=b"end", flags=["END_STREAM"]).serialize())
        # The connection goes on.
        status, body = client.get(b"/echo/second")
        assert status == 200 and b'"/second"' in body
    finally:
        client.close()
    assert_healthy(proxies, mode, logged)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"G\xc3\xa9T"), (b":path", b"/echo/x")],
        [(b":method", b"GET"), (b":path", b"/echo/caf\xc3\xa9")],
        [(b":method", b"GET"), (b":path", b"/echo/\xff")],
        [(b":method", b"GET"), (b":path", b"/echo/a b")],
        [(b":method", b"G T"), (b":path", b"/echo/x")],
    ],
    ids=["method-utf8", "path-utf8", "path-latin1", "path-space", "method-space"],
)
def test_a_malformed_pseudo_header_resets_that_stream(proxies: Proxies, mode: str, headers: list[tuple[bytes, bytes]]) -> None:
    logged = len(proxies.process(mode).lines)
    client = H2Client.open(proxies.address(mode), mode)
    try:
        stream_id = client.connection.get_next_available_stream_id()
        client.connection.send_headers(
            stream_id, [*headers, (b":scheme", b"https"), (b":authority", b"localhost"), AUTH], end_stream=True
        )
        client.flush()
        client.wait_ended(stream_id)
        assert client.reset_code(stream_id) == h2.errors.ErrorCodes.PROTOCOL_ERROR
        status, _ = client.get(b"/echo/second")
        assert status == 200
    finally:
        client.close()
    assert_healthy(proxies, mode, logged)


@pytest.mark.parametrize("mode", MODES)
def test_priority_for_many_idle_streams_is_ignored(proxies: Proxies, mode: str) -> None:
    logged = len(proxies.process(mode).lines)
    client = H2Client.open(proxies.address(mode), mode)
    try:
        frames = b"".join(
            PriorityFrame(stream_id, depends_on=stream_id + 2, stream_weight=16).serialize()
            for stream_id in range(101, 101 + 2 * 1500, 2)
        )
        client.send_raw(frames)
        # Later stream ids than every prioritised one: h2 would refuse lower ones as reused.
        client.connection.highest_outbound_stream_id = 101 + 2 * 1500
        status, _ = client.get(b"/echo/after-priorities")
        assert status == 200
    finally:
        client.close()
    assert_healthy(proxies, mode, logged)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b":method", b"CONNECT"), (b":authority", b"example.org:443")], 405),
        ([(b":method", b"CONNECT"), (b":protocol", b"h3-tunnel"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/ws/echo")], 501),
    ],
    ids=["plain-connect", "unknown-protocol"],
)
def test_connect_other_than_a_websocket_is_answered(
    proxies: Proxies, mode: str, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    logged = len(proxies.process(mode).lines)
    client = H2Client.open(proxies.address(mode), mode)
    try:
        stream_id = client.connection.get_next_available_stream_id()
        client.connection.send_headers(stream_id, [*headers, AUTH, (b"sec-websocket-version", b"13")])
        client.flush()
        client.wait_ended(stream_id)
        assert client.status(stream_id) == status
        assert client.get(b"/echo/second")[0] == 200
    finally:
        client.close()
    assert_healthy(proxies, mode, logged)


@pytest.mark.parametrize("mode", MODES)
def test_a_websocket_connect_without_a_path_ends_that_connection_with_goaway(proxies: Proxies, mode: str) -> None:
    # h2 takes a malformed extended CONNECT (RFC 8441 §4) for a connection error.
    logged = len(proxies.process(mode).lines)
    client = H2Client.open(proxies.address(mode), mode)
    try:
        stream_id = client.connection.get_next_available_stream_id()
        headers = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":authority", b"x")]
        client.connection.send_headers(stream_id, [*headers, AUTH, (b"sec-websocket-version", b"13")])
        client.flush()
        client.wait(lambda: client.closed)
        terminated = client.terminated()
        assert terminated is not None and terminated.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    finally:
        client.close()
    assert_healthy(proxies, mode, logged)


@pytest.mark.parametrize(
    "settings",
    [b"%%%not base64", b"AAMAAABkAAQAoAAAAAIAAAAAAA", b"AAIAAAAC", b"A"],
    ids=["not-base64", "not-whole-settings", "enable-push-2", "one-character"],
)
def test_an_h2c_upgrade_with_invalid_settings_gets_400(proxies: Proxies, settings: bytes) -> None:
    logged = len(proxies.plain.lines)
    address = proxies.address("prior")
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(
            b"GET /echo/up HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"HTTP2-Settings" in answer
    assert_healthy(proxies, "prior", logged)


def test_an_h2c_upgrade_with_a_valid_empty_settings_header_is_served(proxies: Proxies) -> None:
    # An empty SETTINGS payload is valid base64url of zero settings: the upgrade goes ahead.
    address = proxies.address("prior")
    connection = h2.connection.H2Connection(config=client_config())
    connection.initiate_upgrade_connection()
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(
            b"GET /echo/up HTTP/1.1\r\nHost: localhost\r\nAuthorization: token " + TOKEN.encode()
            + b"\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: "
            + base64.urlsafe_b64encode(b"").rstrip(b"=") + b"\r\n\r\n"
        )  # fmt: skip
        client = H2Client(sock, connection)
        head = client._read_http1_head()
        assert head.startswith(b"HTTP/1.1 101")
        client.flush()
        client.wait_ended(1)
        assert client.status(1) == 200 and b'"/up"' in client.body(1)


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_leaves_mid_stream_ends_its_connection_alone(proxies: Proxies, mode: str) -> None:
    logged = len(proxies.process(mode).lines)
    for leave in ("close", "reset"):
        for when in range(4):
            client = H2Client.open(proxies.address(mode), mode)
            stream_id = client.request(b"/echo/bytes?size=50000000")
            other = client.request(b"/echo/upload", b"POST", end_stream=False)
            client.connection.send_data(other, b"x" * 1000)
            client.flush()
            client.wait_answered(stream_id)
            client.sock.settimeout(0.5)
            for _ in range(when):  # (at most the first 64 KiB come: the window is never widened)
                try:
                    client.read_once()
                except TimeoutError:
                    break
            if leave == "reset":
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.close()
    assert_healthy(proxies, mode, logged)


# -- what refused and abandoned connections leave behind ----------------------------------


def websocket_connect(client: H2Client, path: bytes, auth: bool) -> int:
    stream_id = client.connection.get_next_available_stream_id()
    headers = [
        (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
        (b":authority", b"localhost"), (b":path", path), (b"sec-websocket-version", b"13"),
    ]  # fmt: skip
    client.connection.send_headers(stream_id, headers + ([AUTH] if auth else []))
    client.flush()
    return stream_id


def leave(client: H2Client, how: str) -> None:
    if how == "reset":
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()


@pytest.mark.parametrize("mode", ["tls", "prior"])
@pytest.mark.parametrize("request_kind", ["websocket", "post"])
def test_refused_requests_leave_no_socket_open(proxies: Proxies, mode: str, request_kind: str) -> None:
    pid = proxies.process(mode).process.pid
    logged = len(proxies.process(mode).lines)
    baseline = open_fds(pid)
    for index in range(100):
        client = H2Client.open(proxies.address(mode), mode)
        if request_kind == "websocket":
            stream_id = websocket_connect(client, b"/ws/echo", auth=False)
        else:
            stream_id = client.request(b"/echo/upload", b"POST", end_stream=False, auth=False)
            client.connection.send_data(stream_id, b"x" * 1000)
            client.flush()
        client.wait_ended(stream_id)
        assert client.status(stream_id) == 403
        leave(client, "reset" if index % 2 else "close")
    # Generous: the proxy only has to notice each client has gone.
    assert wait_until(lambda: open_fds(pid) <= baseline + 3, timeout=30), (baseline, open_fds(pid))
    assert_healthy(proxies, mode, logged)


# -- backpressure ----------------------------------------------------------------------------

MiB = 1024 * 1024


def hold_without_reading(client: H2Client, seconds: float) -> None:
    """Read the socket (so TCP never pushes back) for ``seconds`` but never widen a window."""
    deadline = time.monotonic() + seconds
    client.sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if not client.read_once():
                return
        except TimeoutError:
            continue


@pytest.mark.parametrize("mode", ["tls", "prior"])
@pytest.mark.parametrize("kind", ["download", "websocket"])
def test_a_client_that_stops_reading_makes_the_backend_wait(proxies: Proxies, mode: str, kind: str) -> None:
    process = proxies.process(mode)
    pid = process.process.pid
    client = H2Client.open(proxies.address(mode), mode, window=16384)
    try:
        assert client.get(b"/echo/warm-up")[0] == 200
        before = rss(pid)
        if kind == "download":
            stream_id = client.request(b"/echo/bytes?size=20000000000")  # 20 GB, endless enough
        else:
            stream_id = websocket_connect(client, b"/ws/flood?size=65536", auth=True)
        client.wait_answered(stream_id)
        assert client.status(stream_id) == 200
        hold_without_reading(client, 4)
        grown = rss(pid) - before
        received = len(client.body(stream_id))
        # Only the stream's window came (16 KiB); the rest waits in bounded buffers.
        assert received <= 16384, received
        assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
        if kind == "websocket":
            # The backend is made to wait: it sends no more messages once the buffers are full.
            def flooded() -> int:
                return sum("flooded" in line for line in process.lines)

            def settled() -> bool:
                count = flooded()
                hold_without_reading(client, 1)
                return flooded() == count

            assert wait_until(settled, timeout=30, interval=0)
            assert rss(pid) - before < 64 * MiB
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["tls", "prior"])
def test_a_reset_download_stops_the_backend_and_the_connection_goes_on(
    proxies: Proxies, mode: str, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    client = H2Client.open(proxies.address(mode), mode)
    try:
        # Endless (a 1 ms pause per 64 KiB): only a relay that lets go of the backend ends it.
        stream_id = client.request(b"/echo/bytes?size=200000000000&report=" + str(report).encode())
        client.wait_answered(stream_id)
        assert client.status(stream_id) == 200
        client.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        # What came before the reset was taken: as a client that read it, give its share of the
        # connection's window back (a slow machine's first read may hold the whole window, and
        # without this the next answer could never be sent; h2 acknowledges what comes after).
        client.connection.acknowledge_received_data(len(client.body(stream_id)), stream_id)
        client.flush()
        assert wait_until(lambda: report.exists() and report.read_text() == "broken", timeout=30)
        assert client.get(b"/echo/same-connection")[0] == 200
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["tls", "prior"])
def test_a_websocket_over_http2_echoes_and_closes_cleanly(proxies: Proxies, mode: str) -> None:
    client = H2Client.open(proxies.address(mode), mode)
    try:
        stream_id = websocket_connect(client, b"/ws/echo", auth=True)
        client.wait_answered(stream_id)
        assert client.status(stream_id) == 200
        ws = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
        client.connection.send_data(stream_id, ws.send(wsproto.events.TextMessage("over h2")))
        client.flush()
        received: list[wsproto.events.Event] = []

        def take() -> list[wsproto.events.Event]:
            ws.receive_data(client.body(stream_id)[taken[0]:])
            taken[0] = len(client.body(stream_id))
            received.extend(ws.events())
            return received

        taken = [0]
        client.wait(lambda: any(isinstance(event, wsproto.events.TextMessage) for event in take()))
        assert [event.data for event in received if isinstance(event, wsproto.events.TextMessage)] == ["over h2"]
        client.connection.send_data(stream_id, ws.send(wsproto.events.CloseConnection(1000, "bye")))
        client.flush()
        # The close is answered, then the stream ends (not reset), and the connection goes on.
        client.wait_ended(stream_id)
        take()
        assert any(isinstance(event, wsproto.events.CloseConnection) for event in received)
        assert client.reset_code(stream_id) is None
        assert client.get(b"/echo/after-websocket")[0] == 200
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["tls", "prior"])
def test_a_client_that_leaves_during_the_backend_handshake_is_let_go(proxies: Proxies, mode: str) -> None:
    pid = proxies.process(mode).process.pid
    client = H2Client.open(proxies.address(mode), mode)
    websocket_connect(client, b"/silent/ws", auth=True)  # starts the silent server
    time.sleep(2)
    client.close()

    def steady() -> bool:
        count = open_fds(pid)
        time.sleep(1)
        return open_fds(pid) == count

    assert wait_until(steady, timeout=30, interval=0)
    baseline = open_fds(pid)
    for index in range(10):
        client = H2Client.open(proxies.address(mode), mode)
        websocket_connect(client, b"/silent/ws", auth=True)
        time.sleep(0.3)  # the relay is waiting for the backend's 101
        leave(client, "reset" if index % 2 else "close")
    # Well within the 30 s handshake timeout: the client's leaving ends the wait.
    assert wait_until(lambda: open_fds(pid) <= baseline + 3, timeout=10), (baseline, open_fds(pid))


@pytest.mark.parametrize("mode", MODES)
def test_rst_stream_floods_and_goaway(proxies: Proxies, mode: str) -> None:
    logged = len(proxies.process(mode).lines)
    client = H2Client.open(proxies.address(mode), mode)
    try:
        # 950 streams: just under keep_alive_max_requests (1000), after which Hypercorn sends
        # GOAWAY(NO_ERROR) and takes no more requests on the connection.
        for _ in range(190):
            streams = [client.request(b"/echo/bytes?size=100000") for _ in range(5)]
            for stream_id in streams:
                client.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            client.flush()
        assert client.get(b"/echo/after-resets")[0] == 200
        # A GOAWAY with a stream under way: the connection ends, the proxy goes on.
        client.request(b"/echo/bytes?size=10000000")
        client.connection.close_connection()
        client.flush()
    finally:
        client.close()
    assert_healthy(proxies, mode, logged)


# -- what nobody foresaw: the boundary inside HTTP/2 (in-process, with a fault injected) -----


async def _answer_ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _in_process(nursery: trio.Nursery) -> tuple[str, int]:
    from hypercorn.config import Config

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    binds = await nursery.start(serve, _answer_ok, config)
    host, port = binds[0].split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def _terminated_by_boom(address: tuple[str, int]) -> h2.events.ConnectionTerminated | None:
    client = H2Client.open(address, "prior")
    try:
        client.request(b"/boom")
        client.wait(lambda: client.closed or client.terminated() is not None)
        return client.terminated()
    finally:
        client.close()


def _answers(address: tuple[str, int]) -> int | None:
    client = H2Client.open(address, "prior")
    try:
        return client.get(b"/fine")[0]
    finally:
        client.close()


@pytest.mark.parametrize("where", ["receiving", "sending"])
async def test_an_unforeseen_error_ends_that_connection_with_goaway_logged_once(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    if where == "receiving":
        checked = transport.refusal

        def refusal(headers: list[tuple[bytes, bytes]]) -> transport.Refusal | None:
            if (b":path", b"/boom") in headers:
                raise RuntimeError("injected")
            return checked(headers)

        monkeypatch.setattr(transport, "refusal", refusal)
    else:
        sending = transport.H2._send_data

        async def send_data(self: transport.H2, stream_id: int) -> None:
            if stream_id == 1:  # the first stream of a connection: /boom
                raise RuntimeError("injected")
            await sending(self, stream_id)

        monkeypatch.setattr(transport.H2, "_send_data", send_data)
    address = await _in_process(nursery)
    terminated = await trio.to_thread.run_sync(_terminated_by_boom, address)
    assert terminated is not None and terminated.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
    if where == "sending":
        monkeypatch.setattr(transport.H2, "_send_data", sending)
    assert await trio.to_thread.run_sync(_answers, address) == 200
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].name == "trioproxy.transport" and errors[0].exc_info is not None
    assert "unexpected error" in errors[0].getMessage()
