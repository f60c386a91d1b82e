"""trioproxy's own API with real processes: servers-info, icons, the management API (also under
concurrent, conflicting actions), logs, metrics, the access log, activity and idle culling."""

from __future__ import annotations

import logging
import os
import signal
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trioproxy.metrics import Metrics, render
from trioproxy.supervisor import State

from .conftest import PY, TOKEN, Proxy, echo_command, free_port, pid_alive, start_proxy, wait_for
from .test_websocket import open_ws, ws_echo_command

API = "server-proxy/api/servers"

# An HTTP server on {port} that records its pid, may take a while to start (argv[3]) and to
# stop on SIGTERM (argv[4]), and logs each request to stderr (http.server does).
BACKEND = textwrap.dedent(
    """
    import http.server, os, signal, sys, time
    port, record, start_delay, stop_delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    with open(record, "a") as f:
        f.write(f"{os.getpid()}\\n")
    def stop(*_):
        time.sleep(stop_delay)
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(start_delay)
    print(f"serving on {port}", flush=True)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler).serve_forever()
    """
)


def backend(tmp_path: Path, start_delay: float = 0.0, stop_delay: float = 0.0, **options: Any) -> dict[str, Any]:
    script = tmp_path / "backend.py"
    script.write_text(BACKEND)
    command = [PY, str(script), "{port}", str(tmp_path / "pids"), str(start_delay), str(stop_delay)]
    return {"command": command, "cwd": str(tmp_path), "timeout": 20, **options}


def started_pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def live_pids(tmp_path: Path) -> list[int]:
    return [pid for pid in started_pids(tmp_path) if pid_alive(pid)]


