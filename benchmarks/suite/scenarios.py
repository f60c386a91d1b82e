"""The scenarios. Each one starts the targets it needs, measures them in turn (runs of
different targets interleaved, so drift hits all alike), stops them, and adds rows."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clients import BLOCK, HTTPConnection, ProtocolFailure, WebSocket, get, http_load, pattern_crc32, ws_load
from .stats import Rows, describe_body, failure, percentile, summary, verdict
from .targets import (
    BACKEND,
    DIRECT,
    JSP,
    TRIOPROXY,
    Target,
    backend_python,
    cpu_seconds,
    memory_kib,
    reset_peak_rss,
)

PROXIES = (TRIOPROXY, JSP)
MiB = 1 << 20


@dataclass
class Plan:
    """Sizes, durations and repeats; ``quick()`` for the smoke run."""

    quick: bool = False
    loadgen: str = "wrk"  # or "python"
    startup_reps: int = 5
    cold_sleeps: tuple[float, ...] = (0.0, 0.5, 2.0)
    cold_copies: int = 7
    restart_reps: int = 5
    restart_lead: float = 0.5  # seconds of load before the kill
    restart_max_wait: float = 5.0
    restart_tail: float = 0.3  # seconds of load after recovery
    restart_concurrency: int = 4
    restart_pause: float = 0.005  # each connection's pause between requests: a steady load, not a flood
    crash_duration: float = 60.0
    crash_steady_from: float = 15.0
    crash_interval: float = 0.5  # the client's pause between requests
    small_duration: float = 4.0
    small_warmup: float = 1.0
    small_reps: int = 5
    small_concurrency: tuple[int, ...] = (1, 32)
    download_size: int = 2 << 30
    upload_size: int = 1 << 30
    transfer_reps: int = 3
    ws_duration: float = 3.0
    ws_reps: int = 5
    ws_connections: int = 100
    ws_size: int = 1024
    ws_large_size: int = 900_000  # bytes of JSON text per message, as a plot's data update
    ws_large_duration: float = 3.0
    ws_large_reps: int = 5
    mixed_duration: float = 5.0  # small GETs and 100 WebSockets at once
    mixed_concurrency: int = 32
    mixed_reps: int = 3
    sse_events: int = 20
    sse_interval: float = 0.05
    sse_reps: int = 5

    @classmethod
    def quick_plan(cls, loadgen: str) -> "Plan":
        return cls(
            quick=True,
            loadgen=loadgen,
            startup_reps=1,
            cold_sleeps=(0.0, 0.5),
            cold_copies=1,
            restart_reps=1,
            restart_lead=0.2,
            restart_max_wait=3.0,
            restart_tail=0.1,
            crash_duration=5.0,
            crash_steady_from=2.0,
            small_duration=0.5,
            small_warmup=0.0,
            small_reps=1,
            download_size=64 * MiB,
            upload_size=32 * MiB,
            transfer_reps=1,
            ws_duration=0.5,
            ws_reps=1,
            ws_connections=20,
            ws_large_size=200_000,
            ws_large_duration=0.5,
            ws_large_reps=1,
            mixed_duration=0.5,
            mixed_reps=1,
            sse_events=5,
            sse_interval=0.03,
            sse_reps=1,
        )


@dataclass
class Context:
    plan: Plan
    run_dir: Path
    targets: list[str]  # the targets measured in this run
    rows: Rows
    raw: dict[str, Any] = field(default_factory=dict)
    say: Callable[[str], None] = print

    def want(self, *names: str) -> list[str]:
        return [n for n in self.targets if n in names]


# -- helpers -------------------------------------------------------------------------------------


@contextmanager
def running(ctx: Context, names: list[str], **launch: Any) -> Iterator[tuple[dict[str, Target], dict[str, str]]]:
    """Launch the targets together, wait until each answers; stop them all at the end.
    Yields (started targets, launch failures by target)."""
    started: dict[str, Target] = {}
    errors: dict[str, str] = {}
    try:
        for name in names:
            try:
                started[name] = Target(name).launch(ctx.run_dir, **launch)
            except Exception as exc:
                errors[name] = f"did not start: {failure(exc)}"
        for name, target in list(started.items()):
            try:
                target.wait_ready()
            except Exception as exc:
                errors[name] = f"did not start: {failure(exc)}"
                target.stop()
                del started[name]
        yield started, errors
    finally:
        for target in started.values():
            target.stop()


def warm(target: Target, server: str = "bench", timeout: float = 30.0) -> None:
    """Make sure the proxied backend runs and answers (starting it if lazily started)."""
    deadline = time.perf_counter() + timeout
    last = ""
    while time.perf_counter() < deadline:
        try:
            status, body = get(target.port, target.path("/small", server), target.headers, timeout=timeout)
            if status == 200:
                return
            last = f"HTTP {status} {body[:100]!r}"
        except (OSError, ProtocolFailure) as exc:
            last = failure(exc)
        time.sleep(0.01)
    raise RuntimeError(f"{target.name}: /{server}/ not answering: {last}")



def unusable(started: dict[str, Any], errors: dict[str, str]) -> dict[str, str]:
    """Warm the started proxies up; those that fail leave ``started``. Why each target is out."""
    out = dict(errors)
    for name, target in list(started.items()):
        if name in PROXIES:
            try:
                warm(target)
            except Exception as exc:
                out[name] = failure(exc)
                del started[name]
    return out


def per_target(names: list[str]) -> dict[str, list[Any]]:
    return {name: [] for name in names}


def backend_own_start(run_dir: Path, sleep: float) -> tuple[float, float]:
    """The backend's own start-up, spawned by this runner: (spawn to listening, spawn to its
    script's first line), in ms."""
    scratch = Path(tempfile.mkdtemp(prefix="own-", dir=run_dir))
    from .targets import free_port, process_env, read_listen_log

    port = free_port()
    log = scratch / "listen.log"
    env = process_env(TRIOPROXY_BENCH_DIR=str(scratch))
    t0 = time.time()
    proc = subprocess.Popen(
        [backend_python(), str(BACKEND), str(port), "--sleep", str(sleep), "--name", "own"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.perf_counter() + 30 + sleep
        while True:
            lines = read_listen_log(log) if log.exists() and log.read_bytes().endswith(b"\n") else []
            if lines:
                _, _, script, listening = lines[0]
                return (listening - t0) * 1000, (script - t0) * 1000
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError("the backend did not start")
            time.sleep(0.0005)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def _errors_text(errors: dict[str, int] | Counter) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))


