"""What the package matrix runs: the packages (pinned in requirements.txt beside this file), the
request each one's first page gets, its stand-in program, and how two answers are compared.

Every package's server is reached under the same base URL through trioproxy and through
jupyter-server-proxy; what necessarily differs between the two runs (the proxy's own port, the
backend's port or socket, temporary files, per-process secrets) is replaced by a placeholder
before the comparison, nothing else.
"""

from __future__ import annotations

import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself needs tomli there
    import tomli as tomllib

HERE = Path(__file__).parent
REQUIREMENTS = HERE / "requirements.txt"
DIFFERENCES = HERE / "differences.toml"
STANDIN = HERE / "standin.py"
# Where .ci/run installs the pinned packages: outside site-packages (see requirements.txt).
TARGET = Path(sys.prefix) / "package-matrix"
FIELDS = ("status", "location", "set-cookie", "content-type")
# Cookies the proxies set for themselves, not relayed from the backend: Jupyter Server's
# anonymous identity and XSRF cookies, trioproxy's login cookie.
OWN_COOKIES = ("username-", "_xsrf=", "trioproxy")


@dataclass(frozen=True)
class Case:
    """One package: the server its entry point registers and what the matrix asks it."""

    server: str
    distribution: str  # as pinned in requirements.txt
    program: str  # the stand-in the package starts
    argv_has: str  # tells this package's stand-in from another package's running the same program
    requests: tuple[tuple[str, int], ...]  # (path under the base URL, status the stand-in means)
    websocket: bool = False  # raw_socket_proxy: the relay is a WebSocket to a raw socket


CASES = (
    Case("rstudio", "jupyter-rsession-proxy", "rserver", "--auth-none=1",
         (("rstudio/", 302), ("rstudio/auth-sign-in?appUri=%2F", 200))),
    Case("vscode", "jupyter-vscode-proxy", "code-server", "--port=", (("vscode/", 302),)),
    Case("codeserver", "jupyter-codeserver-proxy", "code-server", "--bind-addr=", (("codeserver/", 302),)),
    # raw_socket_proxy: HTTP is refused (405 in jupyter-server-proxy); the WebSocket carries RFB.
    Case("desktop-websockify", "jupyter-remote-desktop-proxy", "vncserver", "-rfbunixpath",
         (("desktop-websockify/", 405),), websocket=True),
    Case("shiny", "jupyter-shiny-proxy", "shiny-server", "", (("shiny/", 200), ("shiny/sub", 301))),
    Case("pluto", "jupyter-pluto-proxy", "julia", "Pluto.run", (("pluto/", 200),)),
    Case("matlab", "jupyter-matlab-proxy", "matlab-proxy-manager-app", "",
         (("matlab/", 302), ("matlab/default/", 200))),
    Case("tensorboard", "jupyter-tensorboard-proxy", "tensorboard", "--logdir",
         (("tensorboard/", 200), ("tensorboard/data/logdir", 200))),
    Case("marimo", "jupyter-marimo-proxy", "marimo", "--token-password", (("marimo/", 200), ("marimo/files", 307))),
    Case("panel", "jupyter-panel-proxy", "panel", "--prefix", (("panel/", 200), ("panel/app", 200))),
)
PROGRAMS = sorted({case.program for case in CASES})
# jupyter-tensorboard-proxy fixes its port: the two proxies' TensorBoards cannot run at once.
TENSORBOARD_PORT = 6006


def pins() -> dict[str, str]:
    """requirements.txt as {distribution: version}."""
    found = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[name.strip()] = version.strip()
    return found


def install_command() -> str:
    return f"python -m pip install --no-deps --target {TARGET} -r {REQUIREMENTS}"


def write_standins(bin_dir: Path) -> None:
    """One executable per program, each running standin.py under that program's name."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for program in PROGRAMS:
        path = bin_dir / program
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} {program} "$@"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def differences() -> dict[str, str]:
    """differences.toml as {key: reason}."""
    table = tomllib.loads(DIFFERENCES.read_text())
    return {key: entry["reason"] for key, entry in table.items()}


class Normalizer:
    """Replaces what must differ between the two runs by placeholders."""

    def __init__(self, proxy_ports: set[int], tmp: Path) -> None:
        self.proxy_ports = proxy_ports
        self.tmp = str(tmp)

    def text(self, value: str) -> str:
        def address(match: re.Match[str]) -> str:
            return "{proxy}" if int(match[2]) in self.proxy_ports else "{backend}"

        value = re.sub(r"(127\.0\.0\.1|localhost|0\.0\.0\.0):(\d+)", address, value)
        return value

    def answer(self, status: int, headers: Any) -> dict[str, Any]:
        """A response's status and the headers the matrix compares (httpx.Headers)."""
        location = headers.get("location")
        return {
            "status": status,
            "location": None if location is None else self.text(location),
            "set-cookie": [
                self.text(cookie) for cookie in headers.get_list("set-cookie") if not cookie.startswith(OWN_COOKIES)
            ],
            "content-type": headers.get("content-type"),
        }

    def argv(self, record: dict[str, Any]) -> list[str]:
        """A stand-in's argv with its own port/socket, temporary files and secrets replaced."""
        kind, _, where = record["listen"].partition(":")
        out = []
        secret_next = False
        for arg in record["argv"]:
            if secret_next:
                arg, secret_next = "{secret}", False
            elif arg == "--token-password":
                secret_next = True
            arg = arg.replace(where, "{unix_socket}" if kind == "unix" else "{port}")
            arg = re.sub(re.escape(self.tmp) + r"/tmpdir/[^\s;'\"]+", "{tmpfile}", arg)
            out.append(self.text(arg))
        return out

    def env(self, record: dict[str, Any]) -> dict[str, str]:
        env = dict(record["env"])
        for name in ("MWI_MPM_AUTH_TOKEN", "MWI_MPM_PARENT_PID"):
            if name in env:
                env[name] = "{per-process}"
        if "MWI_MPM_PORT" in env:
            env["MWI_MPM_PORT"] = "{port}"
        return env


def compare(case: Case, trio_answers: list[dict[str, Any]], jsp_answers: list[dict[str, Any]], listed: dict[str, str]) -> list[str]:
    """The differences between the two runs that differences.toml does not list, and the listed
    ones of this server that are gone."""
    problems = []
    seen = set()
    for (path, _), ours, theirs in zip(case.requests, trio_answers, jsp_answers, strict=True):
        for field in FIELDS:
            if ours[field] == theirs[field]:
                continue
            key = f"{case.server}.{path}.{field}"
            seen.add(key)
            if key not in listed:
                problems.append(f"{path} {field}: trioproxy {ours[field]!r}, jupyter-server-proxy {theirs[field]!r}")
    for key in listed:
        if key.startswith(f"{case.server}.") and key not in seen:
            problems.append(f"differences.toml lists {key!r}, but both answer the same: remove it")
    return problems
