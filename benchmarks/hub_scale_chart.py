"""Draw the scale benchmark's chart: python hub_scale_chart.py RESULTS.json CHART.png

Runs with matplotlib (benchmarks/.env-jsp has it). Three panels against N: spawn-to-first-byte
p50, per-user RSS with the app, the Hub's CPU over the run; one line per target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGETS = ("trioproxy", "jsp")


def draw(results: list[dict[str, Any]], destination: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("spawn_to_first_byte_p50_s", "spawn → first byte, p50 (s)"),
        ("rss_with_app_mib", "RSS per user, with its app (MiB)"),
        ("hub_cpu_s", "Hub CPU over the run (s)"),
    ]
    colors = {"trioproxy": "#1f77b4", "jsp": "#ff7f0e"}
    for axis, (key, title) in zip(axes, panels, strict=True):
        for target in TARGETS:
            rows = sorted((r for r in results if r["target"] == target and r.get(key) is not None), key=lambda r: r["users"])
            if rows:
                axis.plot([r["users"] for r in rows], [r[key] for r in rows], "o-", label=target, color=colors[target])
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("users spawning at once")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(destination, dpi=110)



if __name__ == "__main__":
    draw(json.loads(Path(sys.argv[1]).read_text())["results"], Path(sys.argv[2]))