# -- proxy start-up ------------------------------------------------------------------------------


def startup(ctx: Context) -> None:
    names = ctx.targets
    runs, fails = per_target(names), per_target(names)
    first = 1 if ctx.plan.quick else 0  # a full run launches each once first (rep 0), unmeasured
    for rep in range(first, ctx.plan.startup_reps + 1):
        for name in names:
            target = Target(name)
            try:
                target.launch(ctx.run_dir)
                seconds = target.wait_ready()
                if rep:  # launch 0 only warms caches (files, bytecode)
                    runs[name].append(seconds * 1000)
            except Exception as exc:
                fails[name].append(failure(exc))
            finally:
                target.stop()
    ctx.rows.add(
        "startup_ms", "startup", "start-up: launch to first answered request", "ms",
        {n: summary(runs[n], fails[n]) for n in names}, better="lower",
    )


# -- cold start ----------------------------------------------------------------------------------


def cold_start(ctx: Context) -> None:
    """First request to a lazily started server until its 200.

    The overhead of a proxy is that time minus the backend's own start-up. The backend logs
    when its script began and when it listened, so per run: overhead = total - (listening -
    script start) - (the interpreter's launch: spawn to script start, the median of direct
    spawns by this runner, measured between the proxied runs)."""
    plan = ctx.plan
    proxies = ctx.want(*PROXIES)
    keys = [(n, s) for n in proxies for s in plan.cold_sleeps]
    own: dict[float, list[float]] = {s: [] for s in plan.cold_sleeps}
    launch: list[float] = []
    totals: dict[tuple[str, float], list[float]] = {k: [] for k in keys}
    after: dict[tuple[str, float], list[float]] = {k: [] for k in keys}
    backend_part: dict[tuple[str, float], list[float]] = {k: [] for k in keys}
    spawn: dict[tuple[str, float], list[float]] = {k: [] for k in keys}
    fails: dict[tuple[str, float], list[str]] = {k: [] for k in keys}
    backend_own_start(ctx.run_dir, 0.0)  # a warm-up: file caches, bytecode
    with running(ctx, proxies, cold_copies=plan.cold_copies) as (started, errors):
        for (name, s), messages in fails.items():
            if name in errors:
                messages.append(errors[name])
        for s in plan.cold_sleeps:
            for copy in range(1, plan.cold_copies + 1):
                total_ms, launch_ms = backend_own_start(ctx.run_dir, s)
                own[s].append(total_ms)
                launch.append(launch_ms)
                for name, target in started.items():
                    server = f"cold{int(s * 1000)}_{copy}"
                    t0 = time.time()
                    try:
                        status, body = get(target.port, target.path("/small", server), target.headers, timeout=60)
                    except (OSError, ProtocolFailure) as exc:
                        fails[name, s].append(failure(exc))
                        continue
                    t1 = time.time()
                    if status != 200:
                        fails[name, s].append(f"HTTP {status}: {body[:120]!r}")
                        continue
                    logged = [(script, listening) for n, _, script, listening in target.listen_log() if n == server]
                    if not logged:
                        fails[name, s].append("the backend did not log its start")
                        continue
                    script, listening = logged[-1]
                    totals[name, s].append((t1 - t0) * 1000)
                    after[name, s].append((t1 - listening) * 1000)
                    backend_part[name, s].append((listening - script) * 1000)
                    spawn[name, s].append((script - t0) * 1000)
    launch_median = summary(launch)["median"]
    for s in plan.cold_sleeps:
        ms = int(s * 1000)
        label = f"{s:g} s backend"
        ctx.rows.add(
            f"cold{ms}_total_ms", "cold-start", f"cold start, {label}: request to 200 (direct: own start)", "ms",
            {DIRECT: summary(own[s]), **{n: summary(totals[n, s], fails[n, s]) for n in proxies}}, better="lower",
        )
        ctx.rows.add(
            f"cold{ms}_overhead_ms", "cold-start", f"cold start, {label}: overhead over own start", "ms",
            {
                n: summary(
                    [t - b - launch_median for t, b in zip(totals[n, s], backend_part[n, s])], fails[n, s]
                )
                for n in proxies
            },
            better="lower",
        )
        ctx.rows.add(
            f"cold{ms}_spawn_ms", "cold-start",
            f"cold start, {label}: request to backend script running (direct: spawn by the runner)", "ms",
            {DIRECT: summary(launch), **{n: summary(spawn[n, s], fails[n, s]) for n in proxies}}, better="lower",
        )
        ctx.rows.add(
            f"cold{ms}_after_listen_ms", "cold-start", f"cold start, {label}: backend listening to 200", "ms",
            {n: summary(after[n, s], fails[n, s]) for n in proxies}, better="lower",
        )
    ctx.raw["cold_start"] = {
        "own_start_ms": {str(s): v for s, v in own.items()},
        "interpreter_launch_ms": launch,
        "proxied_total_ms": {f"{n} {s}": v for (n, s), v in totals.items()},
        "proxied_backend_own_ms": {f"{n} {s}": v for (n, s), v in backend_part.items()},
        "proxied_spawn_ms": {f"{n} {s}": v for (n, s), v in spawn.items()},
        "proxied_after_listen_ms": {f"{n} {s}": v for (n, s), v in after.items()},
    }


