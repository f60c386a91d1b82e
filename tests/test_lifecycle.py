"""trioproxy's own lifetime, run as a real command: closed connections let go of at once, a
graceful shutdown on SIGTERM, logging that never blocks on a stalled stderr."""

from __future__ import annotations

import base64
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .conftest import BACKENDS, PY, ProxyProcess, echo_command, launch_trioproxy, pid_alive

TWO_SERVERS = f"""\
c = get_config()  # noqa
c.ServerProxy.servers = {{
    "echo": {{"command": {echo_command()!r}}},
    "ws": {{"command": [{PY!r}, {str(BACKENDS / "ws_echo.py")!r}, "{{port}}"]}},
}}
"""


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def address(proxy: ProxyProcess) -> tuple[str, int]:
    host, port = proxy.base.split("//")[1].rstrip("/").split(":")
    return host, int(port)


def keep_alive_client(proxy: ProxyProcess, path: str) -> socket.socket:
    """A connection that made one request and stays open, idle."""
    sock = socket.create_connection(address(proxy), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: token t\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1])
    while len(body) < length:
        body += sock.recv(65536)
    return sock


def open_websocket(proxy: ProxyProcess, path: str) -> socket.socket:
    """A WebSocket, by hand, so that the test sees exactly what goes over the wire."""
    sock = socket.create_connection(address(proxy), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: token t\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 101"), received
    return sock


def read_close_code(sock: socket.socket) -> int:
    """Read server frames until a close frame; return its code."""
    buffer = b""
    while True:
        while len(buffer) < 2:
            chunk = sock.recv(65536)
            assert chunk, "the connection ended without a close frame"
            buffer += chunk
        opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
        header = 2 + {126: 2, 127: 8}.get(length, 0)
        while len(buffer) < header:
            buffer += sock.recv(65536)
        if length == 126:
            length = struct.unpack("!H", buffer[2:4])[0]
        elif length == 127:
            length = struct.unpack("!Q", buffer[2:10])[0]
        while len(buffer) < header + length:
            buffer += sock.recv(65536)
        payload, buffer = buffer[header : header + length], buffer[header + length :]
        if opcode == 0x8:
            return int(struct.unpack("!H", payload[:2])[0])


def wait_until(predicate, timeout: float) -> float:
    """Wait for ``predicate``; return how long it took."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - began


def tcp_sockets(pid: int) -> list[tuple[int, str]]:
    """(local port, state) of each TCP socket the process holds; states as /proc has them
    ("0A": listening, "01": established, "08": close-wait)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] in inodes:
                    found.append((int(fields[1].rsplit(":", 1)[1], 16), fields[3]))
    return found