async def server_status(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await client.get(f"{API}/{name}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_for_state(proxy: Proxy, client: httpx.AsyncClient, name: str, state: str, timeout: float = 10) -> dict[str, Any]:
    """Wait for the supervisor to reach ``state``; its status as the API then tells it."""
    with trio.fail_after(timeout):
        await proxy.supervisors[name].wait_for_state(State(state))
    status = await server_status(client, name)
    assert status["state"] == state, status
    return status


def assert_consistent(proxy: Proxy, name: str, tmp_path: Path) -> None:
    """The state tells the truth, and no process is left over from earlier starts."""
    supervisor = proxy.supervisors[name]
    live = live_pids(tmp_path)
    if supervisor.state is State.READY:
        assert supervisor.pid is not None and live == [supervisor.pid]
    else:
        assert supervisor.state is State.STOPPED and supervisor.pid is None and live == []


# -- servers-info and icons ------------------------------------------------------------------

SVG = b"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 1 1'><rect width='1' height='1'/></svg>"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


async def test_servers_info_has_jupyter_server_proxys_shape(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "icon.svg").write_bytes(SVG)
    servers: dict[str, dict[str, Any]] = {
        "echo": {"command": echo_command(), "launcher_entry": {"icon_path": str(tmp_path / "icon.svg")}},
        "hidden": {
            "command": echo_command(),
            "new_browser_tab": False,
            "launcher_entry": {"enabled": False, "title": "Hidden", "path_info": "hidden/lab", "category": "Other"},
        },
    }
    proxy = await start_proxy(nursery, servers, base_url="/base/")
    async with proxy.client() as client:
        response = await client.get("server-proxy/servers-info")
        behind = await client.get("server-proxy/servers-info", headers={"X-Forwarded-Prefix": "/outer/proxy/9/"})
    assert response.status_code == 200
    assert response.json() == {
        "server_processes": [
            {
                "name": "echo",
                "launcher_entry": {
                    "enabled": True,
                    "title": "echo",
                    "path_info": "echo/",
                    "category": "Notebook",
                    "icon_url": "/base/server-proxy/icon/echo",
                },
                "new_browser_tab": True,
            },
            {
                "name": "hidden",
                "launcher_entry": {"enabled": False, "title": "Hidden", "path_info": "hidden/lab", "category": "Other"},
                "new_browser_tab": False,
            },
        ]
    }
    icon_url = behind.json()["server_processes"][0]["launcher_entry"]["icon_url"]
    assert icon_url == "/outer/proxy/9/base/server-proxy/icon/echo"


@pytest.mark.parametrize(("suffix", "data", "content_type"), [("svg", SVG, "image/svg+xml"), ("png", PNG, "image/png")])
async def test_icons_are_served_with_their_content_type(
    nursery: trio.Nursery, tmp_path: Path, suffix: str, data: bytes, content_type: str
) -> None:
    (tmp_path / f"icon.{suffix}").write_bytes(data)
    servers = {"app": {"command": echo_command(), "launcher_entry": {"icon_path": str(tmp_path / f"icon.{suffix}")}}}
    proxy = await start_proxy(nursery, servers)
    async with proxy.client() as client:
        response = await client.get("server-proxy/icon/app")
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.content == data
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in response.headers["content-security-policy"]  # no script in an SVG


async def test_missing_icons_are_404s(nursery: trio.Nursery, tmp_path: Path) -> None:
    servers: dict[str, dict[str, Any]] = {
        "plain": {"command": echo_command()},
        "gone": {"command": echo_command(), "launcher_entry": {"icon_path": str(tmp_path / "gone.svg")}},
    }
    proxy = await start_proxy(nursery, servers)
    async with proxy.client() as client:
        for name, message in [("nope", "No icon"), ("plain", "No icon"), ("gone", "cannot be read")]:
            response = await client.get(f"server-proxy/icon/{name}")
            assert response.status_code == 404
            assert message in response.json()["message"]


# -- the management API -----------------------------------------------------------------------


async def test_status_of_every_server(nursery: trio.Nursery, tmp_path: Path) -> None:
    servers = {"web": backend(tmp_path), "sock": {"command": echo_command(unix=True), "unix_socket": True}}
    proxy = await start_proxy(nursery, servers)
    async with proxy.client() as client:
        listing = (await client.get(API)).json()["servers"]
        assert [server["name"] for server in listing] == ["web", "sock"]
        web = listing[0]
        assert web["state"] == "stopped"
        assert web["pid"] is None and web["uptime"] is None and web["last_exit_code"] is None
        assert web["restarts"] == 0 and web["managed"] is True and web["url"] == "/web/"

        started = await client.post(f"{API}/web/start")
        assert started.status_code == 200
        web = started.json()
        assert web["state"] == "ready" and pid_alive(web["pid"]) and web["port"] > 0
        assert web["unix_socket"] is None and web["uptime"] >= 0
        stamp = datetime.fromisoformat(web["last_activity"].replace("Z", "+00:00"))
        assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 5
        assert (await server_status(client, "web")) | {"uptime": 0, "idle_seconds": 0, "last_activity": 0} == web | {
            "uptime": 0,
            "idle_seconds": 0,
            "last_activity": 0,
        }

        sock = (await client.post(f"{API}/sock/start")).json()
        assert sock["state"] == "ready" and sock["port"] is None and sock["unix_socket"].endswith("socket")
        stopped = await client.post(f"{API}/sock/stop")
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"

        stopped = await client.delete(f"{API}/web")
        assert stopped.status_code == 200
        assert stopped.json()["state"] == "stopped" and stopped.json()["pid"] is None
        assert not pid_alive(web["pid"])


async def test_unknown_names_and_actions_are_404s(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"echo": {"command": echo_command()}})
    async with proxy.client() as client:
        for method, path in [
            ("GET", f"{API}/nope"),
            ("DELETE", f"{API}/nope"),
            ("POST", f"{API}/nope/start"),
            ("POST", f"{API}/nope/restart"),
            ("GET", f"{API}/nope/logs"),
        ]:
            response = await client.request(method, path)
            assert response.status_code == 404, (method, path)
            assert response.json()["message"] == "No server named 'nope'."
        response = await client.post(f"{API}/echo/explode")
        assert response.status_code == 404
        assert "use start, restart or stop" in response.json()["message"]
        response = await client.get(f"{API}/echo/start")
        assert response.status_code == 405
        assert "POST" in response.headers["allow"]
        assert response.json()["error"] == "Method Not Allowed"
        response = await client.get("server-proxy/api/nothing", headers={"Accept": "text/html"})
        assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
        assert "Traceback" not in response.text
    assert proxy.supervisors["echo"].state is State.STOPPED


async def test_everything_needs_authentication(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"echo": {"command": echo_command()}})
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        for method, path in [
            ("GET", ""),
            ("GET", API),
            ("GET", f"{API}/echo"),
            ("POST", f"{API}/echo/start"),
            ("POST", f"{API}/echo/restart"),
            ("DELETE", f"{API}/echo"),
            ("GET", f"{API}/echo/logs"),
            ("GET", "server-proxy/metrics"),
            ("GET", "server-proxy/servers-info"),
            ("GET", "server-proxy/static/launcher.js"),
        ]:
            response = await client.request(method, path)
            assert response.status_code == 403, (method, path)
        response = await client.get("", headers={"Accept": "text/html"})
        assert response.status_code == 302 and "/login?next=" in response.headers["location"]
    assert proxy.supervisors["echo"].state is State.STOPPED


async def test_start_waits_until_ready_or_answers_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path, start_delay=0.5)})
    async with proxy.client() as client:
        began = trio.current_time()
        response = await client.post(f"{API}/web/start", params={"wait": "0"})
        assert trio.current_time() - began < 0.4
        assert response.status_code == 202 and response.json()["state"] == "starting"
        await wait_for_state(proxy, client, "web", "ready")

        began = trio.current_time()
        response = await client.post(f"{API}/web/restart")
        assert trio.current_time() - began >= 0.45  # it waited for the new process
        assert response.status_code == 200 and response.json()["state"] == "ready"
        assert (await client.get("web/")).status_code == 200
    assert len(started_pids(tmp_path)) == 2
    assert_consistent(proxy, "web", tmp_path)


