"""The proxy under test: a real ``python -m trioproxy`` and the checks every fault family ends with.

After a family, trioproxy must be alive, answer a normal HTTP request and a WebSocket echo through
relayed servers, and hold no more file descriptors than a few above its baseline (waited for,
not asserted at once: closing takes the event loop a moment). Its output is read as log records
(``[L HH:MM:SS logger] message`` and the lines that follow): an unexpected error that a boundary
logged with its traceback is allowed, counted and printed; a traceback outside any log record
(an exception that escaped into a thread, ``__del__`` or trio's top level) is a failure.

``TRIOPROXY_FAULT_ROUNDS`` sets how often each phase is repeated (200 is the thorough form); half
of the rounds run while a background client keeps the proxy busy.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, PY, TOKEN, ProxyProcess, echo_command, launch_trioproxy, pid_alive

from . import client
from .backend import FaultBackend

FD_MARGIN = 8
SETTLE_TIMEOUT = 15.0
RECORD = re.compile(r"^\[([A-Z]) \d\d:\d\d:\d\d ([\w.\-]+)\] (.*)")


def rounds(default: int = 10) -> int:
    """How many times each phase runs: ``TRIOPROXY_FAULT_ROUNDS``, else ``default``."""
    value = os.environ.get("TRIOPROXY_FAULT_ROUNDS")
    return max(2, int(value)) if value else default


def pause() -> None:
    """A random 0-5 ms delay, so that faults land at different points of the proxy's work."""
    time.sleep(random.uniform(0, 0.005))


def base_servers(backend: FaultBackend | None) -> dict[str, dict[str, Any]]:
    # Idle pooled backend connections go after a second, so that the file descriptors a family
    # made the pool open are given back within the settle time (the default keeps them 30 s).
    pool = {"pool_idle_timeout": 1.0}
    servers: dict[str, dict[str, Any]] = {
        "echo": {"command": echo_command(), **pool},
        "ws": {"command": [PY, str(BACKENDS / "ws_echo.py"), "{port}"], **pool},
    }
    if backend is not None:
        servers["faulty"] = {"port": backend.port, **pool}
    return servers


def make_certificate(directory: Path) -> tuple[Path, Path]:
    from tests.test_tls import make_certificate as make

    return make(directory)


@dataclass
class Records:
    """trioproxy's output since a mark, read as log records."""

    boundary: Counter[str] = field(default_factory=Counter)  # "logger: last traceback line"
    stray: list[str] = field(default_factory=list)  # tracebacks no log record carried

    @classmethod
    def parse(cls, lines: list[str]) -> Records:
        records = cls()
        current: list[str] = []
        logged = False
        for line in [*lines, "[I 00:00:00 end] end\n"]:
            match = RECORD.match(line)
            if match or not current:
                if current:
                    records._classify(current, logged)
                current, logged = [line], bool(match) and match.group(1) in "EWC"
                continue
            current.append(line)
        return records

    def _classify(self, lines: list[str], logged: bool) -> None:
        text = "".join(lines)
        if "Traceback" not in text:
            return
        escaped = any(
            line.startswith(("Exception in thread", "Exception ignored", "Unhandled", "Traceback")) for line in lines[1:2]
        ) and not logged
        header = RECORD.match(lines[0])
        if header is not None and header.group(2).startswith("trioproxy.server."):
            return  # a relayed server's own output, a line per record: the app's business
        if header is None or escaped or re.search(r"^(Exception in thread|Exception ignored)", text, re.M):
            self.stray.append(text[-2000:])
            return
        last = next((line.strip(" |+\n") for line in reversed(lines[1:]) if line.strip(" |+-\n")), "?")
        self.boundary[f"{header.group(2)}: {header.group(3)[:80]} -> {last[:160]}"] += 1


class BusyClient:
    """Keeps the proxy busy from a thread: keep-alive GETs through a relayed server."""

    def __init__(self, port: int, tls: ssl.SSLContext | None) -> None:
        self.port, self.tls = port, tls
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="busy-client", daemon=True)

    def __enter__(self) -> BusyClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        request = client.head("GET", "/echo/busy", client.auth_headers(TOKEN))
        while not self._stop.is_set():
            try:
                with client.connect(self.port, self.tls) as sock:
                    for _ in range(20):
                        if self._stop.is_set():
                            return
                        sock.sendall(request)
                        response = client.recv_until(sock, b'"peer"')
                        if client.status_of(response) != 200:
                            self.failures.append(f"busy GET: {response[:200]!r}")
                            return
                        self.done += 1
            except OSError as exc:
                self.failures.append(f"busy GET: {exc!r}")
                return


