"""The things measured: the backend alone, trioproxy, jupyter-server-proxy, bare Hypercorn.

Each target is launched as a process of its own (in its own session), with its own scratch
directory, and stopped with everything it started: every descendant still alive after the
target stops is killed, so no run leaves servers behind.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .clients import HTTPConnection, ProtocolFailure

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO = BENCH_DIR.parent
CONFIG = BENCH_DIR / "servers_config.py"
BACKEND = BENCH_DIR / "backend.py"
JSP_ENV = BENCH_DIR / ".env-jsp"

DIRECT, TRIOPROXY, JSP, HYPERCORN = "direct", "trioproxy", "jupyter-server-proxy", "hypercorn"
ALL_TARGETS = (DIRECT, TRIOPROXY, JSP, HYPERCORN)

_live: list["Target"] = []  # started and not yet stopped, for emergency clean-up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trioproxy_command() -> str:
    beside = Path(sys.executable).with_name("trioproxy")
    if beside.exists():
        return str(beside)
    venv = REPO / ".venv" / "bin" / "trioproxy"
    if venv.exists():
        return str(venv)
    raise FileNotFoundError("the trioproxy command: install the repository (pip install -e .)")


def hypercorn_command() -> str:
    beside = Path(sys.executable).with_name("hypercorn")
    if beside.exists():
        return str(beside)
    return str(REPO / ".venv" / "bin" / "hypercorn")


def jsp_available() -> bool:
    return (JSP_ENV / "bin" / "jupyter-server").exists()


def backend_python() -> str:
    return sys.executable


PYCACHE = BENCH_DIR / "results" / ".pycache"


def process_env(**extra: str) -> dict[str, str]:
    """The environment of every process the benchmark starts.

    Bytecode is cached as in a normal installation (this machine sets PYTHONDONTWRITEBYTECODE,
    which would make every start compile trioproxy's modules anew), but into
    benchmarks/results/.pycache so nothing outside benchmarks/ is written.
    """
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(PYCACHE), "PYTHONUNBUFFERED": "1", **extra}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("JUPYTER_TOKEN", None)
    return env


# -- /proc helpers -----------------------------------------------------------------------------


def children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree = children_map()
    out, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] != b"Z"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own user+system CPU, reaped children's user+system CPU) in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / ticks, (cutime + cstime) / ticks


def memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (Linux: write 5 to clear_refs); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- targets -------------------------------------------------------------------------------------


@dataclass
class Target:
    """One running thing to measure. ``prefix`` is prepended to backend paths."""

    name: str
    port: int = 0
    prefix: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    scratch: Path | None = None
    launched_at: float = 0.0  # time.perf_counter() just before the launch
    ready_at: float = 0.0  # first answered request
    log_path: Path | None = None
    _log_file: object = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def path(self, backend_path: str, server: str = "bench") -> str:
        """The URL path that reaches ``backend_path`` on the backend named ``server``."""
        if self.name in (TRIOPROXY, JSP):
            return f"/{server}{backend_path}"
        return backend_path

    def probe_path(self) -> str:
        if self.name in (TRIOPROXY, JSP):
            return "/server-proxy/servers-info"
        return "/small"

    # launch

    def launch(self, run_dir: Path, cold_copies: int = 1, sleep: float = 0.0) -> "Target":
        self.port = free_port()
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=run_dir))
        env = process_env(
            TRIOPROXY_BENCH_PYTHON=backend_python(),
            TRIOPROXY_BENCH_DIR=str(self.scratch),
            TRIOPROXY_BENCH_COLD_COPIES=str(cold_copies),
        )
        token = secrets.token_hex(16)
        cwd: Path | None = None
        if self.name == DIRECT:
            argv = [backend_python(), str(BACKEND), str(self.port), "--name", "direct"]
            if sleep:
                argv += ["--sleep", str(sleep)]
        elif self.name == TRIOPROXY:
            argv = [trioproxy_command(), "--config", str(CONFIG), "--port", str(self.port), "--token", token]
            self.headers = {"Authorization": f"token {token}"}
        elif self.name == JSP:
            for sub in ("config", "data", "runtime"):
                (self.scratch / f"jupyter-{sub}").mkdir()
            env.update(
                JUPYTER_CONFIG_DIR=str(self.scratch / "jupyter-config"),
                JUPYTER_DATA_DIR=str(self.scratch / "jupyter-data"),
                JUPYTER_RUNTIME_DIR=str(self.scratch / "jupyter-runtime"),
                JUPYTER_PLATFORM_DIRS="1",
            )
            argv = [
                str(JSP_ENV / "bin" / "jupyter-server"),
                "--config", str(CONFIG),
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0",
                f"--ServerApp.token={token}",
                "--ServerApp.open_browser=False",
                f"--ServerApp.root_dir={self.scratch}",
                "--allow-root",
                "--no-browser",
            ]
            self.headers = {"Authorization": f"token {token}"}
        elif self.name == HYPERCORN:
            argv = [hypercorn_command(), "-k", "trio", "-b", f"127.0.0.1:{self.port}", "hello_asgi:app"]
            cwd = BENCH_DIR
        else:
            raise ValueError(self.name)
        self.log_path = self.scratch / "output.log"
        self._log_file = open(self.log_path, "wb")
        self.launched_at = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        _live.append(self)
        return self

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.002) -> float:
        """Poll with real requests until one is answered 200; return seconds since launch."""
        deadline = time.perf_counter() + timeout
        path = self.probe_path()
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                with HTTPConnection(self.port, timeout=5) as conn:
                    status, _ = conn.request("GET", path, self.headers)
                if status == 200:
                    self.ready_at = time.perf_counter()
                    return self.ready_at - self.launched_at
            except (OSError, ProtocolFailure):
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.name} did not answer within {timeout} s: {self.tail()}")
            time.sleep(interval)

    def start(self, run_dir: Path, **kwargs: object) -> "Target":
        self.launch(run_dir, **kwargs)  # type: ignore[arg-type]
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def tail(self, lines: int = 8) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    # processes it started

    def backend_pid(self, server: str = "bench") -> int | None:
        """The pid of backend ``server`` as the proxy reports it (trioproxy: its API;
        jupyter-server-proxy: its child processes, as ps would list them)."""
        if self.name == DIRECT:
            return self.pid
        if self.name == TRIOPROXY:
            import json

            with HTTPConnection(self.port, timeout=5) as conn:
                status, body = conn.request("GET", f"/server-proxy/api/servers/{server}", self.headers)
            if status != 200:
                return None
            return json.loads(body).get("pid")
        marker = f"--name {server}"
        for pid in descendants(self.pid):
            line = cmdline(pid)
            if str(BACKEND) in line and line.rstrip().endswith(marker) and alive(pid):
                return pid
        return None

    def listen_log(self) -> list[tuple[str, int, float, float]]:
        """(name, pid, script start, listening) of every backend that started listening."""
        assert self.scratch is not None
        return read_listen_log(self.scratch / "listen.log")

    def stop(self) -> None:
        if self.proc is None:
            return
        kids = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its session
        except (ProcessLookupError, PermissionError):
            pass
        for pid in kids:
            if alive(pid):
                kill_quietly(pid)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        if self in _live:
            _live.remove(self)


def read_listen_log(path: Path) -> list[tuple[str, int, float, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            out.append((parts[0], int(parts[1]), float(parts[2]), float(parts[3])))
    return out


def stop_all() -> None:
    for target in list(_live):
        try:
            target.stop()
        except Exception:
            pass
