"""Runtime files: how ``trioproxy list``, ``stop`` and ``servers`` find running instances.

Each running trioproxy writes ``trioproxy-<pid>.json`` to Jupyter's runtime directory (as
Jupyter Server writes ``jpserver-<pid>.json``), readable by its user only since it holds the
token, and removes it as it exits. A trioproxy killed with SIGKILL leaves its file behind:
:func:`running_instances` drops files whose process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

PREFIX = "trioproxy-"


def runtime_dir() -> Path:
    """Jupyter's runtime directory (``jupyter --runtime-dir``)."""
    try:
        from jupyter_core.paths import jupyter_runtime_dir
    except ImportError:
        # jupyter_core's rule, for installs without it.
        explicit = os.environ.get("JUPYTER_RUNTIME_DIR")
        if explicit:
            return Path(explicit)
        data = os.environ.get("JUPYTER_DATA_DIR") or os.path.join(
            os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "jupyter"
        )
        return Path(data) / "runtime"
    return Path(jupyter_runtime_dir())


@dataclass(frozen=True)
class Instance:
    """What a runtime file says about one running trioproxy."""

    url: str  # the base URL, without the token
    pid: int
    port: int
    base_url: str
    token: str | None  # None: --no-auth, or JupyterHub's login
    version: str = ""
    certfile: str | None = None  # under HTTPS: the certificate it serves, for clients to pin
    path: str = ""  # the runtime file itself (not written into it)

    def url_with_token(self) -> str:
        return self.url + (f"?token={self.token}" if self.token else "")

    def describe(self) -> str:
        return f"{self.url_with_token()} (pid {self.pid}, port {self.port})"


def file_of(pid: int) -> Path:
    """Where the trioproxy of process ``pid`` writes its runtime file."""
    return runtime_dir() / f"{PREFIX}{pid}.json"


def write(instance: Instance) -> Path:
    """Write the runtime file of ``instance`` (this process), atomically and mode 0600."""
    directory = runtime_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{PREFIX}{instance.pid}.json"
    partial = directory / f".{PREFIX}{instance.pid}.json.tmp"
    content = {key: value for key, value in asdict(instance).items() if key != "path"}
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(content, file, indent=2)
        file.write("\n")
    os.replace(partial, path)
    return path


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, but not ours to stop
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (not Linux): kill(0) said it exists


def running_instances(*, clean: bool = True) -> list[Instance]:
    """Every trioproxy whose runtime file is there and whose process is alive, by port.

    Files of processes that are gone are removed (with ``clean``); unreadable ones skipped.
    """
    directory = runtime_dir()
    found: list[Instance] = []
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob(f"{PREFIX}*.json")):
        try:
            data = json.loads(path.read_text())
            instance = Instance(
                url=str(data["url"]),
                pid=int(data["pid"]),
                port=int(data["port"]),
                base_url=str(data["base_url"]),
                token=data.get("token"),
                version=str(data.get("version", "")),
                certfile=data.get("certfile"),
                path=str(path),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not pid_alive(instance.pid):
            if clean:
                remove(path)
            continue
        found.append(instance)
    return sorted(found, key=lambda instance: (instance.port, instance.pid))