def test_closed_client_connections_are_released_within_a_second(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    (tmp_path / "cfg.py").write_text(TWO_SERVERS)
    proxy = launch_trioproxy(["--config", str(tmp_path / "cfg.py"), "--port", "0", "--token", "t"])
    proxy_processes.append(proxy)
    pid, port = proxy.process.pid, address(proxy)[1]

    def clients_held() -> int:
        return sum(1 for local, state in tcp_sockets(pid) if local == port and state != "0A")

    def fds_but_backend_connections() -> int:
        # Connections to the backends stay pooled (pool_idle_timeout), one per request that
        # was under way at once: they are not the clients'.
        return fd_count(pid) - sum(1 for local, _ in tcp_sockets(pid) if local != port)

    # Start both servers, then count.
    keep_alive_client(proxy, "/echo/warm").close()
    open_websocket(proxy, "/ws/echo").close()
    time.sleep(0.5)
    baseline = fds_but_backend_connections()

    # Opened concurrently, as a browser or a load test would: requests overlap.
    with ThreadPoolExecutor(16) as pool:
        clients = list(pool.map(lambda i: keep_alive_client(proxy, f"/echo/{i}"), range(150)))
        websockets = list(pool.map(lambda i: open_websocket(proxy, f"/ws/echo?{i}"), range(30)))
    assert clients_held() == 180
    for sock in clients + websockets:
        sock.close()
    # Hypercorn's keep-alive timer (75 s) would hold the idle ones.
    took = wait_until(lambda: clients_held() == 0 and fds_but_backend_connections() == baseline, timeout=5)
    assert took < 1.0, f"{clients_held()} client connections {took:.2f} s after closing"
    assert proxy.stop() == 0


def test_sigterm_lets_requests_under_way_finish_then_stops_the_servers(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    (tmp_path / "cfg.py").write_text(TWO_SERVERS)
    proxy = launch_trioproxy(["--config", str(tmp_path / "cfg.py"), "--port", "0", "--token", "t"])
    proxy_processes.append(proxy)
    auth = {"Authorization": "token t"}
    websocket = open_websocket(proxy, "/ws/echo")
    assert httpx.get(proxy.base + "echo/", headers=auth).status_code == 200
    status = httpx.get(proxy.base + "server-proxy/api/servers", headers=auth).json()["servers"]
    pids = [server["pid"] for server in status]
    assert len(pids) == 2 and all(pids)

    answers: list[httpx.Response] = []
    slow = threading.Thread(
        target=lambda: answers.append(httpx.get(proxy.base + "echo/slow?delay=1.5", headers=auth, timeout=20))
    )
    slow.start()
    time.sleep(0.5)  # the request has reached the backend
    signalled = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)

    # The WebSocket is told the server is going away; new connections are refused.
    assert read_close_code(websocket) == 1001
    websocket.close()
    wait_until(lambda: _refused(proxy), timeout=2)
    # The request under way is answered in full, by a backend still running.
    slow.join(10)
    assert answers and answers[0].status_code == 200 and answers[0].json() == {"slow": True}
    # Only then do the servers stop, and trioproxy exits 0.
    assert proxy.process.wait(15) == 0
    assert time.monotonic() - signalled >= 1.0
    assert not any(pid_alive(pid) for pid in pids)
    output = proxy.output()
    assert "closed /echo 1001" in output  # the backend heard "going away" too


def _refused(proxy: ProxyProcess) -> bool:
    try:
        socket.create_connection(address(proxy), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


CHATTY_LINES = 5000


def test_a_stalled_stderr_never_blocks_the_proxy(tmp_path: Path) -> None:
    # A server that prints 5000 lines (500 kB, far more than a pipe holds) as it starts:
    # trioproxy logs each one to its stderr, which nobody reads for now.
    chatty = (
        "import subprocess, sys\n"
        f"for i in range({CHATTY_LINES}): print(f'chatty line {{i:05d}} ' + 'x' * 80)\n"
        "sys.stdout.flush()\n"
        f"subprocess.run([sys.executable, {str(BACKENDS / 'echo.py')!r}, sys.argv[1]])\n"
    )
    (tmp_path / "chatty.py").write_text(chatty)
    (tmp_path / "cfg.py").write_text(
        "c = get_config()  # noqa\n"
        f"c.ServerProxy.servers = {{'chatty': {{'command': [{PY!r}, {str(tmp_path / 'chatty.py')!r}, '{{port}}']}}}}\n"
    )
    process = subprocess.Popen(
        [PY, "-m", "trioproxy", "--config", str(tmp_path / "cfg.py"), "--port", "0", "--token", "t"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        assert "trioproxy is serving" in line, line
        base = line.split(" at: ")[1].split("?")[0]
        auth = {"Authorization": "token t"}
        for i in range(20):
            response = httpx.get(base + f"chatty/{i}", headers=auth, timeout=5)
            assert response.status_code == 200, response.text
        # Now read stderr: on a clean exit every line is there, in order.
        err: list[str] = []
        reader = threading.Thread(target=lambda: err.append(process.stderr.read()))  # type: ignore[union-attr]
        reader.start()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        reader.join(10)
        lines = [text for text in err[0].splitlines() if "chatty line" in text]
        assert len(lines) == CHATTY_LINES
        assert lines == sorted(lines)
        assert err[0].rstrip().endswith("stopped")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]


def test_a_start_under_way_ends_with_its_server_at_shutdown(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    # A server that takes long to listen; the API's start runs in its supervisor, so a
    # shutdown ends it at once (a task of the web framework's would hold the exit up).
    (tmp_path / "cfg.py").write_text(
        "c = get_config()  # noqa\n"
        "c.ServerProxy.servers = {'slow': {'command': ['sleep', '60'], 'timeout': 120}}\n"
    )
    proxy = launch_trioproxy(["--config", str(tmp_path / "cfg.py"), "--port", "0", "--token", "t"])
    proxy_processes.append(proxy)
    auth = {"Authorization": "token t"}
    answer = httpx.post(proxy.base + "server-proxy/api/servers/slow/start?wait=0", headers=auth)
    assert answer.status_code == 202 and answer.json()["state"] == "starting"
    wait_until(lambda: httpx.get(proxy.base + "server-proxy/api/servers/slow", headers=auth).json()["pid"], 5)
    pid = httpx.get(proxy.base + "server-proxy/api/servers/slow", headers=auth).json()["pid"]
    signalled = time.monotonic()
    assert proxy.stop() == 0
    assert time.monotonic() - signalled < 3
    assert not pid_alive(pid)
