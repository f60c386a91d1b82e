"""The trioproxy command, run as users run it: real process, real config files, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .conftest import PY, ProxyProcess, echo_command, free_port, launch_trioproxy, pid_alive

JSP_CONFIG = """\
c = get_config()  # noqa
c.ServerProxy.servers = {
    "web": {"command": ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]},
}
"""


def servers(proxy: ProxyProcess, token: str) -> dict:
    base = proxy.url.split("?")[0]
    response = httpx.get(base + "server-proxy/api/servers", headers={"Authorization": f"token {token}"})
    return {s["name"]: s for s in response.json()["servers"]}


def wait_until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_jupyter_server_proxy_config_serves_lazily_and_restarts(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    (tmp_path / "cfg.py").write_text(JSP_CONFIG)
    (tmp_path / "hello.txt").write_text("hello from http.server\n")
    port = free_port()
    proxy = launch_trioproxy(
        ["--config", "cfg.py", "--port", str(port), "--token", "secret123"], cwd=str(tmp_path)
    )
    proxy_processes.append(proxy)
    # A token the user chose is not shown (as in Jupyter Server).
    assert proxy.url == f"http://127.0.0.1:{port}/?token=..."
    assert "secret123" not in proxy.output()
    assert servers(proxy, "secret123")["web"]["state"] == "stopped"

    url = f"http://127.0.0.1:{port}/web/hello.txt?token=secret123"
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.text == "hello from http.server\n"

    pid = servers(proxy, "secret123")["web"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid))
    again = httpx.get(url)
    assert again.status_code == 200
    status = servers(proxy, "secret123")["web"]
    assert status["pid"] != pid and status["restarts"] == 1
    assert proxy.stop() == 0


def test_json_config(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = {"ServerProxy": {"servers": {"echo": {"command": echo_command()}}}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    proxy = launch_trioproxy(["--config", str(tmp_path / "cfg.json"), "--port", "0", "--token", "t"])
    proxy_processes.append(proxy)
    base = proxy.url.split("?")[0]
    response = httpx.get(base + "echo/x?y=1", headers={"Authorization": "token t"})
    assert response.json()["target"] == "/x?y=1"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "c.ServerProxy.strict_config = True\nc.ServerProxy.servers = {'web': {'comand': ['x']}}",
            "server 'web': unknown option 'comand'",
        ),
        ("c.ServerProxy.servers = {'web': 'python3 -m http.server'}", "server 'web': expected a dict of options"),
        ("c.ServerProxy.servers = {", "cannot load"),
    ],
)
def test_config_errors_stop_start_up_with_one_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "cfg.py").write_text(content)
    result = subprocess.run(
        [PY, "-m", "trioproxy", "--config", str(tmp_path / "cfg.py"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [PY, "-m", "trioproxy", "--config", str(tmp_path / "nope.py")], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "config file not found" in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [PY, "-m", "trioproxy", "--port", str(port)], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in result.stderr
    assert "--port" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("trioproxy: cannot listen on")


def test_help_lists_the_options() -> None:
    result = subprocess.run([PY, "-m", "trioproxy", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in ("--config", "--port", "--ip", "--base-url", "--token", "--no-auth", "--generate-config"):
        assert option in result.stdout


def test_generate_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [PY, "-m", "trioproxy", "--generate-config"], capture_output=True, text=True, cwd=tmp_path, timeout=30
    )
    assert result.returncode == 0
    text = (tmp_path / "trioproxy_config.py").read_text()
    assert "c.ServerProxy.servers" in text and "c.ServerProcess.timeout" in text
    again = subprocess.run(
        [PY, "-m", "trioproxy", "--generate-config"], capture_output=True, text=True, cwd=tmp_path, timeout=30
    )
    assert again.returncode == 2 and "not overwriting" in again.stderr


def test_token_from_environment_and_generated(proxy_processes: list[ProxyProcess]) -> None:
    proxy = launch_trioproxy(["--port", "0"], env={"JUPYTER_TOKEN": "from-env"})
    proxy_processes.append(proxy)
    assert proxy.url.endswith("?token=...")
    assert "from-env" not in proxy.output()
    assert httpx.get(proxy.base + "server-proxy/api/servers?token=from-env").status_code == 200
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_TOKEN"}
    generated = launch_trioproxy(["--port", "0"], env=env)
    proxy_processes.append(generated)
    token = generated.url.split("?token=")[1]
    assert len(token) >= 32  # at least 128 bits in hex
    base = generated.url.split("?")[0]
    assert httpx.get(base + "server-proxy/api/servers").status_code == 403
    assert httpx.get(base + f"server-proxy/api/servers?token={token}").status_code == 200


def test_default_serves_the_current_directory(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    (tmp_path / "notes.txt").write_text("my notes")
    proxy = launch_trioproxy(["--port", "0", "--token", "t"], cwd=str(tmp_path))
    proxy_processes.append(proxy)
    base = proxy.url.split("?")[0]
    assert httpx.get(base + "files/notes.txt?token=t").text == "my notes"


def test_standalone_command_at_the_root(proxy_processes: list[ProxyProcess]) -> None:
    proxy = launch_trioproxy(["--port", "0", "--token", "t", "--", *echo_command()])
    proxy_processes.append(proxy)
    base = proxy.url.split("?")[0]
    response = httpx.get(base + "some/path?token=t")
    assert response.json()["target"] == "/some/path?token=t"
    # trioproxy's own API stays reachable beside it.
    assert httpx.get(base + "server-proxy/api/servers?token=t").json()["servers"][0]["name"] == "app"


def test_the_standalone_app_owns_every_path_no_configured_server_takes(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    # The root server is named "app", but "app/…" is a path of the app like any other; a
    # configured server beside it keeps its own path, even one below "app/".
    config = {"ServerProxy": {"servers": {"side": {"command": echo_command(), "path": "app/side"}}}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    proxy = launch_trioproxy(["--config", str(tmp_path / "cfg.json"), "--port", "0", "--token", "t", "--", *echo_command()])
    proxy_processes.append(proxy)
    base = proxy.url.split("?")[0]
    headers = {"Authorization": "token t"}
    for path in ("app", "app/", "app/static/main.js", "app/sidecar"):
        response = httpx.get(base + path, headers=headers)
        assert response.status_code == 200, (path, response.text)
        assert response.json()["target"] == "/" + path
    side = httpx.get(base + "app/side/x", headers=headers)
    assert side.json()["target"] == "/x"
    listed = servers(proxy, "t")
    assert listed["side"]["url"].endswith("/app/side/")
    assert (listed["app"]["state"], listed["side"]["state"]) == ("ready", "ready")


def test_sigterm_and_sigint_stop_everything_with_exit_0(proxy_processes: list[ProxyProcess]) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        proxy = launch_trioproxy(["--port", "0", "--token", "t", "--", *echo_command()])
        proxy_processes.append(proxy)
        base = proxy.url.split("?")[0]
        assert httpx.get(base + "?token=t").status_code == 200
        pid = servers(proxy, "t")["app"]["pid"]
        assert proxy.stop(signum) == 0
        assert not pid_alive(pid)


def test_children_die_when_trioproxy_is_killed(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    proxy = launch_trioproxy(["--port", "0", "--token", "t", "--", *echo_command()])
    proxy_processes.append(proxy)
    base = proxy.url.split("?")[0]
    assert httpx.get(base + "?token=t").status_code == 200
    pid = servers(proxy, "t")["app"]["pid"]
    proxy.process.kill()
    proxy.process.wait()
    killed_at = time.monotonic()
    wait_until(lambda: not pid_alive(pid), timeout=5)
    assert time.monotonic() - killed_at < 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prot", "18801"], "unknown option --prot (did you mean --port?)"),
        (["--tokn=abc"], "unknown option --tokn (did you mean --token?)"),
        (["--frobnicate", "1"], "unknown option --frobnicate; trioproxy --help lists the options"),
    ],
)
def test_unknown_option_stops_start_up_with_a_suggestion(args: list[str], message: str) -> None:
    result = subprocess.run([PY, "-m", "trioproxy", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == f"trioproxy: {message}" or message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "trioproxy is serving" not in result.stdout


def test_one_start_up_url(proxy_processes: list[ProxyProcess]) -> None:
    proxy = launch_trioproxy(["--port", "0", "--token", "t", "--", *echo_command()])
    proxy_processes.append(proxy)
    assert httpx.get(proxy.base + "?token=t").status_code == 200
    assert proxy.stop() == 0
    output = proxy.output()
    assert output.count("http://") == 1, output  # not Hypercorn's "Running on" as well


def _request_with_head_of(size: int) -> bytes:
    head = b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: token t\r\nX-Filler: \r\n\r\n"
    filler = b"a" * (size - len(head))
    return head.replace(b"X-Filler: ", b"X-Filler: " + filler)


def _status_of(address: tuple[str, int], request: bytes, trickle: bool) -> int:
    with socket.create_connection(address, timeout=10) as sock:
        if trickle:
            for i in range(0, len(request), 1024):
                try:
                    sock.sendall(request[i : i + 1024])
                except (BrokenPipeError, ConnectionResetError):
                    break  # refused before the end of the head
                time.sleep(0.001)
        else:
            sock.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ")[1])


@pytest.mark.parametrize("trickle", [False, True], ids=["one-write", "trickled"])
def test_request_heads_are_limited_to_64_kib(trickle: bool, proxy_processes: list[ProxyProcess]) -> None:
    proxy = launch_trioproxy(["--port", "0", "--token", "t", "--", *echo_command()])
    proxy_processes.append(proxy)
    host, port = proxy.base.split("//")[1].rstrip("/").split(":")
    address = (host, int(port))
    assert _status_of(address, _request_with_head_of(63 * 1024), trickle) == 200
    assert _status_of(address, _request_with_head_of(64 * 1024), trickle) == 200
    assert _status_of(address, _request_with_head_of(64 * 1024 + 1), trickle) == 431
    assert _status_of(address, _request_with_head_of(65 * 1024), trickle) == 431
    assert _status_of(address, _request_with_head_of(127 * 1024), trickle) == 431
    # Hypercorn's reads are 256 KiB: a head that arrives whole within one is counted all the same.
    assert _status_of(address, _request_with_head_of(200 * 1024), trickle) == 431
    assert _second_status(address, _request_with_head_of(1024) + _request_with_head_of(200 * 1024)) == 431


def _second_status(address: tuple[str, int], requests: bytes) -> int:
    """The status of the second answer on one keep-alive connection (the first has a length)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(requests)
        answer = b""
        while True:
            head, separator, rest = answer.partition(b"\r\n\r\n")
            if separator:
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                second = rest[length:]
                if b"\r\n" in second:
                    return int(second.split(b" ")[1])
            chunk = sock.recv(65536)
            assert chunk, f"the connection ended: {answer[:300]!r}"
            answer += chunk


def test_unix_socket_directory_removed_when_trioproxy_is_killed(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    config = {"ServerProxy": {"servers": {"echo": {"command": echo_command(unix=True), "unix_socket": True}}}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    proxy = launch_trioproxy(["--config", str(tmp_path / "cfg.json"), "--port", "0", "--token", "t"])
    proxy_processes.append(proxy)
    assert httpx.get(proxy.base + "echo/?token=t").status_code == 200
    status = servers(proxy, "t")["echo"]
    directory = os.path.dirname(status["unix_socket"])
    assert os.path.isdir(directory)
    proxy.process.kill()
    proxy.process.wait()
    wait_until(lambda: not os.path.exists(directory), timeout=3)
    assert not pid_alive(status["pid"])