class ProxyUnderTest:
    """One trioproxy command with the echo, WebSocket and fault backends as relayed servers."""

    def __init__(
        self,
        directory: Path,
        *,
        tls: bool = False,
        backend: FaultBackend | None = None,
        servers: dict[str, dict[str, Any]] | None = None,
        args: list[str] | None = None,
        config_prelude: tuple[str, dict[str, str]] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.backend = backend
        self.config = directory / "config.py"
        self.servers = {**base_servers(backend), **(servers or {})}
        self.prelude = config_prelude  # Python code, and placeholders (quoted) it replaces by names
        self.write_config(self.servers)
        extra = list(args or [])
        self.tls: ssl.SSLContext | None = None
        if tls:
            certfile, keyfile = make_certificate(directory)
            extra += ["--certfile", str(certfile), "--keyfile", str(keyfile)]
            self.tls = client.client_tls()
        self.process: ProxyProcess = launch_trioproxy(
            ["--port", "0", "--token", TOKEN, "--config", str(self.config), *extra],
            env={"JUPYTER_RUNTIME_DIR": str(directory / "runtime")},
        )
        self.port = int(self.process.base.rsplit(":", 1)[1].split("/")[0])
        self.pid = self.process.process.pid
        self.checked = 0  # output lines already read by a family

    def write_config(self, servers: dict[str, dict[str, Any]], extra: str = "") -> None:
        text = repr(servers)
        code = ""
        if self.prelude is not None:
            code, names = self.prelude
            for placeholder, name in names.items():
                text = text.replace(placeholder, name)
        self.config.write_text(f"{code}\nc.ServerProxy.servers = {text}\n{extra}")

    # -- what the checks look at --------------------------------------------------------------
    def alive(self) -> bool:
        return self.process.process.poll() is None and pid_alive(self.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def output(self, since: int = 0) -> str:
        return "".join(self.process.lines[since:])

    def problems(self) -> list[str]:
        """What is wrong with a normal request through relayed servers right now, if anything."""
        wrong = []
        try:
            response = client.http_get(self.port, "/echo/fault-check", TOKEN, self.tls)
            if client.status_of(response) != 200:
                wrong.append(f"HTTP through /echo/: {response[:300]!r}")
        except OSError as exc:
            wrong.append(f"HTTP through /echo/: {exc!r}")
        try:
            echoed = client.websocket_echo(self.port, "/ws/echo", TOKEN, self.tls)
            if echoed != "fault-check":
                wrong.append(f"WebSocket through /ws/echo: {echoed}")
        except OSError as exc:
            wrong.append(f"WebSocket through /ws/echo: {exc!r}")
        return wrong

    def errors(self, since: int = 0) -> str:
        """The exception lines and trioproxy's own fatal lines in its output since ``since``."""
        pattern = re.compile(r"^\s*[|+ ]*((\w+\.)*\w*(Error|Exception|Group)\b.*|trioproxy: .*)$")
        found = [line.strip(" |+\n") for line in self.process.lines[since:] if pattern.match(line)]
        unique = list(dict.fromkeys(found))
        return "; ".join(unique[-6:]) or "(none)"

    def dies_within(self, timeout: float) -> bool:
        """Whether trioproxy exits within ``timeout`` (it may be shutting down after a fatal error)."""
        try:
            self.process.process.wait(timeout)
        except Exception:
            return False
        return True

    def death(self) -> str:
        code = self.process.process.poll()
        return f"trioproxy died (exit status {code}); its output ends:\n{self.output()[-4000:]}"

    def stop(self) -> None:
        try:
            self.process.stop(timeout=15)  # SIGTERM: trioproxy stops its servers itself
        except Exception:
            self.process.kill()

    # -- families -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def family(self, name: str) -> Iterator[Family]:
        """Run a family of faults; on leaving, check trioproxy is alive, answers and has its fds back."""
        assert self.alive(), self.death()
        warm = self.problems()  # also opens the pooled backend connections the baseline counts
        assert not warm, f"{name}: not healthy before the family: {warm}"
        family = Family(name, self, self.fds(), len(self.process.lines))
        try:
            yield family
        except BaseException:
            if not self.alive() or self.dies_within(3):
                raise AssertionError(f"{name}: {self.death()}") from None
            raise
        family.check()


@dataclass
class Family:
    name: str
    proxy: ProxyUnderTest
    baseline_fds: int
    mark: int
    rounds_run: int = 0
    busy_done: int = 0

    def repeat(self, action: Callable[[int], None], count: int | None = None) -> None:
        """Run ``action(i)`` ``count`` times: half alone, half while a background client is busy."""
        count = count or rounds()
        half = count // 2
        for number in range(half):
            self._one(action, number)
        with BusyClient(self.proxy.port, self.proxy.tls) as busy:
            for number in range(half, count):
                self._one(action, number)
        self.busy_done += busy.done
        assert not busy.failures, f"{self.name}: a normal client failed meanwhile: {busy.failures[:3]}"

    def _one(self, action: Callable[[int], None], number: int) -> None:
        if not self.proxy.alive():
            raise AssertionError(f"{self.name}: after {number} rounds: {self.proxy.death()}")
        action(number)
        self.rounds_run += 1

    def check(self) -> None:
        proxy = self.proxy
        assert proxy.alive(), f"{self.name}: after {self.rounds_run} rounds: {proxy.death()}"
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while proxy.fds() > self.baseline_fds + FD_MARGIN and time.monotonic() < deadline:
            time.sleep(0.1)
        fds = proxy.fds()
        wrong = proxy.problems()
        assert proxy.alive(), f"{self.name}: {proxy.death()}"
        if wrong and proxy.dies_within(3):
            raise AssertionError(f"{self.name}: a normal request fails ({wrong[0][:200]}), and {proxy.death()}")
        assert not wrong, (
            f"{self.name}: a normal request fails afterwards: {wrong}; errors in the output: {proxy.errors(self.mark)}"
        )
        assert fds <= self.baseline_fds + FD_MARGIN, (
            f"{self.name}: {fds} file descriptors open {SETTLE_TIMEOUT:.0f} s after the family, "
            f"baseline {self.baseline_fds}: {sorted(_fd_kinds(proxy.pid).items())}"
        )
        records = Records.parse(proxy.process.lines[self.mark :])
        summary = f"{self.name}: {self.rounds_run} rounds, busy client {self.busy_done} requests"
        if records.boundary:
            summary += f"; logged by a boundary: {dict(records.boundary)}"
        print(summary)
        assert not records.stray, f"{self.name}: a traceback outside any log record:\n" + "\n".join(records.stray[:3])


def _fd_kinds(pid: int) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kinds[target.split(":")[0] if ":" in target else "file"] += 1
    return kinds


def settle(proxy: ProxyUnderTest, name: str, timeout: float = 15) -> None:
    """Wait (bounded) until server ``name`` is no longer starting, or trioproxy no longer answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"http://127.0.0.1:{proxy.port}/server-proxy/api/servers", headers={"Authorization": f"token {TOKEN}"}, timeout=10)
            states = {server["name"]: server["state"] for server in response.json()["servers"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return
        if states.get(name) != "starting":
            return
        time.sleep(0.2)


class ProxyPool:
    """The session's shared proxies, started on first use and again if a family killed them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.backend = FaultBackend()
        self._proxies: dict[bool, ProxyUnderTest] = {}
        self._launched = 0

    def get(self, tls: bool = False) -> ProxyUnderTest:
        proxy = self._proxies.get(tls)
        if proxy is None or not proxy.alive() or proxy.problems():
            if proxy is not None:
                proxy.stop()
            self._launched += 1
            proxy = ProxyUnderTest(self.directory / f"proxy{self._launched}", tls=tls, backend=self.backend)
            self._proxies[tls] = proxy
        self.backend.on_accept = None
        return proxy

    def close(self) -> None:
        for proxy in self._proxies.values():
            proxy.process.kill()  # the end of the session: no need to wait for a graceful stop
        self.backend.close()


@pytest.fixture(scope="session")
def fault_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyPool]:
    pool = ProxyPool(tmp_path_factory.mktemp("faults"))
    yield pool
    pool.close()


@pytest.fixture
def proxy(fault_pool: ProxyPool) -> ProxyUnderTest:
    """The shared plain-HTTP trioproxy (HTTP/1.1, h2c and prior-knowledge HTTP/2)."""
    return fault_pool.get(tls=False)


@pytest.fixture
def tls_proxy(fault_pool: ProxyPool) -> ProxyUnderTest:
    """The shared TLS trioproxy (HTTP/1.1 and HTTP/2 by ALPN)."""
    return fault_pool.get(tls=True)


def connect(proxy: ProxyUnderTest, alpn: tuple[str, ...] | None = None) -> socket.socket:
    tls = client.client_tls(alpn) if (proxy.tls is not None and alpn) else proxy.tls
    return client.connect(proxy.port, tls)