async def test_many_starts_at_once_start_one_process(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path, start_delay=0.3)})
    answers: list[httpx.Response] = []
    async with proxy.client() as client:

        async def start(wait: str) -> None:
            answers.append(await client.post(f"{API}/web/start", params={"wait": wait}))

        async with trio.open_nursery() as starts:
            for index in range(8):
                starts.start_soon(start, "0" if index % 4 == 0 else "1")
        await wait_for_state(proxy, client, "web", "ready")
    waited = [answer for answer in answers if answer.status_code == 200]
    assert len(waited) == 6 and len(answers) == 8
    assert {answer.json()["pid"] for answer in waited} == set(started_pids(tmp_path))
    assert len(started_pids(tmp_path)) == 1
    assert_consistent(proxy, "web", tmp_path)


async def test_restart_while_starting(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path, start_delay=0.4)})
    answers: list[httpx.Response] = []
    async with proxy.client() as client:
        assert (await client.post(f"{API}/web/start", params={"wait": "0"})).status_code == 202
        await wait_for(lambda: len(started_pids(tmp_path)) == 1)

        async def restart() -> None:
            answers.append(await client.post(f"{API}/web/restart"))

        async with trio.open_nursery() as restarts:
            for _ in range(3):
                restarts.start_soon(restart)
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        assert {answer.json()["state"] for answer in answers} == {"ready"}
        assert (await client.get("web/")).status_code == 200
    assert_consistent(proxy, "web", tmp_path)


async def test_stop_while_stopping(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path, stop_delay=0.4)})
    answers: list[tuple[float, httpx.Response]] = []
    async with proxy.client() as client:
        pid = (await client.post(f"{API}/web/start")).json()["pid"]
        began = trio.current_time()

        async def stop() -> None:
            response = await client.delete(f"{API}/web")
            answers.append((trio.current_time() - began, response))

        async with trio.open_nursery() as stops:
            for _ in range(3):
                stops.start_soon(stop)
                await trio.sleep(0.05)
    # Every stop answered once the process had really gone, not before.
    assert all(elapsed >= 0.35 for elapsed, _ in answers)
    assert [(r.status_code, r.json()["state"]) for _, r in answers] == [(200, "stopped")] * 3
    assert not pid_alive(pid)
    assert_consistent(proxy, "web", tmp_path)


@pytest.mark.parametrize("wait", ["0", "1"])
async def test_start_while_stopping_starts_it_again(nursery: trio.Nursery, tmp_path: Path, wait: str) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path, stop_delay=0.4)})
    supervisor = proxy.supervisors["web"]
    async with proxy.client() as client:
        first = (await client.post(f"{API}/web/start")).json()["pid"]
        async with trio.open_nursery() as both:
            both.start_soon(client.delete, f"{API}/web")
            await wait_for(lambda: supervisor.state is State.STOPPING)
            response = await client.post(f"{API}/web/start", params={"wait": wait})
        assert response.status_code == (202 if wait == "0" else 200)
        second = (await wait_for_state(proxy, client, "web", "ready"))["pid"]
    assert second != first and not pid_alive(first)
    assert_consistent(proxy, "web", tmp_path)


async def test_conflicting_actions_at_once_leave_a_consistent_state(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path, start_delay=0.1, stop_delay=0.1)})
    statuses: list[int] = []
    async with proxy.client() as client:

        async def act(method: str, path: str) -> None:
            statuses.append((await client.request(method, path)).status_code)

        for round_ in range(3):
            async with trio.open_nursery() as actions:
                for method, path in [
                    ("POST", f"{API}/web/start"),
                    ("DELETE", f"{API}/web"),
                    ("POST", f"{API}/web/restart"),
                    ("POST", f"{API}/web/start?wait=0"),
                    ("DELETE", f"{API}/web"),
                ]:
                    actions.start_soon(act, method, path)
                    await trio.sleep(0.03 * round_)
            # Whatever won, what the API says is true.
            await wait_for(lambda: proxy.supervisors["web"].state in (State.READY, State.STOPPED), timeout=10)
            assert_consistent(proxy, "web", tmp_path)
        # A start the stop overtook answers 503 "stopped"; nothing answers anything else.
        assert set(statuses) <= {200, 202, 503}
        await client.delete(f"{API}/web")
    assert live_pids(tmp_path) == []