# -- restart under load --------------------------------------------------------------------------


async def _kill_under_load(target: Target, pid: int, plan: Plan) -> dict[str, Any]:
    state: dict[str, float | None] = {"kill": None, "recovered": None}

    def on_record(t0: float, t1: float, outcome: object) -> None:
        kill = state["kill"]
        if kill is not None and state["recovered"] is None and outcome == 200 and t0 >= kill:
            state["recovered"] = t1

    def stop() -> bool:
        kill, recovered = state["kill"], state["recovered"]
        if kill is None:
            return False
        now = time.perf_counter()
        if recovered is not None:
            return now >= recovered + plan.restart_tail
        return now >= kill + plan.restart_max_wait

    async def killer() -> None:
        await asyncio.sleep(plan.restart_lead)
        state["kill"] = time.perf_counter()
        os.kill(pid, signal.SIGKILL)

    kill_task = asyncio.ensure_future(killer())
    result = await http_load(
        target.port, target.path("/small"), target.headers, plan.restart_concurrency,
        duration=plan.restart_lead + plan.restart_max_wait + plan.restart_tail + 1,
        keep_records=True, stop=stop, on_record=on_record, error_pause=0.001, pause=plan.restart_pause,
        request_timeout=30,
    )
    await kill_task
    kill, recovered = state["kill"], state["recovered"]
    assert kill is not None
    failed = Counter(
        (f"HTTP {o}" if isinstance(o, int) else str(o)) + (" (sent before the kill)" if t0 < kill else " (sent after)")
        for t0, _, o in result.records
        if o != 200
    )
    before = sum(1 for t0, t1, o in result.records if t1 < kill and o == 200)
    rate = before / plan.restart_lead
    return {
        "kill_wall": time.time() - (time.perf_counter() - kill),
        "load_rps": rate,
        "recovery_ms": None if recovered is None else (recovered - kill) * 1000,
        "failed": sum(failed.values()),
        "failures": dict(failed),
        "ok_before_kill": before,
        "requests": len(result.records),
    }


def restart(ctx: Context) -> None:
    plan = ctx.plan
    backend_own_start(ctx.run_dir, 0.0)  # a warm-up
    own_runs = [backend_own_start(ctx.run_dir, 0.0) for _ in range(5)]
    own = [total for total, _ in own_runs]
    own_launch = summary([launch for _, launch in own_runs])["median"]
    proxies = ctx.want(*PROXIES)
    recovery, failed, fails = per_target(proxies), per_target(proxies), per_target(proxies)
    details: dict[str, Counter] = {n: Counter() for n in proxies}
    raw: dict[str, list[Any]] = per_target(proxies)
    # A fresh proxy for every kill: each kill is the first one its supervisor sees, as in real
    # life (trioproxy's restart policy backs off on repeated failures within a minute).
    for _ in range(plan.restart_reps):
        with running(ctx, proxies) as (started, errors):
            for name, message in errors.items():
                fails[name].append(message)
            for name, target in started.items():
                try:
                    warm(target, timeout=15)
                    pid = target.backend_pid()
                    if not pid:
                        raise RuntimeError("cannot find the backend's pid")
                    outcome = asyncio.run(_kill_under_load(target, pid, plan))
                except Exception as exc:
                    fails[name].append(failure(exc))
                    continue
                try:
                    warm(target, timeout=15)
                except Exception:
                    pass
                # When did the new process start its script and listen (it logs both)?
                later = [(s, l) for n, _, s, l in target.listen_log() if n == "bench" and s > outcome["kill_wall"]]
                if later:
                    script, listening = later[0]
                    outcome["kill_to_script_ms"] = (script - outcome["kill_wall"]) * 1000
                    outcome["script_to_listen_ms"] = (listening - script) * 1000
                    if outcome["recovery_ms"] is not None:
                        outcome["listen_to_success_ms"] = outcome["recovery_ms"] - (listening - outcome["kill_wall"]) * 1000
                raw[name].append(outcome)
                failed[name].append(float(outcome["failed"]))
                details[name].update(outcome["failures"])
                if outcome["recovery_ms"] is None:
                    fails[name].append(f"no request succeeded within {plan.restart_max_wait:g} s of the kill")
                else:
                    recovery[name].append(outcome["recovery_ms"])
    rows_recovery = {DIRECT: summary(own)} if DIRECT in ctx.targets else {}
    rows_recovery.update({n: summary(recovery[n], fails[n]) for n in proxies})
    for n in proxies:
        parts = []
        for key, what in (("kill_to_script_ms", "kill to new script start"), ("script_to_listen_ms", "script to listening"),
                          ("listen_to_success_ms", "listening to success")):
            numbers = [o[key] for o in raw[n] if key in o]
            if numbers:
                parts.append(f"{what} {summary(numbers)['median']:.1f} ms")
        loads = [o["load_rps"] for o in raw[n]]
        if loads:
            parts.append(f"load {summary(loads)['median']:.0f} req/s before the kill")
        if n in rows_recovery and parts:
            rows_recovery[n]["detail"] = (
                "median " + ", ".join(parts) + f" (idle, spawned by the runner: spawn to script start "
                f"{own_launch:.1f} ms, to listening {summary(own)['median']:.1f} ms)"
            )
    ctx.rows.add(
        "restart_recovery_ms", "restart",
        "restart: SIGKILL to first success of a new request (direct: backend's own start)", "ms",
        rows_recovery, better="lower",
    )
    values = {}
    for n in proxies:
        value = summary(failed[n], fails[n] if not failed[n] else [])
        value["detail"] = _errors_text(details[n])
        value["total"] = sum(failed[n])
        values[n] = value
    ctx.rows.add("restart_failed", "restart", "restart: failed requests per kill", "requests", values, better="lower")
    ctx.raw["restart"] = raw
    ctx.raw["restart_own_start_ms"] = own


