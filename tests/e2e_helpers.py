"""Helpers for the end-to-end tests (``-m e2e``): real third-party servers as subprocesses.

Every process these tests start carries an environment marker (``TRIOPROXY_E2E=<id>``) that its
children inherit, or that is handed on explicitly where a parent builds a fresh environment
(JupyterHub's spawner). Teardown stops each service's process group, then ends whatever still
carries the marker: processes that left the group (single-user servers, trioproxy's backends in
their own groups) are found by it too, and nothing else is touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

VENV_BIN = Path(sys.executable).parent
# Convenience packages from PyPI installed outside site-packages (see .ci/run), so that their
# entry points reach only the trioproxy that a test points at them with PYTHONPATH.
PLUGINS = Path(sys.prefix) / "e2e-plugins"
MARK = "TRIOPROXY_E2E"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_marker() -> str:
    return uuid.uuid4().hex


def clean_env(marker: str, **extra: str) -> dict[str, str]:
    """This environment with the venv's scripts first on PATH (as an activated venv has them),
    without the variables that would switch trioproxy or Jupyter into another mode."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("JUPYTERHUB_", "JUPYTER_", "CONFIGPROXY_")) and name != "PYTHONPATH"
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env[MARK] = marker
    env.update(extra)
    return env


@dataclass
class Service:
    """A started command with its output in a file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM to its process group, SIGKILL to the group if it is still there after ``timeout``."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        # What left the group is ended by its marker (kill_marked), never by a stale group id.
        self.log_file.close()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def start_service(name: str, argv: list[str], env: dict[str, str], cwd: Path, log_dir: Path) -> Service:
    """Start ``argv`` in a session of its own (so its whole group can be stopped)."""
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 (closed by Service.stop)
    process = subprocess.Popen(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Service(name, process, log_path, log_file)


def wait_until(
    check: Callable[[], bool], *, timeout: float, what: str, services: tuple[Service, ...] = (), interval: float = 0.05
) -> None:
    """Poll ``check`` until it holds; fail at once (with the logs) if one of ``services`` died."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        for service in services:
            if not service.alive():
                raise AssertionError(f"{service.name} exited ({service.process.returncode}) while waiting for {what}:\n{service.log()[-4000:]}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.name}:\n{s.log()[-4000:]}" for s in services)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")
        time.sleep(interval)


def answers(url: str, status: int | None = None, **kwargs: Any) -> Callable[[], bool]:
    """A check for wait_until: ``url`` answers with ``status``, or with anything but a server error."""

    def check() -> bool:
        try:
            got = httpx.get(url, timeout=2, **kwargs).status_code
        except httpx.TransportError:
            return False
        return got == status if status is not None else got < 500

    return check


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``TRIOPROXY_E2E=<marker>`` (ours, by construction)."""
    needle = f"{MARK}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_marked(marker: str, grace: float = 3) -> list[int]:
    """SIGTERM every process still carrying ``marker``, SIGKILL those left after ``grace``."""
    pids = marked_pids(marker)
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in marked_pids(marker):
        _kill(pid, signal.SIGKILL)
    return pids


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def services_cleaned_up(marker: str) -> Iterator[list[Service]]:
    """Collects started services; at the end stops them (last first) and every marked process."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in reversed(started):
            service.stop()
        kill_marked(marker)


def read_until(service: Service, text: str, timeout: float = 30) -> str:
    """Wait for ``text`` in the service's output; return the output so far."""
    wait_until(lambda: text in service.log(), timeout=timeout, what=repr(text), services=(service,))
    return service.log()
