"""A request's wait (``timeout``) and a process's give-up (``start_timeout``,
``start_quiet_timeout``) are different limits (issue 21): real processes, real sockets, except
the deadline schedule itself, which runs on trio's virtual clock."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trioproxy.config import ConfigError, make_server_process
from trioproxy.cycle import start_deadline
from trioproxy.lifecycle import QuietDeadline, StartDeadline
from trioproxy.process import OutputLog
from trioproxy.supervisor import State

from .conftest import PY, pid_alive, start_proxy

pytestmark = pytest.mark.timeout(120)

# Prints as it loads, records its pid, listens after DELAY seconds (or never, for "never").
SLOW = textwrap.dedent(
    """
    import http.server, os, sys, time
    port, record, delay = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(record, "a") as f:
        f.write(f"{os.getpid()}\\n")
    print("loading model...", flush=True)
    if delay == "never":
        time.sleep(600)
    time.sleep(float(delay))
    print("model loaded", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler).serve_forever()
    """
)


def slow_server(tmp_path: Path, delay: str, **options: Any) -> dict[str, Any]:
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    return {"command": [PY, str(script), "{port}", str(tmp_path / "pids"), delay], "cwd": str(tmp_path), **options}


def pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


# -- the deadline schedule, on virtual time ---------------------------------------------------------


async def test_the_start_deadline_passes_at_start_timeout_exactly(autojump_clock: trio.testing.MockClock) -> None:
    output = OutputLog()
    output.add("from an earlier process")
    began = trio.current_time()
    event = await start_deadline(output, 7, 300)
    assert trio.current_time() - began == pytest.approx(300)
    assert event == StartDeadline(7, 300, "not ready after 300 s (start_timeout)")


async def test_the_quiet_deadline_counts_from_the_last_line(autojump_clock: trio.testing.MockClock) -> None:
    output = OutputLog()
    began = trio.current_time()
    result: list[tuple[float, object]] = []

    async def watch() -> None:
        event = await start_deadline(output, 7, 300, 20)
        result.append((trio.current_time() - began, event))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        for at in (5, 15, 30):  # lines at 5, 15, 30: quiet from 30, so due at 50
            await trio.sleep_until(began + at)
            output.add(f"line at {at}")
    assert result == [(pytest.approx(50), QuietDeadline(7, 20))]


async def test_a_chatty_start_still_ends_at_start_timeout(autojump_clock: trio.testing.MockClock) -> None:
    output = OutputLog()
    began = trio.current_time()
    result: list[tuple[float, object]] = []

    async def watch() -> None:
        event = await start_deadline(output, 7, 60, 20)
        result.append((trio.current_time() - began, event))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        while not result:
            await trio.sleep(10)
            output.add("still loading")
    assert result[0] == (pytest.approx(60), StartDeadline(7, 60, "not ready after 60 s (start_timeout)"))


# -- options ----------------------------------------------------------------------------------------


def test_the_start_options_and_their_defaults() -> None:
    process = make_server_process("web", {"command": ["x"]})
    assert (process.timeout, process.start_timeout, process.start_quiet_timeout) == (5.0, 300.0, 0.0)
    with pytest.raises(ConfigError, match="option 'start_timeout': must be a number of seconds above 0, got 0"):
        make_server_process("web", {"command": ["x"], "start_timeout": 0})
    with pytest.raises(ConfigError, match="option 'start_quiet_timeout': must be a number of seconds 0 or more, got -1"):
        make_server_process("web", {"command": ["x"], "start_quiet_timeout": -1})


# -- real processes ---------------------------------------------------------------------------------


async def test_a_start_longer_than_timeout_is_answered_504_and_goes_on(nursery: trio.Nursery, tmp_path: Path) -> None:
    # The case, under the default options: ready after 8 s, timeout 5 s.
    proxy = await start_proxy(nursery, {"model": slow_server(tmp_path, "8")})
    supervisor = proxy.supervisors["model"]
    async with proxy.client() as client:
        first = await client.get("model/", headers={"Accept": "application/json"})
        assert first.status_code == 504, first.text
        assert first.headers["retry-after"] == "2"
        message = first.json()["message"]
        assert "still starting after 5 s; the start goes on" in message, message
        assert "loading model..." in first.json()["output"]
        assert supervisor.state is State.STARTING and len(pids(tmp_path)) == 1  # not killed
        with trio.fail_after(60):
            await supervisor.wait_for_state(State.READY)
        second = await client.get("model/")
        assert second.status_code == 200
    assert pids(tmp_path) == [supervisor.pid]  # one process, started once
    assert supervisor.starts == 1 and supervisor.restarts == 0


async def test_a_request_after_a_504_finds_the_start_further_on(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"model": slow_server(tmp_path, "3", timeout=1)})
    async with proxy.client() as client:
        statuses = []
        with trio.fail_after(60):
            while not statuses or statuses[-1] == 504:
                statuses.append((await client.get("model/")).status_code)
    assert statuses[-1] == 200 and statuses[0] == 504
    assert len(pids(tmp_path)) == 1


async def test_a_server_never_ready_is_given_up_after_start_timeout(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = slow_server(tmp_path, "never", start_timeout=1, timeout=30, restart="never")
    proxy = await start_proxy(nursery, {"never": server})
    supervisor = proxy.supervisors["never"]
    async with proxy.client() as client:
        response = await client.get("never/")
    # The waiting request learns it at once: 503 with the reason, long before its 30 s.
    assert response.status_code == 503
    assert "not ready after 1 s (start_timeout); stopped (killed by SIGTERM)" in response.json()["message"]
    with trio.fail_after(10):
        await supervisor.wait_for_state(State.FAILED)
    assert "not restarting (restart: never)" in supervisor.reason
    assert [pid_alive(pid) for pid in pids(tmp_path)] == [False]


async def test_a_server_that_exits_at_once_fails_at_once(nursery: trio.Nursery) -> None:
    crash = {"command": [PY, "-c", "print('no config'); raise SystemExit(3)"], "timeout": 30, "restart": "never"}
    proxy = await start_proxy(nursery, {"crash": crash})
    async with proxy.client() as client:
        response = await client.get("crash/", headers={"Accept": "application/json"})
    assert response.status_code == 503  # not a 504 after 30 s
    assert "exited before it was ready (exit code 3)" in response.json()["message"]
    assert "no config" in response.json()["output"]


async def test_start_quiet_timeout_gives_up_a_silent_start(nursery: trio.Nursery, tmp_path: Path) -> None:
    server = slow_server(tmp_path, "never", start_quiet_timeout=1, timeout=30, restart="never")
    proxy = await start_proxy(nursery, {"silent": server})
    async with proxy.client() as client:
        response = await client.get("silent/")
    assert response.status_code == 503
    message = response.json()["message"]
    assert "printed nothing for 1 s (start_quiet_timeout); stopped" in message, message
    assert "loading model..." in response.json()["output"]  # the last line, before the silence


async def test_start_quiet_timeout_spares_a_start_that_keeps_printing(nursery: trio.Nursery, tmp_path: Path) -> None:
    script = tmp_path / "chatty.py"
    script.write_text(
        textwrap.dedent(
            """
            import http.server, sys, time
            for step in range(20):
                print(f"step {step}", flush=True)
                time.sleep(0.1)
            http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
            """
        )
    )
    server = {"command": [PY, str(script), "{port}"], "start_quiet_timeout": 1.5, "timeout": 30, "cwd": str(tmp_path)}
    proxy = await start_proxy(nursery, {"chatty": server})
    async with proxy.client() as client:
        assert (await client.get("chatty/")).status_code == 200  # 2 s of start, never 1.5 s quiet
    assert proxy.supervisors["chatty"].starts == 1


async def test_the_driver_on_virtual_time_answers_at_timeout_and_gives_up_at_start_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # A real process that never listens, on trio's virtual clock: the request's 504 comes at
    # 5 s exactly, the process is still the one started, and it is given up at 300 s (plus
    # at most its stop_timeout, as virtual time runs on while it is being reaped).
    # (A bare supervisor: the registry's orphan guard is reaped with a wall-clock grace.)
    from trioproxy.supervisor import ServerSupervisor, ServerUnavailable

    process = make_server_process("never", slow_server(tmp_path, "never", restart="never"))
    async with trio.open_nursery() as nursery:
        never = ServerSupervisor(process)
        await nursery.start(never.run)
        began = trio.current_time()
        with pytest.raises(ServerUnavailable) as info:
            await never.ensure_ready()
        assert trio.current_time() - began == pytest.approx(5)
        assert info.value.status == 504 and "still starting after 5 s; the start goes on" in info.value.reason
        await never.wait_for_state(State.FAILED)
        took = trio.current_time() - began
        assert 300 <= took <= 300 + process.stop_timeout + 1, took
        assert never.reason.startswith("not ready after 300 s (start_timeout); stopped")
        assert never.starts == 1 and len(pids(tmp_path)) == 1
        nursery.cancel_scope.cancel()


async def test_the_504_names_the_state_it_found() -> None:
    from trioproxy.lifecycle import Exited, ProcessStarted, StartAsked, StopAsked
    from trioproxy.supervisor import ServerSupervisor

    web = ServerSupervisor(make_server_process("web", {"command": ["x"], "timeout": 5}))
    lc = web.lifecycle
    lc.handle(StartAsked())
    lc.handle(ProcessStarted(7, trio.current_time()))
    web.pid = 7
    assert web._still_waiting().startswith("still starting after 5 s; the start goes on (pid 7, starting for 0 s of at most 300 s)")
    lc.handle(StartDeadline(7, 300, "not ready after 300 s (start_timeout)"))
    assert web._still_waiting() == (
        "still starting after 5 s, and being stopped: not ready after 300 s (start_timeout); stopping pid 7"
    )
    lc.handle(Exited(-15, 1.0))  # the first failure restarts at once
    lc.handle(ProcessStarted(8, 1.0))
    lc.handle(Exited(1, 2.0))  # the second backs off
    assert lc.state is State.BACKOFF
    assert web._still_waiting().startswith(
        "not ready after 5 s: backing off after a failure (exited before it was ready (exit code 1); restarting in 0."
    )
    lc.handle(StopAsked())
    assert web._still_waiting() == "not ready after 5 s: stopping (stop requested)"