# -- crash loop ----------------------------------------------------------------------------------


async def _crash_client(target: Target, duration: float, interval: float, statuses: Counter) -> None:
    request = (
        f"GET /crash/ HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
        + "Connection: close\r\n\r\n"
    ).encode()

    async def loop() -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                statuses[f"HTTP {int(head.split(b' ', 2)[1])}"] += 1
                writer.close()
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                statuses[type(exc).__name__] += 1
            await asyncio.sleep(interval)

    try:
        await asyncio.wait_for(loop(), duration)
    except asyncio.TimeoutError:
        pass  # the end of the measurement, possibly with a request still waiting


def crash_loop(ctx: Context) -> None:
    plan = ctx.plan
    proxies = ctx.want(*PROXIES)
    rate = {n: summary([], ["not measured"]) for n in proxies}
    total: dict[str, dict[str, Any]] = {}
    cpu: dict[str, dict[str, Any]] = {}
    raw: dict[str, Any] = {}
    with running(ctx, proxies) as (started, errors):
        for name, message in errors.items():
            rate[name] = total[name] = cpu[name] = summary([], [message])
        statuses = {n: Counter() for n in started}
        cpu0 = {n: cpu_seconds(t.pid) for n, t in started.items()}
        t_start = time.time()

        async def all_clients() -> None:
            await asyncio.gather(
                *(_crash_client(t, plan.crash_duration, plan.crash_interval, statuses[n]) for n, t in started.items())
            )

        asyncio.run(all_clients())
        wall = time.time() - t_start
        for name, target in started.items():
            own1, kids1 = cpu_seconds(target.pid)
            own0, kids0 = cpu0[name]
            assert target.scratch is not None
            log = target.scratch / "crash.log"
            spawns = [float(x) - t_start for x in log.read_text().split()] if log.exists() else []
            steady = plan.crash_duration - plan.crash_steady_from
            windows = []
            for i in range(3):
                lo = plan.crash_steady_from + i * steady / 3
                hi = lo + steady / 3
                windows.append(sum(1 for s in spawns if lo <= s < hi) * 60 / (steady / 3))
            rate[name] = summary(windows)
            rate[name]["detail"] = (
                f"{len(spawns)} spawns in {wall:.0f} s, {sum(1 for s in spawns if s < plan.crash_steady_from)} "
                f"in the first {plan.crash_steady_from:g} s; answers: {_errors_text(statuses[name]) or 'none (every request still waiting)'}"
            )
            total[name] = summary([float(len(spawns))])
            cpu[name] = summary([(own1 - own0) / wall * 100])
            cpu[name]["detail"] = f"children: {(kids1 - kids0) / wall * 100:.1f}% of a core"
            raw[name] = {
                "spawn_times": [round(s, 4) for s in spawns[:500]],  # the first 500, seconds from the start
                "answers": dict(statuses[name]),
                "proxy_cpu_s": own1 - own0,
                "children_cpu_s": kids1 - kids0,
                "wall_s": wall,
            }
    ctx.rows.add(
        "crash_spawns_per_min", "crash-loop",
        f"crash loop: spawns/min after the first {plan.crash_steady_from:g} s", "/min", rate, better="lower",
    )
    ctx.rows.add("crash_spawns_total", "crash-loop", f"crash loop: spawns in {plan.crash_duration:g} s", "spawns",
                 total, better="lower")
    ctx.rows.add("crash_cpu_pct", "crash-loop", "crash loop: proxy CPU (% of one core)", "%", cpu, better="lower")
    ctx.raw["crash_loop"] = raw


# -- small requests ------------------------------------------------------------------------------

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _wrk_latency(text: str, label: str) -> float:
    match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    if not match:
        raise RuntimeError(f"no {label} latency in wrk's output")
    return float(match.group(1)) * _WRK_UNITS[match.group(2)]


def run_wrk(target: Target, concurrency: int, duration: float) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "10s"]
    for k, v in target.headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(f"http://127.0.0.1:{target.port}{target.path('/small')}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr.strip()[:200]}")
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {
        "rps": rps,
        "p50_ms": _wrk_latency(text, "50%"),
        "p99_ms": _wrk_latency(text, "99%"),
        "requests": total,
        "errors": errors,
    }


