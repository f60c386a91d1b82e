#!/usr/bin/env python3
"""Profile trioproxy under one benchmark load with py-spy, and summarise where the time goes.

    python benchmarks/profile.py small          # wrk, small GETs at c=32
    python benchmarks/profile.py small1         # wrk, small GETs at c=1
    python benchmarks/profile.py ws             # WebSocket 1 KiB echo, one at a time
    python benchmarks/profile.py ws100          # WebSocket 1 KiB echo on 100 connections
    python benchmarks/profile.py download       # 1 GiB download
    python benchmarks/profile.py upload         # 512 MiB upload
    [--seconds N] [--target trioproxy|jupyter-server-proxy]

py-spy is taken from benchmarks/.env-jsp (pip install py-spy there) or the PATH. Writes
results/profile-<load>.txt (self and inclusive time per function, the hottest stacks) and
results/profile-<load>.collapsed (py-spy's raw stacks, for flamegraph.pl or speedscope).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from suite.scenarios import download, run_wrk, upload, warm, ws_concurrent, ws_sequential  # noqa: E402
from suite.targets import JSP, JSP_ENV, TRIOPROXY, Target, stop_all  # noqa: E402


def py_spy() -> str:
    candidate = JSP_ENV / "bin" / "py-spy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if not found:
        sys.exit("py-spy not found: benchmarks/.env-jsp/bin/pip install py-spy")
    return found


def summarise(collapsed: Path, top: int = 40) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    stacks: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        stacks[";".join(f.split(" (")[0] for f in frames[-6:])] += count
    out = [f"{total} samples"]
    out.append("\n== self time (where the CPU is)")
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out.append("\n== inclusive time")
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    out.append("\n== hottest stack tails")
    out += [f"{100 * c / total:5.1f}%  {s}" for s, c in stacks.most_common(15)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=("small", "small1", "ws", "ws100", "download", "upload"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--target", choices=(TRIOPROXY, JSP), default=TRIOPROXY)
    args = parser.parse_args()
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="trioproxy-profile-"))
    target = Target(args.target)
    try:
        target.start(run_dir)
        warm(target)
        raw = out_dir / f"profile-{args.load}.collapsed"
        spy = subprocess.Popen(
            [py_spy(), "record", "--pid", str(target.pid), "--rate", "500", "--duration", str(int(args.seconds)),
             "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(0.5)
        end = time.perf_counter() + args.seconds - 0.5
        figure = ""
        if args.load in ("small", "small1"):
            result = run_wrk(target, 32 if args.load == "small" else 1, args.seconds - 1)
            figure = f"{result['rps']:.0f} req/s, p50 {result['p50_ms']:.2f} ms"
        elif args.load == "ws":
            result = ws_sequential(target, args.seconds - 1, 1024)
            figure = f"{result['rate']:.0f} msg/s, p50 {result['p50_ms']:.3f} ms"
        elif args.load == "ws100":
            result = ws_concurrent(target, 100, args.seconds - 1, 1024)
            figure = f"{result['rate']:.0f} msg/s, p50 {result['p50_ms']:.3f} ms"
        else:
            rates = []
            while time.perf_counter() < end:
                if args.load == "download":
                    result = download(target, 1 << 30, target.pid)
                else:
                    result = upload(target, 512 << 20, target.pid)
                rates.append(result.get("mbps", 0))
            figure = ", ".join(f"{r:.0f} MB/s" for r in rates)
        spy.wait(timeout=args.seconds + 30)
        if not raw.exists():
            sys.exit(f"py-spy wrote nothing: {spy.stderr.read().decode()[-500:] if spy.stderr else ''}")
        summary = f"{args.target} under '{args.load}': {figure}\n\n" + summarise(raw)
        (out_dir / f"profile-{args.load}.txt").write_text(summary + "\n")
        print(summary[:6000])
        print(f"\nwrote {out_dir / f'profile-{args.load}.txt'} and {raw} (collapsed stacks: flamegraph.pl or speedscope)")
    finally:
        target.stop()
        stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