async def test_a_restart_finishes_when_its_client_goes_away(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path, start_delay=0.3, stop_delay=0.2)})
    async with proxy.client() as client:
        first = (await client.post(f"{API}/web/start")).json()["pid"]
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{API}/web/restart", timeout=0.1)
        status = await wait_for_state(proxy, client, "web", "ready")
    assert status["pid"] != first
    assert_consistent(proxy, "web", tmp_path)


async def test_failing_server_answers_503_with_its_output(nursery: trio.Nursery) -> None:
    command = [PY, "-c", "import sys; print('missing config file', flush=True); sys.exit(3)"]
    proxy = await start_proxy(nursery, {"bad": {"command": command, "max_failures": 2, "backoff_initial": 0.05}})
    async with proxy.client() as client:
        response = await client.post(f"{API}/bad/start")
        assert response.status_code == 503
        document = response.json()
        assert document["server"] == "bad"
        assert "exited before it was ready (exit code 3)" in document["message"]
        assert document["output"] == ["missing config file"]
        failed = await wait_for_state(proxy, client, "bad", "failed")
        assert failed["last_exit_code"] == 3 and "gave up" in failed["reason"]

        response = await client.post(f"{API}/bad/restart")
        assert response.status_code == 503 and "exit code 3" in response.json()["message"]
        response = await client.post(f"{API}/bad/start", params={"wait": "0"})
        assert response.status_code == 202 and response.json()["state"] == "starting"
        await wait_for_state(proxy, client, "bad", "failed")


def _no_licence(port: int) -> list[str]:
    raise RuntimeError(f"no licence for port {port}")


def _no_environment() -> dict[str, str]:
    raise KeyError("HOME_OF_TOOL")


async def test_a_failing_command_or_environment_callable_fails_that_server_alone(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    servers: dict[str, dict[str, Any]] = {
        "cmd": {"command": _no_licence, "max_failures": 1},
        "env": {"command": echo_command(), "environment": _no_environment, "max_failures": 1},
        "fine": {"command": echo_command()},
    }
    proxy = await start_proxy(nursery, servers)
    expected = {
        "cmd": "the command callable failed: RuntimeError: no licence for port ",
        "env": "the environment callable failed: KeyError: 'HOME_OF_TOOL'",
    }
    async with proxy.client() as client:
        for name, message in expected.items():
            response = await client.get(f"{name}/")
            assert response.status_code == 503, name
            assert message in response.json()["message"]
            status = (await client.get(f"{API}/{name}")).json()
            assert status["state"] == "failed" and message in status["reason"]
            assert message in (await client.get(f"{API}/{name}/logs")).text
            assert (await client.get(f"{name}/", headers={"Accept": "text/html"})).status_code == 503
        assert (await client.get("fine/x")).status_code == 200  # the proxy itself lives on
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    for name, message in expected.items():
        assert any(line.startswith(f"{name}: cannot start: ") and message in line for line in logged), logged


async def test_server_not_ready_in_time_is_504_and_can_be_stopped(nursery: trio.Nursery) -> None:
    command = [PY, "-c", "import time; time.sleep(60)"]
    proxy = await start_proxy(nursery, {"slow": {"command": command, "timeout": 0.5}})
    async with proxy.client() as client:
        pids: list[int] = []
        supervisor = proxy.supervisors["slow"]

        async def note_pids() -> None:
            while True:
                if supervisor.pid is not None and supervisor.pid not in pids:
                    pids.append(supervisor.pid)
                await trio.sleep(0.01)

        nursery.start_soon(note_pids)
        response = await client.post(f"{API}/slow/start")
        assert response.status_code == 504 and "still starting after 0.5 s" in response.json()["message"]
        assert (await server_status(client, "slow"))["state"] == "starting"  # the start goes on
        stopped = await client.delete(f"{API}/slow")
        assert stopped.json()["state"] == "stopped"
    # The process still starting was stopped by the API, and is gone.
    assert pids and not any(pid_alive(pid) for pid in pids)


async def test_a_server_without_command_cannot_be_controlled(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"ext": {"port": free_port()}})
    async with proxy.client() as client:
        status = await server_status(client, "ext")
        assert status["managed"] is False and status["state"] == "ready"
        for method, path in [("POST", f"{API}/ext/start"), ("POST", f"{API}/ext/restart"), ("DELETE", f"{API}/ext")]:
            response = await client.request(method, path)
            assert response.status_code == 409
            assert "has no command" in response.json()["message"]


async def test_cross_origin_control_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path)})
    host = proxy.url.split("/")[2]
    async with proxy.client() as client:
        for method, path in [("POST", f"{API}/web/start"), ("DELETE", f"{API}/web")]:
            response = await client.request(method, path, headers={"Origin": "http://evil.example"})
            assert response.status_code == 403
            assert response.json()["message"] == "Cross-origin request refused."
        assert proxy.supervisors["web"].state is State.STOPPED
        response = await client.post(f"{API}/web/start", headers={"Origin": f"http://{host}"})
        assert response.status_code == 200