def run_python_load(target: Target, concurrency: int, duration: float) -> dict[str, Any]:
    result = asyncio.run(http_load(target.port, target.path("/small"), target.headers, concurrency, duration))
    lat = sorted(result.latencies)
    if not lat:
        raise RuntimeError(f"no request succeeded: {_errors_text(result.errors)}")
    return {
        "rps": result.ok / result.elapsed,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "requests": result.ok + sum(result.errors.values()),
        "errors": sum(result.errors.values()),
    }


def small_requests(ctx: Context) -> None:
    plan = ctx.plan
    names = ctx.targets
    load = run_wrk if plan.loadgen == "wrk" else run_python_load
    figures = {(n, c, k): [] for n in names for c in plan.small_concurrency for k in ("rps", "p50_ms", "p99_ms")}
    fails = {(n, c): [] for n in names for c in plan.small_concurrency}
    with running(ctx, names) as (started, errors):
        for name, why in unusable(started, errors).items():
            for c in plan.small_concurrency:
                fails[name, c].append(why)
        for c in plan.small_concurrency:
            for target in started.values():
                if plan.small_warmup <= 0:
                    break
                try:
                    load(target, c, plan.small_warmup)
                except Exception:
                    pass  # the measured runs will say
            for _ in range(plan.small_reps):
                for name, target in started.items():
                    try:
                        figure = load(target, c, plan.small_duration)
                    except Exception as exc:
                        fails[name, c].append(failure(exc))
                        continue
                    if figure["errors"] > 0.001 * figure["requests"]:
                        fails[name, c].append(f"{figure['errors']} of {figure['requests']} requests failed")
                        continue
                    for k in ("rps", "p50_ms", "p99_ms"):
                        figures[name, c, k].append(figure[k])
    for c in plan.small_concurrency:
        ctx.rows.add(
            f"small_c{c}_rps", "small", f"small GET, concurrency {c}: throughput", "req/s",
            {n: summary(figures[n, c, "rps"], fails[n, c]) for n in names},
        )
        for k, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            ctx.rows.add(
                f"small_c{c}_{k}", "small", f"small GET, concurrency {c}: {label} latency", "ms",
                {n: summary(figures[n, c, k], fails[n, c]) for n in names}, better="lower",
            )
    ctx.raw["small_loadgen"] = plan.loadgen


# -- large transfers -----------------------------------------------------------------------------


