#!/usr/bin/env python3
"""Scale benchmark under a real JupyterHub: N users spawning their single-user server at once.

    .venv/bin/python benchmarks/hub_scale.py --users 10 --users 25 [--targets trioproxy,jsp]
        [--hold 20] [--output benchmarks/results/hub_scale.json]
    benchmarks/.env-jsp/bin/python benchmarks/hub_scale_chart.py RESULTS.json CHART.png

For each target and each N, one JupyterHub (DummyAuthenticator, the simple local spawner,
configurable-http-proxy) on 127.0.0.1 is started; N users are created and given API tokens;
then, all at once, each user

1. asks the Hub to spawn their server (``POST /hub/api/users/<u>/server``) and follows the
   Hub's progress stream until the server is ready,
2. GETs ``/user/<u>/app/small`` through the Hub's proxy (the app, ``backend.py``, is started on
   that first request by the single-user server) — **spawn-to-first-byte** is from the spawn
   request to the first byte of that answer,
3. opens a WebSocket to ``/user/<u>/app/ws`` through the Hub's proxy and keeps it alive (an
   echo every 2 s) for ``--hold`` seconds.

During the hold: each user's memory (the single-user server's process alone, and with its
descendants: the app and, for trioproxy, its orphan guard), as RSS and PSS from
``/proc/<pid>/smaps_rollup``; the Hub's and configurable-http-proxy's CPU over the whole run
(spawns, requests, hold), from ``/proc/<pid>/stat``. Every failed spawn, request or echo is
counted and kept with its reason.

Targets: ``trioproxy`` (``trioproxy --config hub_scale_servers.py``) and ``jsp``
(``jupyterhub-singleuser --config hub_scale_servers.py``, i.e. Jupyter Server with
jupyter-server-proxy, from the same venv), both serving the same ``app`` server.

All traffic stays on 127.0.0.1; every process started runs in a session of its own and is
ended, with its descendants, when its run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = Path(sys.executable).parent
SMALL_BODY_SIZE = 100  # backend.py's /small
TARGETS = ("trioproxy", "jsp")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the Hub ------------------------------------------------------------------------------------


def hub_config(tmp: Path, ports: dict[str, int], token: str, target: str) -> str:
    servers = HERE / "hub_scale_servers.py"
    # As root here (a container): jupyter server needs --allow-root, trioproxy nothing.
    cmd = ["trioproxy", "--config", str(servers)] if target == "trioproxy" else [
        "jupyterhub-singleuser", "--config", str(HERE / "hub_scale_jsp_config.py"), "--allow-root"
    ]
    settings = {
        "port": ports["proxy"],
        "hub_port": ports["hub"],
        "api_url": f"http://127.0.0.1:{ports['api']}",
        "tmp": str(tmp),
        "home": str(tmp / "home" / "{username}"),
        "cmd": cmd,
        "environment": {
            "JUPYTERHUB_ACTIVITY_INTERVAL": "60",
            "TRIOPROXY_BENCH_PYTHON": sys.executable,
            # The trioproxy of this checkout, as the tests run it.
            "PYTHONPATH": str(ROOT),
        },
        "token": token,
        "first_port": 20000,
    }
    return "settings = " + json.dumps(settings) + "\n" + """
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = settings["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_port"]
c.ConfigurableHTTPProxy.api_url = settings["api_url"]
c.ConfigurableHTTPProxy.pid_file = settings["tmp"] + "/proxy.pid"
c.JupyterHub.db_url = "sqlite:///" + settings["tmp"] + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = settings["tmp"] + "/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = settings["tmp"] + "/jupyterhub.pid"
c.JupyterHub.last_activity_interval = 3600
c.JupyterHub.concurrent_spawn_limit = 0
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = settings["home"]
c.Spawner.cmd = settings["cmd"]
c.Spawner.environment = settings["environment"]
c.Spawner.start_timeout = 300
c.Spawner.http_timeout = 300
# Each server gets a port of its own, below the ephemeral range: the local spawner's random
# port (bind to 0, close, hand it on) is a race, which at N=50 gave two servers the same port
# (the second could not listen, the Hub sent its user to the first). Not what is measured here.
_ports = iter(range(settings["first_port"], settings["first_port"] + 10000))
def _own_port(spawner):
    spawner.port = next(_ports)