# -- logs ---------------------------------------------------------------------------------------


async def test_logs_are_the_recent_output_with_secrets_masked(nursery: trio.Nursery) -> None:
    script = f"print('one'); print('url: http://x/?token={TOKEN}'); print('three', flush=True)"
    command = [PY, "-c", script + "; import time; time.sleep(60)"]
    proxy = await start_proxy(nursery, {"talk": {"command": command, "timeout": 0.3}})
    async with proxy.client() as client:
        assert (await client.post(f"{API}/talk/start", params={"wait": "0"})).status_code == 202
        await wait_for(lambda: proxy.supervisors["talk"].output.total == 3)
        response = await client.get(f"{API}/talk/logs")
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.text == "one\nurl: http://x/?token=[secret]\nthree\n"
        assert TOKEN not in response.text
        assert (await client.get(f"{API}/talk/logs", params={"tail": "1"})).text == "three\n"
        assert (await client.get(f"{API}/talk/logs", params={"tail": "0"})).text == ""
        response = await client.get(f"{API}/talk/logs", params={"tail": "many"})
        assert response.status_code == 400 and "tail must be a number" in response.json()["message"]
        await client.delete(f"{API}/talk")


async def test_logs_follow_streams_new_lines(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path)})
    host, port = proxy.url.split("/")[2].split(":")
    async with proxy.client() as client:
        await client.post(f"{API}/web/start")
        with trio.fail_after(10):
            # A plain socket, to read the endless stream as it comes.
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                head = f"GET /{API}/web/logs?follow=1 HTTP/1.1\r\nHost: x\r\nAuthorization: token {TOKEN}\r\n\r\n"
                await stream.send_all(head.encode())
                received = b""
                while b"serving on" not in received:
                    received += await stream.receive_some()
                assert received.startswith(b"HTTP/1.1 200")
                # The backend logs each request it serves; that line arrives while we follow.
                assert (await client.get("web/followed")).status_code == 404
                while b"GET /followed" not in received:
                    received += await stream.receive_some()


# -- metrics and the access log ------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, checked by the reference parser of Prometheus's text format."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_requests_bytes_starts_and_states(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"echo": {"command": echo_command()}, "idle": {"command": echo_command()}})
    async with proxy.client() as client:
        assert (await client.get("echo/a")).status_code == 200
        assert (await client.put("echo/upload", content=b"x" * 1000)).status_code == 200
        assert (await client.get("echo/status/404")).status_code == 404
        download = await client.get("echo/bytes", params={"size": "5000"})
        backend_port = proxy.supervisors["echo"].port
        assert (await client.get(f"proxy/{backend_port}/direct")).status_code == 200
        response = await client.get("server-proxy/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(response.text)

    def value(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted(labels.items())))]

    assert value("trioproxy_http_requests_total", server="echo", status_class="2xx") == 3
    assert value("trioproxy_http_requests_total", server="echo", status_class="4xx") == 1
    assert value("trioproxy_http_requests_total", server="proxy", status_class="2xx") == 1
    assert value("trioproxy_http_request_bytes_total", server="echo", status_class="2xx") == 1000
    assert value("trioproxy_http_response_bytes_total", server="echo", status_class="2xx") > len(download.content)
    assert value("trioproxy_server_state", server="echo", state="ready") == 1
    assert value("trioproxy_server_state", server="echo", state="stopped") == 0
    assert value("trioproxy_server_state", server="idle", state="stopped") == 1
    assert value("trioproxy_server_starts_total", server="echo") == 1
    assert value("trioproxy_server_restarts_total", server="echo") == 0
    assert value("trioproxy_server_start_seconds_count", server="echo") == 1
    assert value("trioproxy_server_start_seconds_bucket", server="echo", le="+Inf") == 1
    assert value("trioproxy_server_start_seconds_count", server="idle") == 0
    assert 0 < value("trioproxy_server_start_seconds_sum", server="echo") < 10


async def test_metrics_count_restarts_after_a_crash(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path)})
    async with proxy.client() as client:
        pid = (await client.post(f"{API}/web/start")).json()["pid"]
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: proxy.supervisors["web"].restarts == 1)
        await wait_for_state(proxy, client, "web", "ready")
        found = samples((await client.get("server-proxy/metrics")).text)
    assert found[("trioproxy_server_restarts_total", (("server", "web"),))] == 1
    assert found[("trioproxy_server_starts_total", (("server", "web"),))] == 2
    assert found[("trioproxy_server_start_seconds_count", (("server", "web"),))] == 2