class PeakRSS:
    """The peak resident memory of one process during a block: VmHWM after resetting it,
    and VmRSS polled every 10 ms as a cross-check."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.polled = 0
        self.hwm: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        if self.pid is None:
            return self
        self._reset = reset_peak_rss(self.pid)
        self.polled = memory_kib(self.pid).get("VmRSS", 0)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        assert self.pid is not None
        while not self._stop.wait(0.01):
            try:
                self.polled = max(self.polled, memory_kib(self.pid).get("VmRSS", 0))
            except OSError:
                return

    def __exit__(self, *exc: object) -> None:
        if self.pid is None:
            return
        self._stop.set()
        self._thread.join()
        try:
            mem = memory_kib(self.pid)
            self.polled = max(self.polled, mem.get("VmRSS", 0))
            if self._reset:
                self.hwm = mem.get("VmHWM")
        except OSError:
            pass

    @property
    def peak_mib(self) -> float | None:
        if self.pid is None:
            return None
        return max(self.polled, self.hwm or 0) / 1024


def download(target: Target, size: int, proxy_pid: int | None) -> dict[str, Any]:
    with HTTPConnection(target.port, timeout=120) as conn, PeakRSS(proxy_pid) as rss:
        t0 = time.perf_counter()
        conn.send_request("GET", target.path(f"/bytes?size={size}"), target.headers)
        response = conn.read_response()
        if response.status != 200:
            body = response.read()
            return {"error": f"HTTP {response.status}: {describe_body(body)}", "rss_failed": rss}
        crc, received, first = 0, 0, None
        try:
            for view in response.iter_views():
                if first is None:
                    first = time.perf_counter()
                crc = zlib.crc32(view, crc)
                received += len(view)
        except (OSError, ProtocolFailure) as exc:
            return {"error": f"broken after {received / MiB:.0f} MiB: {failure(exc)}", "rss_failed": rss}
        t1 = time.perf_counter()
    exact = received == size and crc == pattern_crc32(size)
    return {
        "mbps": size / (t1 - t0) / 1e6,
        "ttfb_ms": ((first or t1) - t0) * 1000,
        "rss_mib": rss.peak_mib,
        "exact": exact,
        "detail": "" if exact else f"received {received} bytes, crc {'ok' if crc == pattern_crc32(size) else 'wrong'}",
    }


def upload(target: Target, size: int, proxy_pid: int | None) -> dict[str, Any]:
    view = memoryview(BLOCK)
    with HTTPConnection(target.port, timeout=120) as conn, PeakRSS(proxy_pid) as rss:
        t0 = time.perf_counter()
        conn.send_request(
            "POST", target.path("/upload"),
            {**target.headers, "Content-Type": "application/octet-stream"}, content_length=size,
        )
        sent, send_error = 0, None
        try:
            while sent < size:
                n = min(size - sent, len(view))
                conn.sock.sendall(view[:n])
                sent += n
        except OSError as exc:
            send_error = exc
        try:
            response = conn.read_response()
            body = response.read()
        except (OSError, ProtocolFailure) as exc:
            why = failure(send_error or exc)
            return {"error": f"no answer after sending {sent / MiB:.0f} of {size / MiB:.0f} MiB: {why}",
                    "rss_failed": rss}
        t1 = time.perf_counter()
    if response.status != 200:
        return {"error": f"HTTP {response.status} after sending {sent / MiB:.0f} MiB: {describe_body(body)}",
                "rss_failed": rss}
    answer = json.loads(body)
    exact = answer.get("length") == size and answer.get("crc32") == pattern_crc32(size)
    return {
        "mbps": size / (t1 - t0) / 1e6,
        "rss_mib": rss.peak_mib,
        "exact": exact,
        "detail": "" if exact else f"backend got {answer}",
    }


def large_transfers(ctx: Context) -> None:
    plan = ctx.plan
    names = ctx.want(DIRECT, *PROXIES)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {(n, d): [] for n in names for d in ("down", "up")}
    with running(ctx, names) as (started, errors):
        for name, why in unusable(started, errors).items():
            for d in ("down", "up"):
                results[name, d].append({"error": why})
        pattern_crc32(plan.download_size)
        pattern_crc32(plan.upload_size)
        for direction, size, fn in (("down", plan.download_size, download), ("up", plan.upload_size, upload)):
            for _ in range(plan.transfer_reps):
                for name, target in started.items():
                    proxy_pid = target.pid if name in PROXIES else None
                    try:
                        outcome = fn(target, size, proxy_pid)
                    except Exception as exc:
                        outcome = {"error": failure(exc)}
                    rss = outcome.pop("rss_failed", None)
                    if rss is not None:
                        outcome["rss_mib"] = rss.peak_mib  # what the proxy held until it failed
                    results[name, direction].append(outcome)
    for direction, size, what in (("down", plan.download_size, "download"), ("up", plan.upload_size, "upload")):
        size_text = f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size / MiB:g} MiB"

        def values(key: str, only: tuple[str, ...] = tuple(names), failed_too: bool = False) -> dict[str, dict[str, Any]]:
            out = {}
            for n in names:
                if n not in only:
                    continue
                runs = results[n, direction]
                numbers = [r[key] for r in runs if (failed_too or "error" not in r) and r.get(key) is not None]
                out[n] = summary(numbers, [r["error"] for r in runs if "error" in r])
            return out

        ctx.rows.add(f"{direction}_mbps", "large", f"{what} {size_text}: throughput", "MB/s", values("mbps"))
        if direction == "down":
            ctx.rows.add("down_ttfb_ms", "large", f"download {size_text}: time to first byte", "ms",
                         values("ttfb_ms"), better="lower")
        ctx.rows.add(f"{direction}_rss_mib", "large", f"{what} {size_text}: proxy peak RSS (a failed run: until it failed)", "MiB",
                     values("rss_mib", PROXIES, failed_too=True), better="lower")
        exact = {}
        for n in names:
            runs = results[n, direction]
            bad = [r.get("error") or r.get("detail") or "not byte-exact" for r in runs if "error" in r or not r.get("exact")]
            exact[n] = verdict(bool(runs) and not bad, "; ".join(sorted(set(bad)))[:300] if bad else f"{len(runs)}/{len(runs)} exact")
        ctx.rows.add(f"{direction}_exact", "large", f"{what} {size_text}: byte-exact (crc32)", "", exact, kind="verdict")
    ctx.raw["large"] = {f"{n} {d}": v for (n, d), v in results.items()}


# -- WebSocket -----------------------------------------------------------------------------------


def ws_sequential(target: Target, duration: float, size: int) -> dict[str, Any]:
    payload = os.urandom(size)
    ws = WebSocket(target.port, target.path("/ws"), target.headers)
    latencies = []
    try:
        end = time.perf_counter() + duration
        start = time.perf_counter()
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            ws.send(payload)
            opcode, data = ws.receive()
            if opcode != 0x2 or data != payload:
                raise ProtocolFailure(f"wrong echo (opcode {opcode}, {len(data)} bytes)")
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    finally:
        ws.close()
    latencies.sort()
    return {
        "rate": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def ws_concurrent(target: Target, connections: int, duration: float, size: int) -> dict[str, Any]:
    result, opened = asyncio.run(
        ws_load(target.port, target.path("/ws"), target.headers, connections, duration, size)
    )
    if opened < connections or result.errors:
        raise RuntimeError(f"{opened}/{connections} connections opened; errors: {_errors_text(result.errors)}")
    latencies = sorted(result.latencies)
    return {
        "rate": len(latencies) / result.elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def websocket(ctx: Context) -> None:
    plan = ctx.plan
    names = ctx.want(DIRECT, *PROXIES)
    modes = ("seq", "conc")
    figures = {(n, m, k): [] for n in names for m in modes for k in ("rate", "p50_ms", "p99_ms")}
    fails = {(n, m): [] for n in names for m in modes}
    with running(ctx, names) as (started, errors):
        for name, why in unusable(started, errors).items():
            for m in modes:
                fails[name, m].append(why)
        for mode in modes:
            for _ in range(plan.ws_reps):
                for name, target in started.items():
                    if not figures[name, mode, "rate"] and any("handshake" in f for f in fails[name, mode]):
                        continue  # no WebSocket gets through at all: do not wait for it again
                    try:
                        if mode == "seq":
                            figure = ws_sequential(target, plan.ws_duration, plan.ws_size)
                        else:
                            figure = ws_concurrent(target, plan.ws_connections, plan.ws_duration, plan.ws_size)
                    except Exception as exc:
                        fails[name, mode].append(failure(exc))
                        continue
                    for k in ("rate", "p50_ms", "p99_ms"):
                        figures[name, mode, k].append(figure[k])
    for mode, label in (("seq", "1 connection"), ("conc", f"{plan.ws_connections} connections")):
        ctx.rows.add(
            f"ws_{mode}_rate", "websocket", f"WebSocket {plan.ws_size // 1024} KiB echo, {label}: round trips", "msg/s",
            {n: summary(figures[n, mode, "rate"], fails[n, mode]) for n in names},
        )
        for k, what in (("p50_ms", "p50"), ("p99_ms", "p99")):
            ctx.rows.add(
                f"ws_{mode}_{k}", "websocket", f"WebSocket echo, {label}: {what} round trip", "ms",
                {n: summary(figures[n, mode, k], fails[n, mode]) for n in names}, better="lower",
            )


def json_message(size: int) -> bytes:
    """A JSON document of about ``size`` bytes: rows of numbers and names, as a plot update."""
    rows, n = [], 0
    while n < size:
        row = {"x": n * 0.25, "y": (n * 7919) % 1000 / 3, "label": f"point-{n}", "ok": n % 3 == 0}
        rows.append(row)
        n += len(json.dumps(row)) + 2
    return json.dumps({"data": rows}).encode()


def ws_large(target: Target, duration: float, message: bytes, offer_deflate: bool, proxy_pid: int | None) -> dict[str, Any]:
    """Echo ``message`` one round trip at a time; MB/s of message bytes each way, proxy CPU/MB."""
    ws = WebSocket(target.port, target.path("/ws"), target.headers, timeout=30, offer_deflate=offer_deflate)
    count = 0
    try:
        cpu0 = sum(cpu_seconds(proxy_pid)) if proxy_pid else 0.0
        start = time.perf_counter()
        end = start + duration
        while time.perf_counter() < end:
            ws.send(message, opcode=0x1)
            opcode, data = ws.receive()
            if opcode != 0x1 or data != message:
                raise ProtocolFailure(f"wrong echo (opcode {opcode}, {len(data)} bytes)")
            count += 1
        elapsed = time.perf_counter() - start
        cpu = (sum(cpu_seconds(proxy_pid)) - cpu0) if proxy_pid else None
    finally:
        ws.close()
    megabytes = count * len(message) / 1e6
    return {
        "mbps": megabytes / elapsed,
        "cpu_ms_per_mb": None if cpu is None else cpu * 1000 / megabytes,
        "negotiated": ws.extensions or "none",
    }


def websocket_large(ctx: Context) -> None:
    plan = ctx.plan
    names = ctx.want(DIRECT, *PROXIES)
    modes = ("plain", "deflate")
    message = json_message(plan.ws_large_size)
    figures = {(n, m, k): [] for n in names for m in modes for k in ("mbps", "cpu_ms_per_mb")}
    fails = {(n, m): [] for n in names for m in modes}
    negotiated: dict[str, set[str]] = {}
    with running(ctx, names) as (started, errors):
        for name, why in unusable(started, errors).items():
            for m in modes:
                fails[name, m].append(why)
        for mode in modes:
            for _ in range(plan.ws_large_reps):
                for name, target in started.items():
                    pid = target.pid if name in PROXIES else None
                    try:
                        figure = ws_large(target, plan.ws_large_duration, message, mode == "deflate", pid)
                    except Exception as exc:
                        fails[name, mode].append(failure(exc))
                        continue
                    figures[name, mode, "mbps"].append(figure["mbps"])
                    if figure["cpu_ms_per_mb"] is not None:
                        figures[name, mode, "cpu_ms_per_mb"].append(figure["cpu_ms_per_mb"])
                    negotiated.setdefault(f"{name} {mode}", set()).add(figure["negotiated"])
    ctx.raw["websocket_large"] = {"message_bytes": len(message), "negotiated": {k: sorted(v) for k, v in negotiated.items()}}
    size = f"{len(message) / 1e6:.1f} MB"
    for mode, label in (("plain", "client without compression"), ("deflate", "client offering permessage-deflate")):
        ctx.rows.add(
            f"ws_large_{mode}_mbps", "websocket-large", f"WebSocket {size} JSON echo, {label}", "MB/s",
            {n: summary(figures[n, mode, "mbps"], fails[n, mode]) for n in names},
        )
        ctx.rows.add(
            f"ws_large_{mode}_cpu", "websocket-large", f"WebSocket {size} JSON echo, {label}: proxy CPU per MB", "ms/MB",
            {n: summary(figures[n, mode, "cpu_ms_per_mb"], fails[n, mode]) for n in names if n in PROXIES},
            better="lower",
        )


# -- server-sent events --------------------------------------------------------------------------


def sse_once(target: Target, events: int, interval: float, accept: bool) -> list[float]:
    """Latency (ms) of each event: arrival time minus the time the backend sent it."""
    headers = dict(target.headers)
    if accept:
        headers["Accept"] = "text/event-stream"
    latencies: list[float] = []
    with HTTPConnection(target.port, timeout=30) as conn:
        conn.send_request("GET", target.path(f"/sse?n={events}&interval={interval}"), headers)
        response = conn.read_response()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:120]!r}")
        pending = b""
        for chunk in response.iter_body():
            arrival = time.time()
            pending += chunk
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        sent = float(line.split()[2])
                        latencies.append((arrival - sent) * 1000)
    if len(latencies) != events:
        raise RuntimeError(f"{len(latencies)} of {events} events arrived")
    return latencies


def server_sent_events(ctx: Context) -> None:
    plan = ctx.plan
    names = ctx.want(DIRECT, *PROXIES)
    variants = (("accept", True, "with Accept: text/event-stream"), ("plain", False, "without Accept"))
    worst = {(n, v): [] for n in names for v, _, _ in variants}
    median = {(n, v): [] for n in names for v, _, _ in variants}
    fails = {(n, v): [] for n in names for v, _, _ in variants}
    with running(ctx, names) as (started, errors):
        for name, why in unusable(started, errors).items():
            for v, _, _ in variants:
                fails[name, v].append(why)
        for v, accept, _ in variants:
            for _ in range(plan.sse_reps):
                for name, target in started.items():
                    try:
                        latencies = sorted(sse_once(target, plan.sse_events, plan.sse_interval, accept))
                    except Exception as exc:
                        fails[name, v].append(failure(exc))
                        continue
                    worst[name, v].append(latencies[-1])
                    median[name, v].append(percentile(latencies, 50))
    for v, _, label in variants:
        ctx.rows.add(
            f"sse_{v}_max_ms", "sse", f"SSE {label}: slowest event, send to arrival", "ms",
            {n: summary(worst[n, v], fails[n, v]) for n in names}, better="lower",
        )
        ctx.rows.add(
            f"sse_{v}_p50_ms", "sse", f"SSE {label}: median event, send to arrival", "ms",
            {n: summary(median[n, v], fails[n, v]) for n in names}, better="lower",
        )
        limit = plan.sse_interval * 1000
        incremental = {}
        for n in names:
            if fails[n, v] and not worst[n, v]:
                incremental[n] = verdict(False, "; ".join(sorted(set(fails[n, v]))))
            else:
                slowest = max(worst[n, v])
                incremental[n] = verdict(
                    not fails[n, v] and slowest < limit,
                    f"slowest event {slowest:.1f} ms after it was sent (each next one follows {limit:g} ms later)",
                )
        ctx.rows.add(f"sse_{v}_incremental", "sse", f"SSE {label}: incremental", "", incremental, kind="verdict")


# -- mixed load ----------------------------------------------------------------------------------


def mixed_run(target: Target, plan: Plan, load: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Small GETs at ``plan.mixed_concurrency`` while ``plan.ws_connections`` WebSockets echo
    1 KiB, both on one target at once; each figure counts only the time both loads ran."""
    box: dict[str, Any] = {}

    def websockets() -> None:
        try:
            box["ws"] = asyncio.run(
                ws_load(
                    target.port, target.path("/ws"), target.headers, plan.ws_connections,
                    plan.mixed_duration + 2.0, plan.ws_size, keep_times=True,
                )
            )
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=websockets, name="mixed-websockets")
    thread.start()
    time.sleep(0.5)  # the WebSockets' handshakes (their clock starts once all are open)
    start = time.perf_counter()
    try:
        http = load(target, plan.mixed_concurrency, plan.mixed_duration)
    finally:
        end = time.perf_counter()
        thread.join()
    if "error" in box:
        raise box["error"]
    result, opened = box["ws"]
    if opened < plan.ws_connections or result.errors:
        raise RuntimeError(f"{opened}/{plan.ws_connections} WebSockets opened; errors: {_errors_text(result.errors)}")
    if http["errors"] > 0.001 * http["requests"]:
        raise RuntimeError(f"{http['errors']} of {http['requests']} requests failed")
    during = sorted(t1 - t0 for t0, t1, _ in result.records if start <= t1 <= end)
    return {
        "rps": http["rps"],
        "http_p50_ms": http["p50_ms"],
        "ws_rate": len(during) / (end - start),
        "ws_p50_ms": percentile(during, 50) * 1000 if during else float("nan"),
    }


