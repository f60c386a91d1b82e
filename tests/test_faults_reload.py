"""Fault injection, reloads: live reconfiguration racing requests and WebSockets on servers that
are being removed or changed, a reload while a server starts, and a reload to a bad option.

Reloads are triggered as a user would (rewrite the config file, POST server-proxy/api/reload).
Every request must get an answer (a status; a WebSocket that ends) in bounded time, and trioproxy
the harness's checks afterwards.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, PY, TOKEN, echo_command
from tests.faults import client
from tests.faults.harness import ProxyUnderTest, base_servers, rounds, settle

pytestmark = pytest.mark.faults

WS = [PY, str(BACKENDS / "ws_echo.py"), "{port}"]
SLOW_ECHO = ["sh", "-c", f"sleep 0.5; exec {PY} {BACKENDS / 'echo.py'} {{port}}"]


def reload(proxy: ProxyUnderTest) -> tuple[int | None, str]:
    try:
        response = httpx.post(f"http://127.0.0.1:{proxy.port}/server-proxy/api/reload", headers={"Authorization": f"token {TOKEN}"}, timeout=60)
    except httpx.HTTPError as exc:
        return None, repr(exc)
    return response.status_code, response.text[:300]


@pytest.fixture
def reloading(tmp_path: Path) -> Any:
    servers = {"victim": {"command": echo_command()}, "wsvictim": {"command": WS}, "slow": {"command": SLOW_ECHO, "timeout": 20}}
    proxy = ProxyUnderTest(tmp_path / "proxy", servers=servers)
    yield proxy
    proxy.stop()


def variant(number: int) -> dict[str, dict[str, Any]]:
    """The config of reload ``number``: the victims changed, removed or back in turn."""
    servers = base_servers(None)
    kind = number % 3
    if kind == 0:
        return servers  # both victims removed
    env = {"V": str(number)} if kind == 1 else {}
    servers["victim"] = {"command": echo_command(), "environment": env}
    servers["wsvictim"] = {"command": WS, "environment": env}
    return servers


def test_reloads_racing_requests_and_websockets(reloading: ProxyUnderTest) -> None:
    proxy = reloading
    outcomes: list[str] = []
    reload_results: list[tuple[int | None, str]] = []
    stop = threading.Event()

    def reloader() -> None:
        for number in range(max(3, rounds() // 2)):
            if stop.is_set():
                return
            proxy.write_config(variant(number))
            reload_results.append(reload(proxy))
            time.sleep(0.3)

    def action(number: int) -> None:
        if number % 2:
            response = client.http_get(proxy.port, "/victim/x", TOKEN)
            outcomes.append(f"HTTP {client.status_of(response)}")
            return
        with client.connect(proxy.port) as sock:
            sock.sendall(client.upgrade_head("/wsvictim/echo", TOKEN))
            response = client.recv_until(sock, b"\r\n\r\n", timeout=30)
            status = client.status_of(response)
            if status != 101:
                outcomes.append(f"WebSocket {status}")
                return
            buffer = bytearray(response.split(b"\r\n\r\n", 1)[1])
            for _ in range(3):  # keep it open across a reload or two
                if not client.send(sock, client.frame(b"still here")):
                    break
                if client.read_frame(sock, buffer, timeout=30) is None:
                    break
                time.sleep(0.2)
            _, closed = client.read_to_end(sock, timeout=0.01)
            outcomes.append("WebSocket 101")

    thread = threading.Thread(target=reloader, daemon=True)
    with proxy.family("reloads racing requests and WebSockets") as family:
        thread.start()
        try:
            family.repeat(action, max(6, rounds()))
        finally:
            stop.set()
            thread.join(120)
    unanswered = [o for o in outcomes if o.endswith("None")]
    assert not unanswered, f"requests left without an answer during reloads: {outcomes}"
    assert all(status == 200 for status, _ in reload_results), f"reloads: {reload_results}"
    print(f"outcomes: {sorted(set(outcomes))}")


@pytest.mark.parametrize("change", ["removed", "changed"])
def test_a_reload_while_a_server_starts(reloading: ProxyUnderTest, change: str) -> None:
    proxy = reloading
    answers: list[int | None] = []

    def action(number: int) -> None:
        proxy.write_config({**base_servers(None), "slow": {"command": SLOW_ECHO, "timeout": 20}})
        status, body = reload(proxy)
        assert status == 200, body
        result: dict[str, Any] = {}

        def request() -> None:
            result["response"] = client.http_get(proxy.port, "/slow/x", TOKEN)

        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        time.sleep(0.1 + 0.05 * (number % 5))  # the server is starting (its command sleeps 0.5 s)
        servers = base_servers(None)
        if change == "changed":
            servers["slow"] = {"command": SLOW_ECHO, "timeout": 20, "environment": {"V": str(number)}}
        proxy.write_config(servers)
        status, body = reload(proxy)
        assert status == 200, body
        thread.join(60)
        assert not thread.is_alive(), "a request to a server that was starting never got an answer"
        answers.append(client.status_of(result.get("response", b"")))

    with proxy.family(f"a reload while a server starts ({change})") as family:
        family.repeat(action, max(2, rounds() // 3))
    assert None not in answers, f"statuses: {answers}"


@pytest.mark.parametrize(
    "bad",
    [
        {"command": echo_command(), "environment": {"A=B": "1"}},
        {"command": echo_command(), "timeout": -1.0},
        {"command": echo_command(), "request_headers_override": {"X Bad": "1"}},
        {"command": [*echo_command(), "x\x00y"]},
    ],
    ids=["environment-equals", "timeout-negative", "header-name-space", "command-nul"],
)
def test_a_reload_to_a_bad_option(reloading: ProxyUnderTest, bad: dict[str, Any]) -> None:
    proxy = reloading
    with proxy.family(f"a reload to a bad option {bad}"):
        proxy.write_config({**base_servers(None), "bad": bad})
        status, body = reload(proxy)
        http = client.http_get(proxy.port, "/bad/x", TOKEN)
        ws = client.websocket_echo(proxy.port, "/bad/echo", TOKEN)
        settle(proxy, "bad")
        answers = f"reload {status} {body!r}; HTTP to it: {http[:12]!r}; WebSocket to it: {ws[:40]}"
        if status == 200:  # accepted: the bad server must fail on its own, with a clear error
            assert client.status_of(http) is not None and client.status_of(http) >= 400, answers  # type: ignore[operator]
            assert ws.startswith("no 101: b'HTTP/1.1 "), answers
        else:
            assert status == 400 and "bad" in json.loads(body)["message"], answers
