"""A reload is a boundary: whatever fails in it is logged and reported, changes only what it
says, and stops no server the plan did not stop; trioproxy lives on."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import PY, ProxyProcess, echo_command, launch_trioproxy, pid_alive, start_proxy, wait_for
from trioproxy.config import ConfigError, Reloader, ReloadError, load_server

pytestmark = pytest.mark.timeout(90)
TOKEN = "boundary-token"


def write(config: Path, servers: dict[str, dict[str, Any]]) -> None:
    config.write_text(f"c.ServerProxy.servers = {servers!r}\n")


def states(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {server["name"]: server for server in client.get("server-proxy/api/servers").json()["servers"]}


def wait_until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def reload_command(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "trioproxy", "reload"], capture_output=True, text=True, env=env, timeout=60)


def test_a_bad_value_in_a_reload_keeps_the_running_server(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    runtime = tmp_path / "runtime"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    config = tmp_path / "config.py"
    write(config, {"one": {"command": echo_command()}})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config)], env=env)
    proxy_processes.append(proxy)
    with httpx.Client(base_url=proxy.base, headers={"Authorization": f"token {TOKEN}"}, timeout=30) as client:
        assert client.get("one/").status_code == 200
        pid = states(client)["one"]["pid"]
        write(
            config,
            {
                "one": {"command": echo_command(), "timeout": -1},
                "two": {"command": echo_command(), "request_headers_override": {"X Who": "me"}},
                "three": {"command": echo_command()},
            },
        )
        result = client.post("server-proxy/api/reload").json()
        assert (result["added"], result["changed"], result["unchanged"]) == (["two", "three"], [], ["one"])
        assert result["invalid"]["one"].startswith("server 'one': option 'timeout': must be a number of seconds above 0")
        assert result["invalid"]["one"].endswith("(its running settings are kept)")
        assert result["invalid"]["two"].startswith("server 'two': option 'request_headers_override': header name 'X Who'")
        assert client.get("one/").status_code == 200 and states(client)["one"]["pid"] == pid
        refused = client.get("two/")
        assert refused.status_code == 503 and "option 'request_headers_override'" in refused.json()["message"]
        assert client.get("three/").status_code == 200

        # The command says so too, and fails.
        result_cli = reload_command(env)
        assert result_cli.returncode == 1
        assert "trioproxy reload: server 'one': option 'timeout'" in result_cli.stderr
        assert "trioproxy reload: server 'two': option 'request_headers_override'" in result_cli.stderr

        # Fixed: the failed server is replaced by a working one; the running one is untouched.
        write(config, {"one": {"command": echo_command()}, "two": {"command": echo_command()}, "three": {"command": echo_command()}})
        result = client.post("server-proxy/api/reload").json()
        assert (result["changed"], sorted(result["unchanged"]), "invalid" in result) == (["two"], ["one", "three"], False)
        assert client.get("two/").status_code == 200
        assert states(client)["one"]["pid"] == pid
    assert proxy.process.poll() is None


def test_a_change_that_cannot_be_applied_is_reported_and_the_rest_applied(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    runtime = tmp_path / "runtime"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "TMPDIR": str(temporary)}
    config = tmp_path / "config.py"
    # A private socket directory is made in TMPDIR when a server is set up; the first one
    # fixes the temporary directory for trioproxy's whole run (tempfile keeps it).
    write(config, {"sock": {"command": echo_command(unix=True), "unix_socket": True}, "web": {"command": echo_command()}})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config)], env=env)
    proxy_processes.append(proxy)
    with httpx.Client(base_url=proxy.base, headers={"Authorization": f"token {TOKEN}"}, timeout=30) as client:
        assert client.get("web/").status_code == 200
        web_pid = states(client)["web"]["pid"]
        shutil.rmtree(temporary)  # so no new socket directory can be made: a real OSError
        servers = {
            "sock": {"command": echo_command(unix=True), "unix_socket": True},
            "sock2": {"command": echo_command(unix=True), "unix_socket": True},
            "web": {"command": echo_command(), "environment": {"V": "2"}},
            "added": {"command": echo_command()},
        }
        write(config, servers)
        refused = client.post("server-proxy/api/reload")
        assert refused.status_code == 500
        message = refused.json()["message"]
        assert message.startswith("Reload failed: server 'sock2': could not add it: FileNotFoundError")
        assert message.endswith("the other changes were applied")
        listed = states(client)
        assert set(listed) == {"sock", "web", "added"}
        assert client.get("added/").status_code == 200
        assert client.get("web/").status_code == 200
        assert states(client)["web"]["pid"] not in (None, web_pid)  # restarted with its change
        assert not pid_alive(web_pid)

        # The command prints it; SIGHUP logs it; trioproxy lives on either way.
        result = reload_command(env)
        assert result.returncode == 1
        assert result.stderr.startswith("trioproxy reload: Reload failed: server 'sock2': could not add it: FileNotFoundError")
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: proxy.output().count("reload: could not add server 'sock2'") >= 3)
        assert client.get("added/").status_code == 200
    assert proxy.process.poll() is None
    assert "Traceback" in proxy.output()  # logged with it, once per failed reload


# -- in-process ------------------------------------------------------------------------------------


async def test_an_action_that_raises_in_the_supervisors_nursery_ends_only_itself(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(nursery, {"web": {"command": echo_command()}})
    async with proxy.client() as client:
        assert (await client.get("web/")).status_code == 200
        pid = proxy.supervisors["web"].pid

        async def broken() -> None:
            raise RuntimeError("a bug in a reload")

        with caplog.at_level(logging.ERROR):
            proxy.supervisors.spawn(broken)
            await wait_for(lambda: "a reconfiguration failed" in caplog.text)
        assert "RuntimeError: a bug in a reload" in caplog.text
        assert (await client.get("web/")).status_code == 200
        assert proxy.supervisors["web"].pid == pid


class _Uncomparable:
    def __eq__(self, other: object) -> bool:
        raise TypeError("cannot compare")

    __hash__ = object.__hash__


def _settings(**extra: Any) -> dict[str, Any]:
    return {"command": echo_command(), **extra}


def _rewrite_with_a_default() -> Any:
    # A config file read again makes the same function anew: same code, new default objects.
    def rewrite(response: Any, marker: Any = _Uncomparable()) -> None:  # noqa: B008
        pass

    return rewrite


async def test_settings_that_cannot_be_compared_count_as_changed(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"web": _settings(rewrite_response=_rewrite_with_a_default()), "other": _settings()})
    servers = {"web": load_server("web", _settings(rewrite_response=_rewrite_with_a_default())), "other": load_server("other", _settings())}
    result = await Reloader(lambda: servers, proxy.supervisors).reload()
    assert (result["changed"], result["unchanged"]) == (["web"], ["other"])
    assert proxy.supervisors["web"].process is servers["web"]


async def test_a_failing_load_of_any_kind_changes_nothing(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {"web": _settings()})
    async with proxy.client() as client:
        assert (await client.get("web/")).status_code == 200
    before = proxy.supervisors["web"]

    def broken() -> dict[str, Any]:
        raise KeyError("ServerProxy")

    with pytest.raises(ConfigError, match="KeyError"):
        await Reloader(broken, proxy.supervisors).reload()
    assert proxy.supervisors["web"] is before and before.state.value == "ready"

    # A load that returns nonsense fails the plan, not the supervisors.
    with pytest.raises(ReloadError, match="nothing changed: cannot plan it"):
        await Reloader(lambda: {"web": object()}, proxy.supervisors).reload()  # type: ignore[dict-item]
    assert proxy.supervisors["web"] is before and before.state.value == "ready"


SLOW_START = 1.0


def slow_command() -> list[str]:
    script = Path(__file__).parent / "backends" / "echo.py"
    return ["sh", "-c", f"sleep {SLOW_START}; exec {PY} {script} {{port}}"]


@pytest.mark.parametrize("change", ["unchanged", "changed"])
async def test_a_reload_while_a_server_starts_does_not_break_it(nursery: trio.Nursery, change: str) -> None:
    settings: dict[str, dict[str, Any]] = {"slow": {"command": slow_command(), "timeout": 20}, "other": _settings()}
    proxy = await start_proxy(nursery, settings)
    first = proxy.supervisors["slow"]
    answers: list[int] = []

    async def request() -> None:
        async with proxy.client() as client:
            answers.append((await client.get("slow/")).status_code)

    nursery.start_soon(request)
    await wait_for(lambda: first.pid is not None)  # starting: its process runs, not ready yet
    assert first.state.value == "starting"
    new_slow = {**settings["slow"], "environment": {"V": "2"}} if change == "changed" else settings["slow"]
    servers = {"slow": load_server("slow", new_slow), "other": load_server("other", _settings(environment={"V": "2"}))}
    result = await Reloader(lambda: servers, proxy.supervisors).reload()
    assert "slow" in result[change] and "other" in result["changed"]
    await wait_for(lambda: bool(answers), timeout=30)
    slow = proxy.supervisors["slow"]
    if change == "unchanged":
        assert slow is first and answers == [200] and slow.starts == 1
    else:
        # The request waiting on the old process is told it was stopped (503) or, if the old
        # process was ready first, answered; the server itself comes up on its new settings.
        assert answers[0] in (200, 503)
        assert slow is not first and first.pid is None
    async with proxy.client() as client:
        assert (await client.get("slow/")).status_code == 200
        assert (await client.get("other/")).status_code == 200
    assert slow.state.value == "ready" and slow.pid is not None and pid_alive(slow.pid)


async def test_a_supervisor_that_fails_ends_alone_and_a_reload_brings_it_back(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    from trioproxy.health import HealthCheck

    proxy = await start_proxy(nursery, {"web": _settings(), "other": _settings()})
    crashing = proxy.supervisors["web"]
    # A health check path httpx refuses to build a URL from (the configuration would refuse
    # it; set here after loading, it makes the supervisor's own code raise for real).
    crashing.health_check = HealthCheck(path="/\x00", interval=0.05)
    async with proxy.client() as client:
        assert (await client.get("web/")).status_code == 200
        pid = crashing.pid
        await wait_for(lambda: proxy.supervisors["web"] is not crashing)
        assert "web: supervisor failed; the server is out of service" in caplog.text
        assert pid is not None and not pid_alive(pid)
        response = await client.get("web/")
        assert response.status_code == 503
        assert "trioproxy's supervisor failed: InvalidURL" in response.json()["message"]
        assert (await client.get("other/")).status_code == 200
        servers = {"web": load_server("web", _settings()), "other": proxy.supervisors["other"].process}
        result = await Reloader(lambda: servers, proxy.supervisors).reload()
        assert (result["changed"], result["unchanged"]) == (["web"], ["other"])
        assert (await client.get("web/")).status_code == 200
