"""Health checks: a hung server is stopped and restarted; requests see a clear end or the
replacement. Real backends that deadlock on a trigger file."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import BACKENDS, PY, TOKEN, pid_alive, start_proxy, wait_for
from trioproxy.backend import Backend
from trioproxy.config import ConfigError, make_server_process
from trioproxy.health import FailureStreak, HealthCheck, probe

pytestmark = pytest.mark.timeout(60)


def hangs(trigger: Path, *extra: str) -> list[str]:
    return [PY, str(BACKENDS / "hangs.py"), "{port}", str(trigger), *extra]


# -- the option and the logic ---------------------------------------------------------------


def test_option_defaults_and_errors() -> None:
    assert make_server_process("s", {"command": ["x"]}).health is None
    assert make_server_process("s", {"command": ["x"], "health_check": True}).health == HealthCheck()
    check = make_server_process("s", {"command": ["x"], "health_check": {"path": "/h", "timeout": 1, "failures": 2}}).health
    assert check == HealthCheck(path="/h", interval=10.0, timeout=1.0, failures=2)
    with pytest.raises(ConfigError, match=r"server 's': option 'health_check': unknown health_check option 'intervall'"):
        make_server_process("s", {"health_check": {"intervall": 1}})
    with pytest.raises(ConfigError, match="timeout must be a number of seconds above 0, got -1"):
        make_server_process("s", {"health_check": {"timeout": -1}})
    with pytest.raises(ConfigError, match="path must be a string starting with '/'"):
        make_server_process("s", {"health_check": {"path": "health"}})


def test_failure_streak_says_why_and_resets_on_success() -> None:
    streak = FailureStreak(HealthCheck(path="/health", failures=3))
    assert streak.failed("timed out") is None
    assert streak.failed("timed out") is None
    assert streak.failed("timed out") == "GET /health timed out 3 times"
    assert streak.failed("timed out") is None  # counting starts afresh for the next process
    streak.passed()
    assert streak.failed("answered 500") is None
    streak.passed()  # a success in between: not in a row
    assert streak.failed("answered 500") is None
    assert streak.failed("timed out") is None
    assert streak.failed("was refused") == "GET /health failed 3 times in a row (last: was refused)"
    once = FailureStreak(HealthCheck(failures=1))
    assert once.failed("was refused") == "connect was refused once"


async def test_probe_times_out_at_its_timeout(autojump_clock: trio.abc.Clock) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def accept_and_say_nothing() -> None:
        while True:
            accepted.append(await listeners[0].accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_and_say_nothing)
        began = trio.current_time()
        assert await probe(Backend(port=port), HealthCheck(path="/health", timeout=2.5)) == "timed out"
        assert trio.current_time() - began == pytest.approx(2.5)
        assert await probe(Backend(port=port), HealthCheck(timeout=2.5)) is None  # connecting is enough
        nursery.cancel_scope.cancel()
    for stream in accepted:
        await stream.aclose()
    await listeners[0].aclose()
    assert await probe(Backend(port=port), HealthCheck(timeout=2.5)) == "was refused"


# -- real processes -------------------------------------------------------------------------


async def test_hung_server_is_restarted_and_requests_end_clearly(tmp_path: Path) -> None:
    trigger = tmp_path / "hang"
    check = {"path": "/health", "interval": 0.2, "timeout": 0.5, "failures": 3}
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery, {"h": {"command": hangs(trigger), "health_check": check, "stop_timeout": 1, "timeout": 10}}
        )
        supervisor = proxy.supervisors["h"]
        async with proxy.client() as client:
            first = await client.get("h/")
            assert first.status_code == 200
            pid = supervisor.pid
            assert first.text == f"pid {pid}\n"
            await trio.sleep(0.7)  # a few checks pass
            assert supervisor.state.value == "ready" and supervisor.health_failures == 0

            trigger.write_text("")
            results: dict[str, httpx.Response] = {}

            async def post() -> None:
                results["post"] = await client.post("h/work", content=b"x" * 100)

            with trio.fail_after(15):
                nursery.start_soon(post)
                await wait_for(lambda: not trigger.exists())  # the backend took it: it hangs now
                await supervisor.wait_for_state(supervisor.state.STOPPING)
                assert supervisor.reason == f"unhealthy: GET /health timed out 3 times; stopping pid {pid}"
                # A request arriving now waits for the replacement.
                replacement = await client.get("h/")
                await wait_for(lambda: "post" in results)
            assert replacement.status_code == 200
            assert replacement.text == f"pid {supervisor.pid}\n" and supervisor.pid != pid
            assert not pid_alive(pid)
            # The POST the hung process had taken ends with a clear 502, not a hang.
            assert results["post"].status_code == 502
            assert "h" in results["post"].json()["message"]

            status = (await client.get("server-proxy/api/servers/h")).json()
            assert status["state"] == "ready"
            assert status["restarts"] == 1
            assert status["health"] == {
                "check": "GET /health",
                "interval": 0.2,
                "checks_failed": 3,
                "last_failure": "GET /health timed out",
                "unhealthy": 1,
            }
            metrics = (await client.get("server-proxy/metrics")).text
            assert 'trioproxy_server_unhealthy_total{server="h"} 1\n' in metrics
            assert 'trioproxy_server_health_check_failures_total{server="h"} 3\n' in metrics
        nursery.cancel_scope.cancel()


async def test_server_that_stops_listening_fails_a_connect_check(tmp_path: Path) -> None:
    trigger = tmp_path / "hang"
    check = {"interval": 0.1, "timeout": 0.5, "failures": 2}
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery, {"h": {"command": hangs(trigger, "--stop-listening"), "health_check": check, "stop_timeout": 1}}
        )
        supervisor = proxy.supervisors["h"]
        async with proxy.client() as client:
            assert (await client.get("h/")).status_code == 200
            pid = supervisor.pid
            trigger.write_text("")
            assert (await client.get("h/")).status_code == 200  # this one takes the trigger
            with trio.fail_after(10):
                await supervisor.wait_for_state(supervisor.state.STOPPING)
            # (The first refusal may read "could not connect": trio words a refused connect two ways.)
            reason = supervisor.reason
            assert reason.startswith("unhealthy: connect") and "2 times" in reason, reason
            assert reason.endswith(f"stopping pid {pid}"), reason
            assert (await client.get("h/")).text == f"pid {supervisor.pid}\n"
            assert supervisor.pid != pid
        nursery.cancel_scope.cancel()


async def test_unhealthy_under_restart_never_fails_with_the_reason(tmp_path: Path) -> None:
    trigger = tmp_path / "hang"
    check = {"path": "/health", "interval": 0.1, "timeout": 0.2, "failures": 2}
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery,
            {"h": {"command": hangs(trigger), "health_check": check, "stop_timeout": 1, "restart": "never"}},
        )
        supervisor = proxy.supervisors["h"]
        async with proxy.client() as client:
            assert (await client.get("h/")).status_code == 200
            trigger.write_text("")
            with trio.fail_after(10):
                await supervisor.wait_for_state(supervisor.state.FAILED)
            assert supervisor.reason == (
                "unhealthy: GET /health timed out 2 times; stopped (killed by SIGTERM); not restarting (restart: never)"
            )
            assert supervisor.pid is None
        nursery.cancel_scope.cancel()


async def test_checks_are_not_activity(tmp_path: Path) -> None:
    check = {"path": "/health", "interval": 0.05, "timeout": 1}
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery,
            {"h": {"command": hangs(tmp_path / "never"), "health_check": check, "idle_timeout": 0.6}},
        )
        supervisor = proxy.supervisors["h"]
        async with httpx.AsyncClient(base_url=proxy.url, headers={"Authorization": f"token {TOKEN}"}) as client:
            assert (await client.get("h/")).status_code == 200
            with trio.fail_after(5):
                await supervisor.wait_for_state(supervisor.state.STOPPED)
            assert supervisor.reason == "idle for 0.6 s"
            assert supervisor.health_failures == 0
        nursery.cancel_scope.cancel()