async def test_metrics_count_open_websockets(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"ws": {"command": ws_echo_command("{port}"), "timeout": 20}})

    async def websockets() -> tuple[float, float]:
        async with proxy.client() as client:
            found = samples((await client.get("server-proxy/metrics")).text)
        return (
            found[("trioproxy_websockets_open", (("server", "ws"),))],
            found[("trioproxy_websockets_total", (("server", "ws"),))],
        )

    assert await websockets() == (0, 0)
    with trio.fail_after(20):
        async with open_ws(proxy.url, "ws/echo") as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            assert await websockets() == (1, 1)
        await wait_for(lambda: proxy.app.extensions["trioproxy"].metrics.websockets_open["ws"] == 0)
    assert await websockets() == (0, 1)


async def test_metrics_text_escapes_labels_and_formats_numbers() -> None:
    metrics = Metrics()
    metrics.request_done('we"ird\\na\nme', 200, 10, 20)
    metrics.request_done("x", 0, 0, 0)  # the client left before any response
    text = render(metrics, {})
    assert 'server="we\\"ird\\\\na\\nme"' in text
    found = samples(text)
    assert found[("trioproxy_http_requests_total", (("server", 'we"ird\\na\nme'), ("status_class", "2xx")))] == 1
    assert found[("trioproxy_http_requests_total", (("server", "x"), ("status_class", "none")))] == 1


async def test_access_log_has_one_line_per_request_without_the_token(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(nursery, {"echo": {"command": echo_command()}})
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        response = await client.get("echo/hello", params={"token": TOKEN, "x": "1"})
        await client.get(f"{API}/echo", headers=proxy.headers)
    async with httpx.AsyncClient(base_url=proxy.url) as client:  # without the cookie
        await client.get("echo/nothing-without-token")

    def access_records() -> list[logging.LogRecord]:
        return [record for record in caplog.records if record.name == "trioproxy.access"]

    # A line is written once the request's handler ends, a moment after the client has it all.
    await wait_for(lambda: len(access_records()) == 3)
    records = access_records()
    first, second, third = (record.getMessage() for record in records)
    assert first.startswith(f"GET /echo/hello?x=1 200 {len(response.content)} B ")
    assert first.endswith(" ms")
    assert records[0].status == 200 and records[0].path == "/echo/hello?x=1"  # type: ignore[attr-defined]
    assert second.startswith(f"GET /{API}/echo 200 ")
    assert third.startswith("GET /echo/nothing-without-token 403 ")
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


async def test_access_log_has_websockets(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    proxy = await start_proxy(nursery, {"ws": {"command": ws_echo_command("{port}"), "timeout": 20}})
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    with trio.fail_after(20):
        async with open_ws(proxy.url, "ws/echo") as ws:
            await ws.send_message("hi")
            await ws.get_message()
        await wait_for(lambda: any(r.name == "trioproxy.access" for r in caplog.records))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "trioproxy.access"]
    assert line.startswith("WEBSOCKET /ws/echo 101 - ")


# -- activity and idle culling --------------------------------------------------------------------


async def counted_as_activity(proxy: Proxy, client: httpx.AsyncClient, name: str, path: str, **kwargs: Any) -> bool:
    """Whether a request to ``path``, sent a second after the last one, counted as activity.

    Counted, the server was touched during the request, so it reports no more idleness than
    the request took; not counted, at least the second before it. Durations are compared with
    each other, not with fixed bounds, so a slow machine does not change the answer."""
    gap = 1.0
    await trio.sleep(gap)
    sent = trio.current_time()
    assert (await client.get(f"{name}/{path}", **kwargs)).status_code < 500
    took = trio.current_time() - sent
    idle = proxy.supervisors[name].status()["idle_seconds"]
    if idle <= took + 0.05:
        return True
    assert idle >= gap, f"idle for {idle:.3f} s after a request that took {took:.3f} s"
    return False


async def test_http_traffic_is_activity_unless_configured_otherwise(nursery: trio.Nursery) -> None:
    servers: dict[str, dict[str, Any]] = {
        "counted": {"command": echo_command()},
        "ignored": {"command": echo_command(), "update_last_activity": False},
        "polling": {"command": echo_command(), "exclude_last_activity_patterns": [r".*/busy-poller$"]},
    }
    proxy = await start_proxy(nursery, servers)
    async with proxy.client() as client:
        for name in servers:
            await client.post(f"{API}/{name}/start")
        assert await counted_as_activity(proxy, client, "counted", "work")
        assert not await counted_as_activity(proxy, client, "ignored", "work")
        assert not await counted_as_activity(proxy, client, "polling", "api/busy-poller")
        # The pattern must match from the start of the full path: here it does not.
        assert await counted_as_activity(proxy, client, "polling", "api/busy-poller/not")
        assert await counted_as_activity(proxy, client, "polling", "work")


async def test_an_activity_callable_decides_with_the_request(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, str, str | None]] = []

    def counts(request: Any) -> bool:
        seen.append((request.method, request.path, request.headers.get("X-Robot")))
        return request.headers.get("X-Robot") is None

    def broken(request: Any) -> bool:
        raise RuntimeError("oops")

    servers = {"app": {"command": echo_command(), "update_last_activity": counts}}
    servers["broken"] = {"command": echo_command(), "update_last_activity": broken}
    proxy = await start_proxy(nursery, servers)
    async with proxy.client() as client:
        await client.post(f"{API}/app/start")
        await client.post(f"{API}/broken/start")
        assert await counted_as_activity(proxy, client, "app", "page")
        assert not await counted_as_activity(proxy, client, "app", "ping", headers={"X-Robot": "1"})
        # A callable that fails counts every request, and says so once.
        assert await counted_as_activity(proxy, client, "broken", "a")
        assert await counted_as_activity(proxy, client, "broken", "b")
    assert seen == [("GET", "/app/page", None), ("GET", "/app/ping", "1")]
    errors = [r.getMessage() for r in caplog.records if "update_last_activity failed" in r.getMessage()]
    assert errors == ["broken: update_last_activity failed (RuntimeError: oops); counting every request as activity"]