c.Spawner.pre_spawn_hook = _own_port
c.JupyterHub.services = [{"name": "bench", "api_token": settings["token"]}]
c.JupyterHub.load_roles = [
    {"name": "bench-admin", "scopes": ["admin:users", "admin:servers", "tokens"], "services": ["bench"]},
]
"""


@dataclass
class Hub:
    url: str
    tmp: Path
    token: str
    process: subprocess.Popen[bytes]

    def pid_of_proxy(self) -> int | None:
        try:
            return int((self.tmp / "proxy.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}


def start_hub(tmp: Path, target: str) -> Hub:
    ports = {"proxy": free_port(), "hub": free_port(), "api": free_port()}
    token = secrets.token_hex(16)
    config = tmp / "jupyterhub_config.py"
    config.write_text(hub_config(tmp, ports, token, target))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JUPYTER_", "CONFIGPROXY_"))}
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as run.py: every spawn would recompile otherwise
    log = open(tmp / "jupyterhub.log", "wb")  # noqa: SIM115 (the Hub's lifetime)
    process = subprocess.Popen(
        [str(VENV_BIN / "jupyterhub"), "-f", str(config)],
        cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{ports['proxy']}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterHub exited ({process.returncode}); see {tmp / 'jupyterhub.log'}")
        try:
            if httpx.get(f"{url}/hub/api", timeout=2).status_code == 200:
                return Hub(url, tmp, token, process)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("JupyterHub did not answer within 90 s")


def stop_hub(hub: Hub) -> None:
    """SIGTERM to the Hub (it stops the servers and its proxy), then SIGKILL to whatever is left."""
    proxy = hub.pid_of_proxy()
    if hub.process.poll() is None:
        os.killpg(hub.process.pid, signal.SIGTERM)
        try:
            hub.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(hub.process.pid, signal.SIGKILL)
            hub.process.wait(10)
    for pid in [proxy] if proxy else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(hub.process.pid, signal.SIGKILL)  # spawned servers share the Hub's session
    except ProcessLookupError:
        pass


# -- /proc ----------------------------------------------------------------------------------------


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int, tree: dict[int, list[int]]) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB (0, 0 if it is gone)."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- one user -----------------------------------------------------------------------------------


@dataclass
class UserRun:
    name: str
    token: str = ""
    spawn_s: float | None = None  # spawn request to ready (the Hub's word)
    first_byte_s: float | None = None  # spawn request to the app's first byte through the proxy
    echoes: int = 0
    failures: list[str] = field(default_factory=list)
    pid: int | None = None


async def spawn_and_use(hub: Hub, client: httpx.AsyncClient, user: UserRun, opened: trio.Event, hold_until: list[float]) -> None:
    began = time.monotonic()
    response = await client.post(f"{hub.url}/hub/api/users/{user.name}/server", headers=hub.headers())
    if response.status_code not in (201, 202):
        user.failures.append(f"spawn: {response.status_code} {response.text[:200]}")
        return
    if response.status_code == 202:
        ready = False
        async with client.stream(
            "GET", f"{hub.url}/hub/api/users/{user.name}/server/progress", headers=hub.headers(), timeout=None
        ) as progress:
            async for line in progress.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("failed"):
                    user.failures.append(f"spawn failed: {event.get('message')}")
                    return
                if event.get("ready"):
                    ready = True
                    break
        if not ready:
            user.failures.append("spawn: the progress stream ended before the server was ready")
            return
    user.spawn_s = time.monotonic() - began
    auth = {"Authorization": f"token {user.token}"}
    app_url = f"{hub.url}/user/{user.name}/app/small"
    deadline = time.monotonic() + 120
    last = ""
    while time.monotonic() < deadline:
        try:
            async with client.stream("GET", app_url, headers=auth) as answer:
                first = time.monotonic()
                body = await answer.aread()
            if answer.status_code == 200 and len(body) == SMALL_BODY_SIZE:
                user.first_byte_s = first - began
                break
            last = f"{answer.status_code} {body[:120]!r}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        await trio.sleep(0.05)
    if user.first_byte_s is None:
        user.failures.append(f"first request never answered by the app: {last}")
        return
    ws_url = hub.url.replace("http://", "ws://") + f"/user/{user.name}/app/ws"
    headers = [(b"authorization", f"token {user.token}".encode()), (b"origin", hub.url.encode())]
    try:
        async with trio_websocket.open_websocket_url(ws_url, extra_headers=headers) as ws:
            opened.set()
            while not hold_until or time.monotonic() < hold_until[0]:
                message = f"{user.name} {time.monotonic()}"
                await ws.send_message(message)
                with trio.fail_after(30):
                    if await ws.get_message() != message:
                        user.failures.append("websocket: wrong echo")
                        return
                user.echoes += 1
                await trio.sleep(2)
    except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError, trio.TooSlowError) as exc:
        user.failures.append(f"websocket: {type(exc).__name__}: {exc}")


async def settled(user: Any, event: trio.Event) -> None:
    """Run one user; ``event`` is set once their WebSocket is open (by them) or they are done."""
    try:
        await user
    finally:
        event.set()


async def run_once(target: str, users: int, hold: float, scratch: Path) -> dict[str, Any]:
    tmp = scratch / f"{target}-{users}"
    shutil.rmtree(tmp, ignore_errors=True)
    names = [f"u{i:03d}" for i in range(users)]
    for name in names:
        (tmp / "home" / name).mkdir(parents=True)
    hub = start_hub(tmp, target)
    runs = [UserRun(name) for name in names]
    try:
        limits = httpx.Limits(max_connections=4 * users + 10, max_keepalive_connections=4 * users + 10)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            created = await client.post(f"{hub.url}/hub/api/users", headers=hub.headers(), json={"usernames": names})
            if created.status_code != 201:
                raise RuntimeError(f"creating users: {created.status_code} {created.text[:300]}")
            for run in runs:
                answer = await client.post(
                    f"{hub.url}/hub/api/users/{run.name}/tokens", headers=hub.headers(), json={"note": "bench"}
                )
                run.token = answer.json()["token"]
            hub_pid, proxy_pid = hub.process.pid, hub.pid_of_proxy()
            cpu_before = (cpu_seconds(hub_pid), cpu_seconds(proxy_pid))
            wall_before = time.monotonic()
            hold_until: list[float] = []
            opened = [trio.Event() for _ in runs]
            async with trio.open_nursery() as nursery:
                for run, event in zip(runs, opened, strict=True):
                    nursery.start_soon(settled, spawn_and_use(hub, client, run, event, hold_until), event)
                # The hold starts once every user got through (or failed), and lasts --hold s.
                with trio.move_on_after(600):
                    for event in opened:
                        await event.wait()
                await trio.sleep(hold / 2)
                memory = await measure_memory(hub, client, runs)
                await trio.sleep(hold / 2)
                hold_until.append(time.monotonic())
            wall = time.monotonic() - wall_before
            cpu_after = (cpu_seconds(hub_pid), cpu_seconds(proxy_pid))
    finally:
        tree = children_of()
        leftovers = [pid for run in runs if run.pid for pid in descendants(run.pid, tree)]
        stop_hub(hub)
        for pid in leftovers:  # the Hub stops its servers; anything left of them goes now
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return summarize(target, users, runs, memory, wall, cpu_before, cpu_after)


async def measure_memory(hub: Hub, client: httpx.AsyncClient, runs: list[UserRun]) -> list[dict[str, int]]:
    tree = children_of()
    found = []
    for run in runs:
        model = (await client.get(f"{hub.url}/hub/api/users/{run.name}", headers=hub.headers())).json()
        pid = ((model.get("servers") or {}).get("") or {}).get("state", {}).get("pid")
        if not pid:
            continue
        run.pid = pid
        alone = memory_kib(pid)
        with_children = [memory_kib(p) for p in descendants(pid, tree)]
        found.append(
            {
                "rss_alone_kib": alone[0],
                "pss_alone_kib": alone[1],
                "rss_tree_kib": sum(m[0] for m in with_children),
                "pss_tree_kib": sum(m[1] for m in with_children),
                "processes": len(with_children),
            }
        )
    return found


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarize(
    target: str, users: int, runs: list[UserRun], memory: list[dict[str, int]], wall: float,
    cpu_before: tuple[float, float], cpu_after: tuple[float, float],
) -> dict[str, Any]:
    first = [run.first_byte_s for run in runs if run.first_byte_s is not None]
    spawn = [run.spawn_s for run in runs if run.spawn_s is not None]

    def median_mib(key: str) -> float | None:
        values = [m[key] / 1024 for m in memory]
        return round(statistics.median(values), 1) if values else None

    return {
        "target": target,
        "users": users,
        "spawn_to_first_byte_p50_s": round(percentile(first, 0.5) or 0, 3) if first else None,
        "spawn_to_first_byte_p99_s": round(percentile(first, 0.99) or 0, 3) if first else None,
        "spawn_to_ready_p50_s": round(percentile(spawn, 0.5) or 0, 3) if spawn else None,
        "rss_alone_mib": median_mib("rss_alone_kib"),
        "pss_alone_mib": median_mib("pss_alone_kib"),
        "rss_with_app_mib": median_mib("rss_tree_kib"),
        "pss_with_app_mib": median_mib("pss_tree_kib"),
        "hub_cpu_s": round(cpu_after[0] - cpu_before[0], 2),
        "proxy_cpu_s": round(cpu_after[1] - cpu_before[1], 2),
        "wall_s": round(wall, 1),
        "echoes": sum(run.echoes for run in runs),
        "failed_users": sum(1 for run in runs if run.failures),
        "failures": {run.name: run.failures for run in runs if run.failures},
        "first_byte_s": sorted(round(v, 3) for v in first),
        "memory": memory,
    }


# -- output -------------------------------------------------------------------------------------

COLUMNS = [
    ("users", "N"),
    ("target", "target"),
    ("spawn_to_first_byte_p50_s", "spawn→first byte p50 (s)"),
    ("spawn_to_first_byte_p99_s", "p99 (s)"),
    ("rss_alone_mib", "RSS/user, server (MiB)"),
    ("rss_with_app_mib", "RSS/user, with app (MiB)"),
    ("pss_with_app_mib", "PSS/user, with app (MiB)"),
    ("hub_cpu_s", "Hub CPU (s)"),
    ("proxy_cpu_s", "CHP CPU (s)"),
    ("failed_users", "failed users"),
]


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in sorted(results, key=lambda r: (r["users"], r["target"])):
        lines.append("| " + " | ".join("–" if row.get(key) is None else str(row[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, action="append", help="N (repeatable); default 10")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--hold", type=float, default=20.0, help="seconds every WebSocket is kept open once all are")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "hub_scale.json")
    args = parser.parse_args()
    if shutil.which("configurable-http-proxy") is None:
        sys.exit("configurable-http-proxy is not installed (npm install -g configurable-http-proxy)")
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        sys.exit(f"unknown targets: {', '.join(sorted(unknown))}")
    scratch = HERE / "results" / "hub_scale_scratch"
    results = []
    for users in args.users or [10]:
        for target in targets:  # one N after the other, both targets at each
            print(f"-- {target}, {users} users", flush=True)
            row = trio.run(run_once, target, users, args.hold, scratch)
            print(table([row]).splitlines()[-1], flush=True)
            results.append(row)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    args.output.write_text(json.dumps({"machine": machine, "hold_s": args.hold, "results": results}, indent=1))
    print(table(results))
    for row in results:
        for name, reasons in row["failures"].items():
            print(f"{row['target']} N={row['users']} {name}: {'; '.join(reasons)}")


if __name__ == "__main__":
    main()