def mixed_load(ctx: Context) -> None:
    plan = ctx.plan
    names = ctx.want(DIRECT, *PROXIES)
    load = run_wrk if plan.loadgen == "wrk" else run_python_load
    keys = ("rps", "http_p50_ms", "ws_rate", "ws_p50_ms")
    figures: dict[tuple[str, str], list[float]] = {(n, k): [] for n in names for k in keys}
    fails: dict[str, list[str]] = {n: [] for n in names}
    with running(ctx, names) as (started, errors):
        for name, why in unusable(started, errors).items():
            fails[name].append(why)
        for _ in range(plan.mixed_reps):
            for name, target in started.items():
                try:
                    figure = mixed_run(target, plan, load)
                except Exception as exc:
                    fails[name].append(failure(exc))
                    continue
                for k in keys:
                    figures[name, k].append(figure[k])
    what = f"small GETs (c={plan.mixed_concurrency}) while {plan.ws_connections} WebSockets echo 1 KiB"
    for key, label, unit, better in (
        ("rps", "small GETs", "req/s", "higher"),
        ("http_p50_ms", "small GET p50", "ms", "lower"),
        ("ws_rate", "WebSocket round trips", "msg/s", "higher"),
        ("ws_p50_ms", "WebSocket p50 round trip", "ms", "lower"),
    ):
        ctx.rows.add(
            f"mixed_{key}", "mixed", f"mixed load, {what}: {label}", unit,
            {n: summary(figures[n, key], fails[n]) for n in names}, better=better,
        )


SCENARIOS: dict[str, Callable[[Context], None]] = {
    "startup": startup,
    "cold-start": cold_start,
    "restart": restart,
    "crash-loop": crash_loop,
    "small": small_requests,
    "large": large_transfers,
    "websocket": websocket,
    "websocket-large": websocket_large,
    "sse": server_sent_events,
    "mixed": mixed_load,
}