def _ignore_when_asked(request: Any) -> bool:
    # What jupyter-server-proxy 4.6.0's own test configuration does; it is handed a Tornado
    # request handler there.
    if request.get_argument("ignore_activity", None):
        return False
    return True


async def test_an_activity_callable_written_for_jupyter_server_proxy_works(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(nursery, {"app": {"command": echo_command(), "update_last_activity": _ignore_when_asked}})
    async with proxy.client() as client:
        await client.post(f"{API}/app/start")
        assert await counted_as_activity(proxy, client, "app", "tracked")
        assert not await counted_as_activity(proxy, client, "app", "tracked?ignore_activity=1")
        assert await counted_as_activity(proxy, client, "app", "tracked?ignore_activity=")
    assert not [r for r in caplog.records if "update_last_activity failed" in r.getMessage()]


async def test_an_activity_callable_gets_what_a_tornado_handler_offers(nursery: trio.Nursery) -> None:
    seen: dict[str, Any] = {}

    def record(handler: Any) -> bool:
        request = handler.request
        seen.update(
            uri=request.uri,
            path=request.path,
            query=request.query,
            method=request.method,
            host=request.host,
            host_name=request.host_name,
            remote_ip=request.remote_ip,
            protocol=request.protocol,
            arguments=request.arguments,
            header=request.headers.get("X-Thing"),
            last_a=handler.get_argument("a"),
            all_a=handler.get_arguments("a"),
            b=handler.get_query_argument("b"),
            unstripped=handler.get_query_arguments("b", strip=False),
            missing=handler.get_argument("missing", "default"),
            body=handler.get_body_arguments("a"),
        )
        try:
            handler.get_argument("missing")
        except Exception as exc:  # Tornado raises MissingArgumentError, an HTTP 400
            seen["error"] = type(exc).__name__
        return True

    proxy = await start_proxy(nursery, {"app": {"command": echo_command(), "update_last_activity": record}})
    async with proxy.client(headers={"X-Thing": "t"}) as client:
        assert (await client.get("app/x%20y?a=1&a=%C3%A5%01&b=+spaced+")).status_code == 200
    host = proxy.url.split("/")[2]
    assert seen == {
        "uri": "/app/x%20y?a=1&a=%C3%A5%01&b=+spaced+",
        "path": "/app/x%20y",
        "query": "a=1&a=%C3%A5%01&b=+spaced+",
        "method": "GET",
        "host": host,
        "host_name": "127.0.0.1",
        "remote_ip": "127.0.0.1",
        "protocol": "http",
        "arguments": {"a": [b"1", b"\xc3\xa5\x01"], "b": [b" spaced "]},
        "header": "t",
        "last_a": "å",
        "all_a": ["1", "å"],
        "b": "spaced",
        "unstripped": [" spaced "],
        "missing": "default",
        "body": [],
        "error": "MissingArgumentError",
    }


async def test_websocket_messages_are_activity_unless_excluded(nursery: trio.Nursery) -> None:
    config = {"command": ws_echo_command("{port}"), "timeout": 20, "exclude_last_activity_patterns": [".*/quiet/"]}
    proxy = await start_proxy(nursery, {"ws": config})
    supervisor = proxy.supervisors["ws"]
    with trio.fail_after(20):
        for path, counted in [("ws/echo", True), ("ws/quiet/echo", False)]:
            async with open_ws(proxy.url, path) as ws:
                await trio.sleep(0.3)
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
                assert (supervisor.status()["idle_seconds"] < 0.2) is counted


async def test_an_idle_server_is_stopped_and_the_next_request_starts_it(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"web": backend(tmp_path, idle_timeout=0.6)})
    async with proxy.client() as client:
        assert (await client.get("web/")).status_code == 200
        first = proxy.supervisors["web"].pid
        assert first is not None
        began = trio.current_time()
        stopped = await wait_for_state(proxy, client, "web", "stopped", timeout=5)
        assert trio.current_time() - began >= 0.5  # not before it was idle that long
        assert stopped["reason"] == "idle for 0.6 s"  # exact schedule: test_idle_culling_on_virtual_time
        assert stopped["pid"] is None and not pid_alive(first)
        assert (await client.get("web/")).status_code == 200
        assert proxy.supervisors["web"].pid not in (None, first)


