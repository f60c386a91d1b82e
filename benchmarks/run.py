#!/usr/bin/env python3
"""trioproxy's benchmark suite: the backend alone, trioproxy and jupyter-server-proxy side by
side (plus a bare Hypercorn hello-world for the small-request ceiling), in one run.

    python benchmarks/run.py                  # full run (~8 min); sets up wrk and the jsp env first
    python benchmarks/run.py --quick          # smoke run (< 1 min), no set-up, no chart
    python benchmarks/run.py --only small --only sse
    python benchmarks/run.py --setup          # only (re)install wrk and benchmarks/.env-jsp

See benchmarks/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from suite import report  # noqa: E402
from suite.scenarios import SCENARIOS, Context, Plan  # noqa: E402
from suite.stats import Rows  # noqa: E402
from suite.targets import ALL_TARGETS, JSP, JSP_ENV, REPO, jsp_available, stop_all  # noqa: E402

RESULTS = HERE / "results"


def say(text: str) -> None:
    print(text, flush=True)


# -- set-up ----------------------------------------------------------------------------------


def ensure_wrk(install: bool) -> bool:
    if shutil.which("wrk"):
        return True
    if not install:
        return False
    if os.geteuid() != 0:
        say("wrk is missing and this is not root: install it (apt-get install wrk)")
        return False
    say("installing wrk (apt-get) ...")
    subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, stdout=subprocess.DEVNULL)
    return shutil.which("wrk") is not None


def ensure_jsp_env(force: bool) -> bool:
    """benchmarks/.env-jsp: the latest jupyter-server-proxy from PyPI (with jupyter_server)
    and matplotlib for the chart. Never a dependency of trioproxy itself."""
    if jsp_available() and not force:
        return True
    say(f"setting up {JSP_ENV.relative_to(REPO)} (jupyter-server-proxy, matplotlib) ...")
    base = getattr(sys, "_base_executable", sys.executable)
    if not (JSP_ENV / "bin" / "python").exists():
        subprocess.run([base, "-m", "venv", str(JSP_ENV)], check=True)
    pip = [str(JSP_ENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["--upgrade", "pip"], check=False)
    subprocess.run(pip + ["--upgrade", "jupyter-server-proxy", "matplotlib"], check=True)
    return jsp_available()


# -- facts about the run ---------------------------------------------------------------------


def _output(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    model = ""
    for line in _output(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        mem = f"{kib / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "os": _output(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
    }


def versions(with_jsp: bool) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("trioproxy", "hypercorn", "trio", "quart-trio", "h11"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    if shutil.which("wrk"):
        out["wrk"] = _output(["wrk", "-v"]).split("\n")[0].split(" [")[0].replace("wrk ", "")
    if with_jsp:
        script = (
            "from importlib.metadata import version as v\n"
            "print(' '.join(f'{n}={v(n)}' for n in ('jupyter-server-proxy','jupyter_server','tornado','simpervisor')))"
        )
        for pair in _output([str(JSP_ENV / "bin" / "python"), "-c", script]).split():
            name, _, ver = pair.partition("=")
            out[name] = ver
    return out


# -- the run -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat, no set-up (CI smoke run)")
    parser.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                        help=f"run only these scenarios (repeat or comma-separate): {', '.join(SCENARIOS)}")
    parser.add_argument("--targets", default="", help=f"comma-separated subset of: {', '.join(ALL_TARGETS)}")
    parser.add_argument("--no-jsp", action="store_true", help="leave jupyter-server-proxy out")
    parser.add_argument("--setup", action="store_true", help="(re)install wrk and the jsp env, then exit")
    parser.add_argument("--no-setup", action="store_true", help="do not install anything, even in a full run")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="small-request load generator (auto: wrk; the Python one if wrk is missing in --quick)")
    parser.add_argument("--output", type=Path, help="JSON output (default results/latest.json, quick: results/quick.json)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the logs of every process started")
    args = parser.parse_args(argv)
    only = [s.strip() for item in args.only for s in item.split(",") if s.strip()]
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    args.only = only
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup:
        ok = ensure_wrk(install=True) & ensure_jsp_env(force=True)
        return 0 if ok else 1

    full = not args.quick
    have_wrk = ensure_wrk(install=full and not args.no_setup and args.loadgen != "python")
    if args.loadgen == "auto":
        if not have_wrk and full:
            say("wrk is needed for a full run (apt-get install wrk), or pass --loadgen python")
            return 2
        loadgen = "wrk" if have_wrk else "python"
    else:
        loadgen = args.loadgen
        if loadgen == "wrk" and not have_wrk:
            say("--loadgen wrk: wrk is not installed")
            return 2

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] or list(ALL_TARGETS)
    notes: list[str] = []
    if args.no_jsp and JSP in targets:
        targets.remove(JSP)
    if JSP in targets:
        if full and not args.no_setup:
            ensure_jsp_env(force=False)
        if not jsp_available():
            targets.remove(JSP)
            notes.append(f"jupyter-server-proxy left out: {JSP_ENV.relative_to(REPO)} is not set up "
                         "(python benchmarks/run.py --setup)")
            say(notes[-1])

    plan = Plan.quick_plan(loadgen) if args.quick else Plan(loadgen=loadgen)
    selected = args.only or list(SCENARIOS)
    run_dir = Path(tempfile.mkdtemp(prefix="trioproxy-bench-"))
    rows = Rows()
    ctx = Context(plan=plan, run_dir=run_dir, targets=targets, rows=rows, say=say)
    command = " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    started_at = datetime.datetime.now().astimezone()
    say(f"trioproxy benchmarks ({'quick' if args.quick else 'full'}): targets {', '.join(targets)}; "
        f"scenarios {', '.join(selected)}; load generator {loadgen}")
    load_before = os.getloadavg()
    if load_before[0] > 0.5 and not args.quick:
        say(f"note: the machine is busy (load average {load_before[0]:.2f}); figures will be noisier")

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    scenarios: dict[str, Any] = {}
    t_run = time.perf_counter()
    try:
        for name in selected:
            say(f"== {name}")
            t0 = time.perf_counter()
            before = len(rows.rows)
            record: dict[str, Any] = {"completed": False, "error": None}
            try:
                SCENARIOS[name](ctx)
                record["completed"] = True
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
                record["traceback"] = traceback.format_exc()
                say(f"   scenario {name} failed: {record['error']}")
            finally:
                stop_all()
            record["seconds"] = round(time.perf_counter() - t0, 1)
            record["rows"] = [r["id"] for r in rows.rows[before:]]
            scenarios[name] = record
            report.evaluate(rows.rows[before:])
            shown = [t for t in targets if any(t in r["values"] for r in rows.rows[before:])]
            if rows.rows[before:]:
                say(report.text_table(rows.rows[before:], shown))
            say(f"   ({record['seconds']:.0f} s)")
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        stop_all()
        return 130
    finally:
        stop_all()
        if args.keep_scratch:
            say(f"scratch (logs of every process): {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    report.evaluate(rows.rows)
    shown = [t for t in targets if any(t in r["values"] for r in rows.rows)]
    document = {
        "meta": {
            "date": started_at.isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "command": command,
            "seconds": round(time.perf_counter() - t_run, 1),
            "targets": targets,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "machine": machine(),
            "versions": versions(JSP in targets),
            "notes": notes,
        },
        "plan": plan.__dict__,
        "scenarios": scenarios,
        "rows": rows.rows,
        "raw": ctx.raw,
    }
    output = args.output or RESULTS / ("quick.json" if args.quick else "latest.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1, default=str) + "\n")
    markdown = report.markdown_table(rows.rows, shown)
    output.with_suffix(".md").write_text(markdown + "\n\n" + report.failures_text(rows.rows) + "\n")

    say("\n== results")
    say(report.text_table(rows.rows, shown))
    details = report.failures_text(rows.rows)
    if details:
        say("\nfailures and details:\n" + details)
    say("\n" + report.summary_line(rows.rows))
    incomplete = [n for n, r in scenarios.items() if not r["completed"]]
    if incomplete:
        say(f"scenarios that did not complete: {', '.join(incomplete)}")
    say(f"wrote {output} ({document['meta']['seconds']:.0f} s)")

    complete_full_run = full and not args.only and not args.targets and not incomplete and JSP in targets
    if complete_full_run and not args.output:
        shutil.copyfile(output, HERE / "results.json")
        say(f"wrote {HERE / 'results.json'}")
    if not args.no_chart and not args.quick:
        chart = HERE / "chart.png" if complete_full_run and not args.output else output.with_suffix(".png")
        draw_chart(output, chart)
    return 0 if not incomplete else 1


def draw_chart(results: Path, chart: Path) -> None:
    candidates = [JSP_ENV / "bin" / "python", Path(sys.executable)]
    for python in candidates:
        if not python.exists():
            continue
        probe = subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True)
        if probe.returncode == 0:
            out = subprocess.run([str(python), str(HERE / "chart.py"), str(results), str(chart)],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                say(f"wrote {chart}")
            else:
                say(f"the chart failed: {out.stderr.strip()[-500:]}")
            return
    say("no chart: matplotlib is not installed (python benchmarks/run.py --setup)")


if __name__ == "__main__":
    sys.exit(main())
