"""ServerSupervisor with real child processes and real sockets."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from trioproxy.config import make_server_process
from trioproxy.lifecycle import ProcessStarted, Ready, StartAsked
from trioproxy.supervisor import ServerSupervisor, ServerUnavailable, State, Supervisors

from .conftest import BACKENDS, PY, echo_command, pid_alive, wait_for

# A backend that records each start in a file, optionally sleeps, then serves HTTP on {port}.
SERVE = textwrap.dedent(
    """
    import http.server, os, sys, time
    port, record, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    with open(record, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(delay)
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    with open(record + ".listening", "w") as f:
        f.write(repr(time.monotonic()))
    server.serve_forever()
    """
)


def serve_command(tmp_path: Path, delay: float = 0.0) -> list[str]:
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    return [PY, str(script), "{port}", str(tmp_path / "starts"), str(delay)]


def starts(tmp_path: Path) -> list[str]:
    path = tmp_path / "starts"
    return path.read_text().split() if path.exists() else []


async def run_supervisors(nursery: trio.Nursery, servers: dict[str, dict[str, Any]]) -> Supervisors:
    supervisors = Supervisors({n: make_server_process(n, c) for n, c in servers.items()})
    await nursery.start(supervisors.run)
    return supervisors


async def get(backend_port: int, path: str = "/") -> int:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{backend_port}{path}")).status_code


async def test_lazy_start_on_first_use(nursery: trio.Nursery, tmp_path: Path) -> None:
    supervisors = await run_supervisors(nursery, {"web": {"command": serve_command(tmp_path)}})
    web = supervisors["web"]
    await trio.sleep(0.3)
    assert web.state is State.STOPPED and starts(tmp_path) == []
    backend = (await web.ensure_ready()).backend
    assert web.state is State.READY
    assert await get(backend.port) == 200
    assert starts(tmp_path) == [str(web.pid)]


async def test_autostart_starts_at_boot(nursery: trio.Nursery, tmp_path: Path) -> None:
    supervisors = await run_supervisors(
        nursery, {"web": {"command": serve_command(tmp_path), "autostart": True}}
    )
    with trio.fail_after(10):
        await supervisors["web"].wait_for_state(State.READY)
    assert len(starts(tmp_path)) == 1


async def test_concurrent_first_requests_start_one_process(nursery: trio.Nursery, tmp_path: Path) -> None:
    supervisors = await run_supervisors(nursery, {"web": {"command": serve_command(tmp_path, 0.3)}})
    backends = []

    async def request() -> None:
        backends.append((await supervisors["web"].ensure_ready()).backend)

    async with trio.open_nursery() as inner:
        for _ in range(25):
            inner.start_soon(request)
    assert len(set(backends)) == 1
    assert len(starts(tmp_path)) == 1


async def test_readiness_is_noticed_soon_after_the_port_opens(nursery: trio.Nursery, tmp_path: Path) -> None:
    # The benchmark measures the exact figure; this only guards against slow polling.
    supervisors = await run_supervisors(nursery, {"web": {"command": serve_command(tmp_path, 0.5)}})
    await supervisors["web"].ensure_ready()
    noticed = trio.current_time()
    # The server notes the time just after it starts listening: we may be there first.
    marker = tmp_path / "starts.listening"
    await wait_for(lambda: marker.exists() and marker.read_text() != "", timeout=2, interval=0.002)
    listening = float((tmp_path / "starts.listening").read_text())
    # trio's clock and time.monotonic() are both CLOCK_MONOTONIC here, offset by trio's clock.
    lag = noticed - (listening + trio.current_time() - _monotonic())
    assert lag < 0.1


def _monotonic() -> float:
    import time

    return time.monotonic()


async def test_timeout_bounds_the_wait_with_504_and_the_start_goes_on(nursery: trio.Nursery, tmp_path: Path) -> None:
    supervisors = await run_supervisors(
        nursery, {"slow": {"command": serve_command(tmp_path, 2), "timeout": 0.5}}
    )
    slow = supervisors["slow"]
    with trio.fail_after(3):
        with pytest.raises(ServerUnavailable) as info:
            await slow.ensure_ready()
    assert info.value.status == 504 and info.value.retry_after == 2.0
    assert "still starting after 0.5 s; the start goes on" in str(info.value)
    pid = slow.pid
    assert slow.state is State.STARTING and pid is not None  # not killed at timeout
    with trio.fail_after(20):
        await slow.wait_for_state(State.READY)
    assert slow.pid == pid and starts(tmp_path) == [str(pid)]
    await slow.ensure_ready()


async def test_early_exit_fails_waiters_at_once_with_output(nursery: trio.Nursery) -> None:
    command = [PY, "-c", "import sys; print('missing settings file'); sys.exit(3)"]
    supervisors = await run_supervisors(nursery, {"bad": {"command": command, "timeout": 30}})
    with trio.fail_after(5):  # long before the 30 s timeout
        with pytest.raises(ServerUnavailable) as info:
            await supervisors["bad"].ensure_ready()
    assert info.value.status == 503
    assert "exit code 3" in info.value.reason
    assert "missing settings file" in info.value.output


async def test_missing_command_is_a_clear_error(nursery: trio.Nursery, tmp_path: Path) -> None:
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("#!/bin/sh\n")
    supervisors = await run_supervisors(
        nursery,
        {
            "missing": {"command": ["no-such-command-anywhere", "{port}"]},
            "noexec": {"command": [str(not_executable)]},
            "nodir": {"command": [PY, "-c", "pass"], "cwd": str(tmp_path / "nowhere")},
        },
    )
    expected = {
        "missing": "command not found: 'no-such-command-anywhere'",
        "noexec": "command not executable",
        "nodir": "working directory not found",
    }
    for name, message in expected.items():
        with pytest.raises(ServerUnavailable) as info:
            await supervisors[name].ensure_ready()
        assert message in info.value.reason
        assert info.value.status == 503


async def test_crash_after_ready_restarts_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    supervisors = await run_supervisors(nursery, {"web": {"command": serve_command(tmp_path)}})
    web = supervisors["web"]
    await web.ensure_ready()
    first_pid = web.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    await wait_for(lambda: web.state is not State.READY)
    backend = (await web.ensure_ready()).backend  # waits for the new process rather than failing
    assert web.pid != first_pid
    assert web.restarts == 1
    assert web.last_exit_code == -signal.SIGKILL
    assert await get(backend.port) == 200


async def test_crash_loop_backs_off_then_fails(nursery: trio.Nursery, tmp_path: Path) -> None:
    record = tmp_path / "spawns"
    command = [PY, "-c", f"open({str(record)!r}, 'a').write('x'); raise SystemExit(1)"]
    supervisors = await run_supervisors(
        nursery,
        {"loop": {"command": command, "max_failures": 4, "backoff_initial": 0.1, "autostart": True}},
    )
    loop = supervisors["loop"]
    with trio.fail_after(15):
        await loop.wait_for_state(State.FAILED)
    assert record.read_text() == "xxxx"
    assert "gave up after 4 failures" in loop.reason
    states_seen = loop.reason
    with pytest.raises(ServerUnavailable) as info:
        await loop.ensure_ready()
    assert info.value.status == 503
    assert "will retry" in info.value.reason or "exit code 1" in info.value.reason
    await trio.sleep(0.5)
    assert record.read_text() in ("xxxx", "xxxxx"), states_seen  # no spinning


async def test_exit_zero_is_stopped_and_starts_again_on_demand(nursery: trio.Nursery, tmp_path: Path) -> None:
    script = tmp_path / "once.py"
    script.write_text(
        textwrap.dedent(
            """
            import http.server, sys, threading
            server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)
            class Quit(http.server.SimpleHTTPRequestHandler):
                def do_GET(self):
                    self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
                    threading.Thread(target=server.shutdown).start()
            server.RequestHandlerClass = Quit
            server.serve_forever()
            """
        )
    )
    supervisors = await run_supervisors(nursery, {"once": {"command": [PY, str(script), "{port}"]}})
    once = supervisors["once"]
    backend = (await once.ensure_ready()).backend
    first = once.pid
    assert await get(backend.port) == 200
    with trio.fail_after(10):
        await once.wait_for_state(State.STOPPED)
    assert once.last_exit_code == 0 and once.restarts == 0
    await once.ensure_ready()
    assert once.pid != first and once.state is State.READY


async def test_stop_escalates_to_sigkill(nursery: trio.Nursery, tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(
        textwrap.dedent(
            """
            import signal, socket, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
            while True:
                time.sleep(1)
            """
        )
    )
    supervisors = await run_supervisors(
        nursery, {"stubborn": {"command": [PY, str(script), "{port}"], "stop_timeout": 0.5}}
    )
    stubborn = supervisors["stubborn"]
    await stubborn.ensure_ready()
    pid = stubborn.pid
    assert pid is not None
    started = trio.current_time()
    await stubborn.stop()
    assert trio.current_time() - started >= 0.45
    assert stubborn.state is State.STOPPED
    assert stubborn.last_exit_code == -signal.SIGKILL
    assert not pid_alive(pid)


async def test_shutdown_leaves_no_child_or_grandchild(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = tmp_path / "family.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, subprocess, sys, time, http.server
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open({str(pids_file)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
            http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
            """
        )
    )
    async with trio.open_nursery() as nursery:
        supervisors = await run_supervisors(
            nursery,
            {
                "family": {"command": [PY, str(script), "{port}"]},
                "echo": {"command": echo_command()},
            },
        )
        await supervisors["family"].ensure_ready()
        await supervisors["echo"].ensure_ready()
        echo_pid = supervisors["echo"].pid
        nursery.cancel_scope.cancel()
    pids = [int(p) for p in pids_file.read_text().split()] + [echo_pid]
    await wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=3)


