"""Live reconfiguration: SIGHUP and POST server-proxy/api/reload on a real trioproxy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PY, ProxyProcess, echo_command, launch_trioproxy, pid_alive
from trioproxy.config import make_server_process, plan_reload

pytestmark = pytest.mark.timeout(90)
TOKEN = "reload-token"


def write(config: Path, servers: dict[str, dict[str, Any]], extra: str = "") -> None:
    config.write_text(f"c.ServerProxy.servers = {servers!r}\n{extra}")


def api(proxy: ProxyProcess) -> httpx.Client:
    return httpx.Client(base_url=proxy.base, headers={"Authorization": f"token {TOKEN}"}, timeout=30)


def states(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {server["name"]: server for server in client.get("server-proxy/api/servers").json()["servers"]}


def wait_until(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_plan_compares_settings_not_objects() -> None:
    def rewrite(response: Any) -> None:
        pass

    def rewrite_again(response: Any) -> None:  # the same code, read again
        pass

    old = {
        "a": make_server_process("a", {"command": ["x"], "rewrite_response": rewrite}),
        "b": make_server_process("b", {"command": ["x"], "launcher_entry": {"title": "B"}}),
        "c": make_server_process("c", {"command": ["x"]}),
    }
    new = {
        "a": make_server_process("a", {"command": ["x"], "rewrite_response": rewrite}),
        "b": make_server_process("b", {"command": ["x"], "launcher_entry": {"title": "B2"}}),
        "d": make_server_process("d", {"command": ["x"]}),
    }
    plan = plan_reload(old, new)
    assert (plan.added, plan.removed, plan.changed, plan.unchanged) == (["d"], ["c"], ["b"], ["a"])
    assert rewrite.__code__ != rewrite_again.__code__  # different names: a change
    changed = {"a": make_server_process("a", {"command": ["x"], "rewrite_response": rewrite_again})}
    assert plan_reload({"a": old["a"]}, changed).changed == ["a"]


def test_sighup_adds_removes_restarts_and_leaves_the_rest(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "config.py"
    write(config, {name: {"command": echo_command()} for name in ("changes", "stays", "goes")})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config)])
    proxy_processes.append(proxy)
    with api(proxy) as client:
        for name in ("changes", "stays", "goes"):
            assert client.get(f"{name}/").status_code == 200
        before = states(client)
        # A response under way on the unchanged server, across the reload.
        events: list[str] = []

        def stream() -> None:
            with client.stream("GET", "stays/sse?n=20&delay=0.1") as response:
                events.extend(line for line in response.iter_lines() if line.startswith("data:"))

        reader = threading.Thread(target=stream)
        reader.start()
        write(
            config,
            {
                "changes": {"command": echo_command(), "environment": {"NEW": "1"}},
                "stays": {"command": echo_command()},
                "added": {"command": echo_command(), "launcher_entry": {"title": "Added"}},
            },
        )
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: set(states(client)) == {"changes", "stays", "added"})
        wait_until(lambda: states(client)["changes"]["state"] == "ready")
        after = states(client)
        reader.join(15)
        assert len(events) == 20  # the stream ran to its end
        assert after["stays"]["pid"] == before["stays"]["pid"]
        assert after["changes"]["pid"] != before["changes"]["pid"]
        assert not pid_alive(before["changes"]["pid"]) and not pid_alive(before["goes"]["pid"])
        assert after["added"]["state"] == "stopped"  # started on first use, like any server
        assert client.get("added/").status_code == 200
        assert client.get("goes/").status_code == 404
        assert json.loads(client.get("changes/").text)["method"] == "GET"
    assert "reloading the configuration: added ['added'], removed ['goes'], changed ['changes'], unchanged 1" in proxy.output()


def test_api_reload_and_a_config_that_fails(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "config.py"
    write(config, {"one": {"command": echo_command()}})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config)])
    proxy_processes.append(proxy)
    with api(proxy) as client:
        assert client.get("one/").status_code == 200
        pid = states(client)["one"]["pid"]
        assert client.post("server-proxy/api/reload").json() == {
            "added": [],
            "removed": [],
            "changed": [],
            "unchanged": ["one"],
            "waiting_for_idle": [],
        }
        for content, message in [
            (
                "c.ServerProxy.strict_config = True\nc.ServerProxy.servers = {'one': {'comand': []}}\n",
                "server 'one': unknown option 'comand' (did you mean 'command'?)",
            ),
            ("c.ServerProxy.servers = {\n", "SyntaxError"),
            ("raise RuntimeError('no database')\n", "RuntimeError: no database"),
        ]:
            config.write_text(content)
            refused = client.post("server-proxy/api/reload")
            assert refused.status_code == 400
            assert refused.json()["message"].startswith("Reload failed, nothing changed: config error: ")
            assert message in refused.json()["message"]
            assert states(client)["one"]["pid"] == pid
        config.unlink()
        assert "config file not found" in client.post("server-proxy/api/reload").json()["message"]
        assert client.get("one/").status_code == 200 and states(client)["one"]["pid"] == pid

        cross = client.post("server-proxy/api/reload", headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
        assert client.post("server-proxy/api/reload?when=later").status_code == 400
        assert httpx.post(proxy.base + "server-proxy/api/reload").status_code == 403  # no token
    assert "reload failed, nothing changed: config error: server 'one': unknown option 'comand'" in proxy.output()


def test_changed_server_waits_until_idle_when_asked(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "config.py"
    write(config, {"busy": {"command": echo_command()}})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config)])
    proxy_processes.append(proxy)
    with api(proxy) as client:
        assert client.get("busy/").status_code == 200
        pid = states(client)["busy"]["pid"]
        slow: dict[str, httpx.Response] = {}
        request = threading.Thread(target=lambda: slow.update(r=client.get("busy/slow?delay=1.5")))
        request.start()
        time.sleep(0.3)  # the slow request is under way
        write(config, {"busy": {"command": echo_command(), "environment": {"V": "2"}}})
        result = client.post("server-proxy/api/reload?when=idle").json()
        assert result["changed"] == ["busy"] and result["waiting_for_idle"] == ["busy"]
        assert states(client)["busy"]["pid"] == pid
        request.join(10)
        assert slow["r"].status_code == 200  # finished on the old process
        wait_until(lambda: states(client)["busy"]["pid"] not in (None, pid))
        assert not pid_alive(pid)


def test_reload_command(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    runtime = tmp_path / "runtime"
    config = tmp_path / "config.py"
    write(config, {"one": {"command": echo_command()}})
    proxy = launch_trioproxy(
        ["--port", "0", "--token", TOKEN, "--config", str(config)], env={"JUPYTER_RUNTIME_DIR": str(runtime)}
    )
    proxy_processes.append(proxy)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    write(config, {"one": {"command": echo_command()}, "two": {"command": echo_command()}})
    result = subprocess.run([PY, "-m", "trioproxy", "reload"], capture_output=True, text=True, env=env, timeout=30)
    assert (result.returncode, result.stdout) == (0, "added: two\n")
    config.write_text("oops(\n")
    result = subprocess.run([PY, "-m", "trioproxy", "reload"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("trioproxy reload: Reload failed, nothing changed: config error: cannot load")