async def test_requests_keep_a_server_alive_but_excluded_ones_do_not(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = backend(tmp_path, idle_timeout=0.6, exclude_last_activity_patterns=[".*/poll$"])
    proxy = await start_proxy(nursery, {"web": config})
    supervisor = proxy.supervisors["web"]
    async with proxy.client() as client:
        await client.get("web/")
        pid = supervisor.pid
        for _ in range(8):  # 1.2 s of use, twice the idle timeout
            await trio.sleep(0.15)
            assert (await client.get("web/")).status_code == 200
        assert supervisor.pid == pid and supervisor.state is State.READY
        # Counted, the polls would keep it alive for ever; excluded, it is culled.
        with trio.fail_after(30):
            while supervisor.state is State.READY:
                await client.get("web/poll")
                await trio.sleep(0.1)


async def test_a_long_response_counts_as_activity_until_it_ends(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"echo": {"command": echo_command()}})
    supervisor = proxy.supervisors["echo"]
    async with proxy.client() as client:
        await client.post(f"{API}/echo/start")
        assert (await client.get("echo/slow", params={"delay": "0.5"})).status_code == 200
    # Touched once more as the handler ends, a moment after the client has the response.
    await wait_for(lambda: supervisor.status()["idle_seconds"] < 0.2, timeout=1)


# -- the launcher page (its HTML; the browser test drives it) -------------------------------------


async def test_launcher_lists_enabled_servers_with_relative_urls(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "icon.svg").write_bytes(SVG)
    servers: dict[str, dict[str, Any]] = {
        "web": {
            "command": echo_command(),
            "launcher_entry": {"title": "Web <App>", "icon_path": str(tmp_path / "icon.svg"), "category": "Tools"},
        },
        "off": {"command": echo_command(), "launcher_entry": {"enabled": False}},
        "same-tab": {"command": echo_command(), "new_browser_tab": False, "launcher_entry": {"path_info": "x:1/"}},
    }
    proxy = await start_proxy(nursery, servers, base_url="/lab/")
    async with proxy.client() as client:
        page = await client.get("", headers={"Accept": "text/html", "X-Forwarded-Prefix": "/outer"})
        script = await client.get("server-proxy/static/launcher.js")
        style = await client.get("server-proxy/static/launcher.css")
        missing = await client.get("server-proxy/static/nothing.js")
        not_static = await client.get("server-proxy/static/launcher.py")
        escape = await client.get("server-proxy/static/..%2f..%2fapi.py")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert "data-server='web'" in html and "data-server='same-tab'" in html and "data-server='off'" not in html
    assert "Web &lt;App&gt;" in html and "<h2>Tools</h2>" in html
    # jupyter-server-proxy's default category, "Notebook", is headed as what it is here.
    assert "<h2>Servers</h2>" in html and "Notebook" not in html
    assert "src='server-proxy/icon/web'" in html
    assert "href='./web/' target='_blank'" in html and "href='./x:1/'>" in html
    # Relative URLs only, right under any base URL and behind any prefix; behind a prefix that
    # another proxy announced, a <base> also pins them to it (for URLs without the last slash).
    assert "<base href='/outer/lab/'>" in html
    assert html.count("/lab/") == 1 and html.count("/outer") == 1
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert script.headers["cache-control"] == "no-cache" and script.headers["x-content-type-options"] == "nosniff"
    assert [missing.status_code, not_static.status_code, escape.status_code] == [404, 404, 404]


async def test_launcher_base_only_for_an_announced_safe_prefix(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"web": {"command": echo_command()}})
    async with proxy.client(headers={"Accept": "text/html"}) as client:
        plain = (await client.get("")).text
        hostile = (await client.get("", headers={"X-Forwarded-Prefix": "//evil.example/x"})).text
        quoted = (await client.get("", headers={"X-Forwarded-Prefix": "/a'><script>"})).text
    assert "<base" not in plain and "<base" not in hostile and "<base" not in quoted
    assert "<script>" not in quoted


async def test_launcher_without_servers(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {})
    async with proxy.client() as client:
        page = await client.get("")
    assert "No servers are configured." in page.text


def test_timestamps_are_utc() -> None:
    from trioproxy.api import _timestamp_ago

    stamp = _timestamp_ago(60.0)
    assert stamp.endswith("Z")
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert 59 < (datetime.now(timezone.utc) - moment).total_seconds() < 61