async def test_chatty_child_never_blocks(nursery: trio.Nursery, tmp_path: Path) -> None:
    script = tmp_path / "chatty.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, http.server
            for i in range(200000):
                print(f"line {i} " + "x" * 40)
            sys.stdout.flush()
            sys.stderr.write("to stderr\\n")
            http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
            """
        )
    )
    supervisors = await run_supervisors(nursery, {"chatty": {"command": [PY, str(script), "{port}"], "timeout": 30}})
    chatty = supervisors["chatty"]
    await chatty.ensure_ready()
    await wait_for(lambda: "to stderr" in chatty.output.tail(5))
    assert chatty.output.total >= 200001
    assert len(chatty.output.tail()) == 1000  # bounded ring buffer


async def test_taken_port_is_retried_on_another(nursery: trio.Nursery, tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    script = tmp_path / "flaky.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, http.server
            if not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").write(sys.argv[1])
                print("OSError: [Errno 98] Address already in use", file=sys.stderr)
                sys.exit(1)
            http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
            """
        )
    )
    supervisors = await run_supervisors(nursery, {"flaky": {"command": [PY, str(script), "{port}"]}})
    backend = (await supervisors["flaky"].ensure_ready()).backend
    assert backend.port != int(marker.read_text())
    assert await get(backend.port) == 200


