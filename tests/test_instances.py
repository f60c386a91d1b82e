"""Finding running instances: runtime files, ``trioproxy list``, ``stop`` and ``servers``,
against real trioproxy processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PY, ProxyProcess, echo_command, launch_trioproxy, pid_alive

pytestmark = pytest.mark.timeout(90)


def run(runtime: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    return subprocess.run([PY, "-m", "trioproxy", *args], capture_output=True, text=True, env=env, timeout=timeout)


def launch(runtime: Path, args: list[str], proxy_processes: list[ProxyProcess]) -> ProxyProcess:
    proxy = launch_trioproxy(args, env={"JUPYTER_RUNTIME_DIR": str(runtime)})
    proxy_processes.append(proxy)
    return proxy


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.py"
    config.write_text(f"c.ServerProxy.servers = {{'echo': {{'command': {echo_command()!r}}}}}\n")
    return config


def test_runtime_file_is_private_complete_and_removed_on_exit(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    runtime = tmp_path / "runtime"
    proxy = launch(runtime, ["--port", "0", "--token", "secret-t", "--base-url", "/pre/"], proxy_processes)
    path = runtime / f"trioproxy-{proxy.process.pid}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["pid"] == proxy.process.pid
    assert data["token"] == "secret-t"
    assert data["base_url"] == "/pre/"
    assert data["url"] == proxy.base and proxy.base.endswith("/pre/")
    assert data["url"] == f"http://127.0.0.1:{data['port']}/pre/"
    assert [p.name for p in runtime.iterdir()] == [path.name]  # no temporary file left
    assert proxy.stop() == 0
    assert not path.exists()


def test_list_shows_running_instances_and_drops_stale_files(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    runtime = tmp_path / "runtime"
    assert run(runtime, "list").stdout.strip() == "No trioproxy is running."
    first = launch(runtime, ["--port", "0", "--token", "t1"], proxy_processes)
    second = launch(runtime, ["--port", "0", "--no-auth"], proxy_processes)
    killed = launch(runtime, ["--port", "0", "--token", "t3"], proxy_processes)
    killed.kill()  # SIGKILL: its runtime file stays behind
    stale = runtime / f"trioproxy-{killed.process.pid}.json"
    assert stale.exists()
    (runtime / "trioproxy-garbage.json").write_text("{not json")

    result = run(runtime, "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert sorted(item["pid"] for item in listed) == sorted([first.process.pid, second.process.pid])
    by_pid = {item["pid"]: item for item in listed}
    assert by_pid[first.process.pid]["token"] == "t1"
    assert by_pid[second.process.pid]["token"] is None
    assert not stale.exists()  # removed, since its process is gone

    text = run(runtime, "list").stdout
    assert f"{first.base}?token=t1 :: pid {first.process.pid}" in text
    assert f"{second.base} :: pid {second.process.pid}" in text


def test_stop_by_port_stops_that_one_and_its_servers(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    runtime = tmp_path / "runtime"
    config = write_config(tmp_path)
    one = launch(runtime, ["--port", "0", "--token", "t", "--config", str(config)], proxy_processes)
    two = launch(runtime, ["--port", "0", "--token", "t"], proxy_processes)
    started = run(runtime, "servers", "--port", _port(one), "start", "echo")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("echo: ready")
    backend = json.loads(run(runtime, "servers", "--port", _port(one), "status", "echo", "--json").stdout)["pid"]
    assert pid_alive(backend)

    ambiguous = run(runtime, "stop")
    assert ambiguous.returncode == 2
    assert "2 trioproxy instances are running" in ambiguous.stderr and _port(one) in ambiguous.stderr
    missing = run(runtime, "stop", "1")
    assert missing.returncode == 1 and "no running trioproxy on port 1" in missing.stderr

    result = run(runtime, "stop", _port(one))
    assert result.returncode == 0, result.stderr
    assert f"stopped trioproxy on port {_port(one)}" in result.stdout
    assert one.process.wait(5) == 0  # a clean exit: SIGTERM's graceful shutdown
    assert not pid_alive(backend)
    assert not (runtime / f"trioproxy-{one.process.pid}.json").exists()
    assert two.process.poll() is None
    # Only one is left: no port needed.
    assert run(runtime, "stop").returncode == 0
    assert two.process.wait(5) == 0
    assert run(runtime, "stop").stderr.strip() == "trioproxy stop: no running trioproxy found (trioproxy list shows them)"


def test_servers_client_controls_servers_through_the_api(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    runtime = tmp_path / "runtime"
    config = write_config(tmp_path)
    launch(runtime, ["--port", "0", "--token", "tok", "--config", str(config)], proxy_processes)

    table = run(runtime, "servers")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "STATE", "PID", "ADDRESS", "RESTARTS"]
    assert row.split()[:2] == ["echo", "stopped"]

    assert run(runtime, "servers", "start", "echo").stdout.startswith("echo: ready")
    first_pid = json.loads(run(runtime, "servers", "status", "echo", "--json").stdout)["pid"]
    assert run(runtime, "servers", "restart", "echo").stdout.startswith("echo: ready")
    second_pid = json.loads(run(runtime, "servers", "status", "echo", "--json").stdout)["pid"]
    assert second_pid != first_pid and not pid_alive(first_pid)
    logs = run(runtime, "servers", "logs", "echo", "--tail", "1")
    assert logs.stdout == "echo backend listening\n"
    assert run(runtime, "servers", "stop", "echo").stdout.startswith("echo: stopped")
    assert not pid_alive(second_pid)

    unknown = run(runtime, "servers", "start", "nope")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "trioproxy servers: No server named 'nope'."
    no_name = run(runtime, "servers", "restart")
    assert no_name.returncode == 2 and "restart needs the name of a server" in no_name.stderr


def test_follow_logs_streams_new_output(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    runtime = tmp_path / "runtime"
    config = write_config(tmp_path)
    proxy = launch(runtime, ["--port", "0", "--token", "tok", "--config", str(config)], proxy_processes)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    follower = subprocess.Popen(
        [PY, "-m", "trioproxy", "servers", "logs", "echo", "--follow"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert run(runtime, "servers", "start", "echo").returncode == 0
        assert follower.stdout is not None
        assert follower.stdout.readline() == "echo backend listening\n"
    finally:
        follower.terminate()
        follower.wait(5)
        assert follower.stdout is not None
        follower.stdout.close()
    assert proxy.process.poll() is None


def test_client_reports_an_unreachable_instance_in_one_line(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    # A live pid (this test's own) whose file points at a port nobody listens on.
    (runtime / f"trioproxy-{os.getpid()}.json").write_text(
        json.dumps({"url": "http://127.0.0.1:9/", "pid": os.getpid(), "port": 9, "base_url": "/", "token": "x"})
    )
    began = time.monotonic()
    result = run(runtime, "servers")
    assert result.returncode == 1
    assert result.stderr.startswith("trioproxy servers: cannot reach trioproxy at http://127.0.0.1:9/")
    assert "Traceback" not in result.stderr
    assert time.monotonic() - began < 20


def _port(proxy: ProxyProcess) -> str:
    return proxy.base.rsplit(":", 1)[1].split("/")[0]
