"""Fault injection, options: one server configured with a value that cannot work, beside good ones.

trioproxy must start (or refuse that one server with a message naming it), answer HTTP and
WebSocket requests to the bad server with a clear error (a 4xx/5xx status with a body, never a
200, a 101, a dropped connection or a hang), and keep serving the good servers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TOKEN, echo_command
from tests.faults import client
from tests.faults.backend import FaultBackend
from tests.faults.harness import ProxyUnderTest, settle

pytestmark = pytest.mark.faults

ECHO = echo_command()
HEADER = "request_headers_override"
BAD_OPTIONS: dict[str, dict[str, Any]] = {
    "header-name-space": {HEADER: {"X Bad": "1"}},
    "header-name-nul": {HEADER: {"X-Bad\x00": "1"}},
    "header-name-non-ascii": {HEADER: {"X-Caf\u00e9": "1"}},
    "header-name-empty": {HEADER: {"": "1"}},
    "header-value-nul": {HEADER: {"X-Bad": "a\x00b"}},
    "header-value-vt": {HEADER: {"X-Bad": "a\x0bb"}},
    "header-value-ff": {HEADER: {"X-Bad": "a\x0cb"}},
    "header-value-crlf": {HEADER: {"X-Bad": "a\r\nX-Injected: 1"}},
    "header-callable-bad-name": {HEADER: "CALLABLE_BAD_HEADERS"},
    "command-nul": {"command": [*ECHO, "x\x00y"]},
    "environment-value-nul": {"command": ECHO, "environment": {"V": "a\x00b"}},
    "environment-name-nul": {"command": ECHO, "environment": {"V\x00W": "1"}},
    "environment-name-equals": {"command": ECHO, "environment": {"A=B": "1"}},
    "environment-callable-equals": {"command": ECHO, "environment": "CALLABLE_BAD_ENVIRONMENT"},
    "cwd-nul": {"command": ECHO, "cwd": "/tmp\x00x"},
    "unix-socket-nul": {"command": echo_command(unix=True), "unix_socket": "/tmp/trioproxy-fault\x00x"},
    "unix-socket-directory": {"command": echo_command(unix=True), "unix_socket": "DIRECTORY"},
    "timeout-negative": {"command": ECHO, "timeout": -1.0},
    "stop-timeout-negative": {"command": ECHO, "stop_timeout": -1.0},
    "websocket-keepalive-tiny": {"command": ECHO, "websocket_keepalive": 0.01},
    "rewrite-response-101": {"rewrite_response": "CALLABLE_TO_101"},
}
PRELUDE = '''
def bad_headers():
    return {"X Bad": "1"}

def bad_environment():
    return {"A=B": "1"}

def to_101(response):
    response.code = 101
'''
CALLABLES = {
    "'CALLABLE_BAD_HEADERS'": "bad_headers",
    "'CALLABLE_BAD_ENVIRONMENT'": "bad_environment",
    "'CALLABLE_TO_101'": "to_101",
}


def clear_error(response: bytes, what: str) -> str | None:
    status = client.status_of(response)
    if status is None:
        return f"{what}: no answer ({response[:80]!r})"
    if status < 400:
        line = response.split(b"\r\n", 1)[0].decode("latin-1")
        return f"{what}: {line}"
    if not response.split(b"\r\n\r\n", 1)[-1].strip():
        return f"{what}: {status} without a message"
    return None


@pytest.fixture(scope="module")
def backend() -> Any:
    fault = FaultBackend()
    yield fault
    fault.close()


@pytest.mark.parametrize("option", list(BAD_OPTIONS))
def test_one_bad_option(tmp_path: Path, backend: FaultBackend, option: str) -> None:
    bad = dict(BAD_OPTIONS[option])
    if "command" not in bad:
        bad["port"] = backend.port  # no command: relays to the fault backend (HTTP 200, WebSocket echo)
    if bad.get("unix_socket") == "DIRECTORY":
        (tmp_path / "a-directory").mkdir()
        bad["unix_socket"] = str(tmp_path / "a-directory")
    proxy = None
    try:
        try:
            proxy = ProxyUnderTest(tmp_path / "proxy", servers={"bad": bad}, config_prelude=(PRELUDE, CALLABLES))
        except AssertionError as exc:
            raise AssertionError(f"option {option}: trioproxy refused to start at all: {exc}") from None
        with proxy.family(f"bad option {option}"):
            wrong = []
            for attempt in range(2):  # the first request starts the server; the second finds it failed
                http = client.http_get(proxy.port, "/bad/x", TOKEN)
                wrong.append(clear_error(http, f"HTTP #{attempt + 1}"))
                with client.connect(proxy.port) as sock:
                    sock.sendall(client.upgrade_head("/bad/echo", TOKEN))
                    ws = client.recv_until(sock, b"\r\n\r\n", timeout=30)
                    if option == "rewrite-response-101":  # rewrites apply to HTTP responses only
                        wrong.append(None if client.status_of(ws) == 101 else f"WebSocket #{attempt + 1}: {ws[:40]!r}")
                    else:
                        wrong.append(clear_error(ws, f"WebSocket #{attempt + 1}"))
            settle(proxy, "bad")  # a bad option may fail only once its server has tried to start
            with contextlib.suppress(httpx.HTTPError):  # and some only when it is stopped
                httpx.post(f"http://127.0.0.1:{proxy.port}/server-proxy/api/servers/bad/stop", headers={"Authorization": f"token {TOKEN}"}, timeout=30)
            problems = [w for w in wrong if w]
            assert not problems, f"option {option}: {problems}; errors in the output: {proxy.errors()}"
            assert "'bad'" in proxy.output() or " bad" in proxy.output(), f"option {option}: the log never names the server"
    finally:
        if proxy is not None:
            proxy.stop()
