"""A server's family: its process group and the descendants that left it (trioproxy.process).

Real processes (tests/backends/family.py) that note the signals they get: a child left in the
server's group, and a daemonized grandchild (setsid, then re-parented) as vncserver leaves its
X server. Whether trioproxy stops the server, the server exits by itself, or trioproxy is
killed, each of them gets SIGTERM, and (but for the last case) the full grace to finish.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy.config import make_server_process
from trioproxy.supervisor import Supervisors

from .conftest import BACKENDS, PY, launch_trioproxy, pid_alive, wait_for


def family_server(logdir: Path, mode: str) -> dict[str, object]:
    return {"command": [PY, str(BACKENDS / "family.py"), "{port}", str(logdir), mode], "stop_timeout": 5}


def notes(logdir: Path) -> dict[int, list[str]]:
    """What each process left behind wrote, by pid."""
    found = {}
    for path in logdir.iterdir():
        found[int(path.name)] = [line.split(" ", 1)[1] for line in path.read_text().splitlines()]
    return found


async def started_descendant(logdir: Path) -> int:
    with trio.fail_after(15):
        await wait_for(lambda: any("started" in lines for lines in notes(logdir).values()))
    (pid,) = notes(logdir)
    return pid


async def run_supervisors(nursery: trio.Nursery, servers: dict[str, dict[str, object]]) -> Supervisors:
    supervisors = Supervisors({n: make_server_process(n, c) for n, c in servers.items()})
    await nursery.start(supervisors.run)
    return supervisors


@pytest.mark.parametrize("mode", ["group", "daemon"])
async def test_a_stop_gives_every_descendant_sigterm_and_its_grace(
    nursery: trio.Nursery, tmp_path: Path, mode: str
) -> None:
    supervisors = await run_supervisors(nursery, {"app": family_server(tmp_path, mode)})
    await supervisors["app"].ensure_ready()
    pid = await started_descendant(tmp_path)
    with trio.fail_after(15):
        await supervisors["app"].stop()
    # The server itself exited at once; its descendant still had the rest of the grace.
    assert notes(tmp_path)[pid] == ["started", "SIGTERM", "finished"]
    assert not pid_alive(pid)


@pytest.mark.parametrize("mode", ["group", "daemon"])
async def test_what_a_server_leaves_when_it_exits_is_ended_too(
    nursery: trio.Nursery, tmp_path: Path, mode: str
) -> None:
    supervisors = await run_supervisors(nursery, {"app": {**family_server(tmp_path, mode), "restart": "never"}})
    app = supervisors["app"]
    await app.ensure_ready()
    pid = await started_descendant(tmp_path)
    assert app.pid is not None
    os.kill(app.pid, signal.SIGKILL)  # the server dies; what it started lives on, for now
    with trio.fail_after(15):
        await wait_for(lambda: not pid_alive(pid))
    assert notes(tmp_path)[pid] == ["started", "SIGTERM", "finished"]


def test_descendants_that_left_the_group_end_when_trioproxy_is_killed(
    tmp_path: Path, proxy_processes: list[object]
) -> None:
    import time

    config = tmp_path / "config.py"
    logdir = tmp_path / "notes"
    logdir.mkdir()
    config.write_text(f"c.ServerProxy.servers = {{'app': {family_server(logdir, 'daemon')!r}}}\n")
    proxy = launch_trioproxy(["--config", str(config), "--port", "0", "--token", "t0ken"])
    proxy_processes.append(proxy)
    response = httpx.get(proxy.base + "app/", headers={"Authorization": "token t0ken"}, timeout=30)
    assert response.status_code == 200
    deadline = time.monotonic() + 15
    while not any("started" in lines for lines in notes(logdir).values()):
        assert time.monotonic() < deadline, "the daemonized grandchild did not start"
        time.sleep(0.05)
    (pid,) = notes(logdir)
    proxy.process.kill()
    proxy.process.wait()
    deadline = time.monotonic() + 15
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid}, a daemonized descendant, outlived trioproxy"
        time.sleep(0.05)
    assert notes(logdir)[pid][:2] == ["started", "SIGTERM"]