async def test_unix_socket_server(nursery: trio.Nursery) -> None:
    supervisors = await run_supervisors(
        nursery, {"sock": {"command": echo_command(unix=True), "unix_socket": True}}
    )
    backend = (await supervisors["sock"].ensure_ready()).backend
    assert backend.unix_socket is not None and backend.unix_socket.endswith("/socket")
    transport = httpx.AsyncHTTPTransport(uds=backend.unix_socket)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("http://localhost/x")).json()["target"] == "/x"


async def test_ready_check_path_must_answer(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    script = tmp_path / "late.py"
    # Listens at once but serves /ok/ only after a moment.
    script.write_text(
        textwrap.dedent(
            f"""
            import http.server, os, sys, threading, time
            os.chdir({str(tmp_path)!r})
            os.rename("ok", "notyet")
            threading.Timer(0.5, lambda: os.rename("notyet", "ok")).start()
            http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
            """
        )
    )
    supervisors = await run_supervisors(
        nursery, {"late": {"command": [PY, str(script), "{port}"], "ready_check_path": "/ok/"}}
    )
    backend = (await supervisors["late"].ensure_ready()).backend
    assert await get(backend.port, "/ok/") == 200


async def test_environment_and_cwd(nursery: trio.Nursery, tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    command = [
        PY,
        "-c",
        "import os, sys, http.server;"
        f"open({str(out)!r}, 'w').write(os.environ['GREETING'] + ' ' + os.environ['PATH_SET'] + ' ' + os.getcwd());"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()",
        "{port}",
    ]
    supervisors = await run_supervisors(
        nursery,
        {
            "env": {
                "command": command,
                "environment": lambda port: {"GREETING": f"port-{port}", "PATH_SET": "{base_url}"},
                "cwd": str(tmp_path),
            }
        },
    )
    backend = (await supervisors["env"].ensure_ready()).backend
    assert out.read_text() == f"port-{backend.port} / {tmp_path}"
    assert "PATH" in os.environ  # merged over trioproxy's own environment (python was found)


async def test_idle_timeout_stops_and_next_use_restarts(nursery: trio.Nursery, tmp_path: Path) -> None:
    supervisors = await run_supervisors(
        nursery, {"idle": {"command": serve_command(tmp_path), "idle_timeout": 0.5}}
    )
    idle = supervisors["idle"]
    await idle.ensure_ready()
    with trio.fail_after(5):
        await idle.wait_for_state(State.STOPPED)
    await idle.ensure_ready()
    assert len(starts(tmp_path)) == 2


async def test_stop_and_restart_while_starting(nursery: trio.Nursery, tmp_path: Path) -> None:
    supervisors = await run_supervisors(nursery, {"web": {"command": serve_command(tmp_path, 0.5)}})
    web = supervisors["web"]
    async with trio.open_nursery() as inner:
        inner.start_soon(web.start)
        await wait_for(lambda: web.pid is not None)
        inner.start_soon(web.restart)
        inner.start_soon(web.restart)
    assert web.state is State.READY
    await web.stop()
    await web.stop()  # stopping twice is fine
    assert web.state is State.STOPPED
    assert not any(pid_alive(int(p)) for p in starts(tmp_path))



async def test_stop_clears_a_failed_server(nursery: trio.Nursery) -> None:
    command = [PY, "-c", "raise SystemExit(1)"]
    supervisors = await run_supervisors(nursery, {"bad": {"command": command, "restart": "never"}})
    bad = supervisors["bad"]
    with pytest.raises(ServerUnavailable):
        await bad.ensure_ready()
    with trio.fail_after(10):
        await bad.wait_for_state(State.FAILED)
    assert "not restarting (restart: never)" in bad.reason
    await bad.stop()
    assert bad.state is State.STOPPED


async def test_start_while_stopping_is_not_lost(nursery: trio.Nursery, tmp_path: Path) -> None:
    script = tmp_path / "slow_stop.py"
    script.write_text(
        textwrap.dedent(
            """
            import http.server, signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(0)))
            http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
            """
        )
    )
    supervisors = await run_supervisors(nursery, {"web": {"command": [PY, str(script), "{port}"]}})
    web = supervisors["web"]
    await web.ensure_ready()
    first = web.pid
    nursery.start_soon(web.stop)
    with trio.fail_after(10):
        await web.wait_for_state(State.STOPPING)
    await web.start(wait=False)
    await wait_for(lambda: web.state is State.READY and web.pid not in (None, first))


async def test_a_stop_fails_the_requests_waiting_for_the_start(nursery: trio.Nursery, tmp_path: Path) -> None:
    supervisors = await run_supervisors(nursery, {"web": {"command": serve_command(tmp_path, 1.0)}})
    web = supervisors["web"]
    outcome: list[object] = []

    async def request() -> None:
        try:
            outcome.append(await web.ensure_ready())
        except ServerUnavailable as exc:
            outcome.append(exc)

    nursery.start_soon(request)
    await wait_for(lambda: web.pid is not None)
    await web.stop()
    await wait_for(lambda: bool(outcome))
    assert isinstance(outcome[0], ServerUnavailable) and outcome[0].reason == "stopped on request"
    await trio.sleep(0.3)
    assert web.state is State.STOPPED  # the waiting request did not start it again


async def test_idle_culling_on_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    # The culling schedule alone: no process (the lifecycle is put in READY by its events).
    idle = ServerSupervisor(make_server_process("idle", {"command": [PY, "-c", "pass"], "idle_timeout": 30}))
    for event in (StartAsked(), ProcessStarted(1, 0.0), Ready(1, 0.0, "nowhere")):
        idle.lifecycle.handle(event)  # as its process would make it
    cycle = idle._cycle_scope = trio.CancelScope()  # the cycle the culler ends
    t0 = idle.last_activity = trio.current_time()
    culled_at: list[float] = []

    async def cull() -> None:
        await idle.cycle.cull_when_idle()
        culled_at.append(trio.current_time() - t0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cull)
        await trio.sleep(10)
        idle.touch()  # idle from 10: due at 40
        await trio.sleep(10)
        with idle.in_use():  # a response streams from 20 to 50: not idle meanwhile
            await trio.sleep(30)
            assert culled_at == []
        idle.touch()  # as the dispatcher does when a response ends: due at 80
    assert culled_at == [pytest.approx(80)]
    assert cycle.cancel_called and idle.state is State.STOPPING and idle.reason == "idle for 30 s"


async def test_a_child_printing_as_it_stops_is_read_to_the_end(nursery: trio.Nursery, tmp_path: Path) -> None:
    script = tmp_path / "talkative.py"
    script.write_text(
        textwrap.dedent(
            """
            import http.server, signal, sys
            def bye(*args):
                for i in range(2000):
                    print(f"shutting down, step {i}", flush=True)
                sys.exit(0)
            signal.signal(signal.SIGTERM, bye)
            http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
            """
        )
    )
    supervisors = await run_supervisors(nursery, {"talk": {"command": [PY, str(script), "{port}"], "stop_timeout": 60}})
    talk = supervisors["talk"]
    await talk.ensure_ready()
    await talk.stop()
    assert talk.last_exit_code == 0  # it exited on SIGTERM (a SIGKILL after the grace gives -9)
    assert "shutting down, step 1999" in talk.output.tail(5)


async def test_readiness_polls_reuse_one_connection(nursery: trio.Nursery) -> None:
    # While an app answers 503 warming up, its readiness is polled every few milliseconds: over
    # one kept-alive connection, not a new client (and TLS context) per poll.
    command = [PY, str(BACKENDS / "warming.py"), "{port}", "60"]
    supervisors = await run_supervisors(nursery, {"warm": {"command": command, "ready_check_path": "/ready"}})
    backend = (await supervisors["warm"].ensure_ready()).backend
    async with httpx.AsyncClient() as client:
        counts = (await client.get(f"http://127.0.0.1:{backend.port}/stats")).json()
    assert counts["ready_requests"] == 61
    assert counts["connections"] <= 3, counts  # ours just now, and the prober's
