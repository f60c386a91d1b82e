"""Shared test helpers: real backends, a real trioproxy (in-process or as a subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioproxy.app import Settings, create_app
from trioproxy.auth import TokenAuth
from trioproxy.config import make_server_process
from trioproxy.server import run_app
from trioproxy.supervisor import Supervisors

HERE = Path(__file__).parent
BACKENDS = HERE / "backends"
PY = sys.executable
TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def echo_command(unix: bool = False) -> list[str]:
    """Command for the echo backend listening on {port}, or on {unix_socket}."""
    if unix:
        return [PY, str(BACKENDS / "echo.py"), "--unix", "{unix_socket}"]
    return [PY, str(BACKENDS / "echo.py"), "{port}"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile: reading /proc raises ESRCH
        return False


@dataclass
class Proxy:
    """A trioproxy running in the test's own trio run."""

    url: str  # base URL, ending with "/"
    token: str | None
    supervisors: Supervisors
    app: Any
    cancel_scope: trio.CancelScope
    headers: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        headers = dict(self.headers)
        headers.update(kwargs.pop("headers", {}))
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kwargs)


async def start_proxy(
    nursery: trio.Nursery,
    servers: dict[str, dict[str, Any]] | None = None,
    *,
    token: str | None = TOKEN,
    base_url: str = "/",
    templates: dict[str, dict[str, Any]] | None = None,
    **settings: Any,
) -> Proxy:
    """Start supervisors and Hypercorn on a free loopback port inside ``nursery``
    (``templates``: as ``c.ServerProxy.templates``)."""
    from hypercorn.config import Config

    processes = {name: make_server_process(name, cfg) for name, cfg in (servers or {}).items()}
    supervisors = Supervisors(processes, base_url=base_url)
    if templates is not None:
        from trioproxy.instances import Instances, load_templates

        loaded, invalid = load_templates(templates)
        settings["instances"] = Instances(supervisors, loaded)
        settings["instances"].invalid = invalid
    app = create_app(
        Settings(base_url=base_url, auth=TokenAuth(token, base_url=base_url), **settings), supervisors
    )
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.include_date_header = False
    config.include_server_header = False
    config.graceful_timeout = 0.5
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await run_app(app, config, task_status=task_status)

    binds = await nursery.start(run)
    url = binds[0] + base_url
    headers = {"Authorization": f"token {token}"} if token else {}
    return Proxy(url, token, supervisors, app, scope, headers)


@dataclass
class ProxyProcess:
    """trioproxy run as a real command."""

    process: subprocess.Popen[str]
    url: str
    lines: list[str]
    reader: Any = None

    @property
    def base(self) -> str:
        return self.url.split("?")[0]

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.close()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def output(self) -> str:
        return "".join(self.lines)


def launch_trioproxy(
    args: list[str], env: dict[str, str] | None = None, cwd: str | None = None, wait: float = 20
) -> ProxyProcess:
    """Start ``python -m trioproxy ARGS`` and wait for its start-up line."""
    process = subprocess.Popen(
        [PY, "-m", "trioproxy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    lines: list[str] = []
    deadline = time.monotonic() + wait
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "trioproxy is serving" in line:
            url = line.split(" at: ", 1)[1].strip()
            return ProxyProcess(process, url, lines, _drain_in_background(process, lines))
    process.kill()
    process.wait()
    process.stdout.close()
    raise AssertionError("trioproxy did not start:\n" + "".join(lines))


def _drain_in_background(process: subprocess.Popen[str], lines: list[str]) -> Any:
    import threading

    def drain() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    return reader


@pytest.fixture
def proxy_processes() -> Iterator[list[ProxyProcess]]:
    """Started trioproxy commands, killed at the end of the test whatever happens."""
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.kill()


def panel_server(directory: Path, app: str) -> dict[str, dict[str, Any]]:
    """A Panel (Bokeh) server named ``panel`` serving ``app`` from ``directory``, as a config."""
    (directory / "app.py").write_text(app)
    command = [
        PY, "-m", "panel", "serve", str(directory / "app.py"),
        "--port", "{port}", "--allow-websocket-origin=*", "--prefix", "{base_url}panel",
    ]  # fmt: skip
    return {"panel": {"command": command, "absolute_url": True, "timeout": 25, "cwd": str(directory)}}


async def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


@pytest.fixture(autouse=True, scope="session")
def _own_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every trioproxy the tests start writes its runtime file here, not in the user's."""
    saved = os.environ.get("JUPYTER_RUNTIME_DIR")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("runtime"))
    yield
    if saved is None:
        del os.environ["JUPYTER_RUNTIME_DIR"]
    else:
        os.environ["JUPYTER_RUNTIME_DIR"] = saved
