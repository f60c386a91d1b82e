"""The benchmark suite's quick mode runs to the end: every scenario completes.

Only that: timings depend on the machine and are not asserted. jupyter-server-proxy is measured
only where benchmarks/.env-jsp has been set up; without wrk the suite uses its own load
generator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["startup", "cold-start", "restart", "crash-loop", "small", "large", "websocket", "websocket-large", "sse", "mixed"]


def test_quick_benchmark_run_completes(tmp_path: Path) -> None:
    output = tmp_path / "quick.json"
    log = tmp_path / "output.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--output", str(output)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            returncode = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            # SIGTERM lets the runner stop every server it started before it exits.
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise AssertionError("the quick run took longer than 120 s:\n" + log.read_text()[-3000:]) from None
    text = log.read_text()
    assert output.exists(), f"no results written\n{text[-3000:]}"
    results = json.loads(output.read_text())
    assert results["meta"]["mode"] == "quick"
    incomplete = {
        name: record.get("error") for name, record in results["scenarios"].items() if not record["completed"]
    }
    assert not incomplete, f"scenarios that did not complete: {incomplete}\n{text[-3000:]}"
    assert sorted(results["scenarios"]) == sorted(SCENARIOS)
    # Every row has trioproxy's figure or its recorded failure.
    assert results["rows"]
    for row in results["rows"]:
        assert "trioproxy" in row["values"], row["id"]
    assert returncode == 0, text[-3000:]
