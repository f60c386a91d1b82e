"""Draw the benchmark chart from a results JSON: python chart.py RESULTS.json CHART.png

Runs with matplotlib from benchmarks/.env-jsp (run.py calls it). One panel per key figure, a
bar per target (median) with its min–max range; a target that failed shows FAIL; the dashed
line is trioproxy's target where it is a plain threshold.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGETS = ["direct", "trioproxy", "jupyter-server-proxy", "hypercorn"]
LABELS = {"direct": "direct", "trioproxy": "trioproxy", "jupyter-server-proxy": "jsp", "hypercorn": "hypercorn"}
COLORS = {"direct": "#8c8c8c", "trioproxy": "#1f77b4", "jupyter-server-proxy": "#ff7f0e", "hypercorn": "#2ca02c"}

PANELS = [  # row id, title, threshold for trioproxy (or None)
    ("small_c32_rps", "small GET c=32 (req/s) ↑", None),
    ("small_c1_p50_ms", "small GET c=1 p50 (ms) ↓", 1.5),
    ("cold500_overhead_ms", "cold start overhead, 0.5 s backend (ms) ↓", 10),
    ("restart_recovery_ms", "restart: kill → success (ms) ↓\n(direct: backend start)", None),
    ("down_mbps", "download (MB/s) ↑", 400),
    ("up_mbps", "upload (MB/s) ↑", 400),
    ("down_rss_mib", "download: proxy peak RSS (MiB) ↓", 100),
    ("ws_seq_rate", "WebSocket echo, 1 conn (msg/s) ↑", None),
    ("ws_conc_rate", "WebSocket echo, 100 conns (msg/s) ↑", None),
    ("ws_large_deflate_mbps", "WebSocket 0.9 MB JSON, deflate offered (MB/s) ↑", None),
    ("sse_plain_max_ms", "SSE without Accept: slowest event (ms) ↓", None),
    ("crash_spawns_per_min", "crash loop: spawns/min ↓", 10),
    ("startup_ms", "start-up (ms) ↓", 1000),
]


def main() -> None:
    source, destination = sys.argv[1], sys.argv[2]
    with open(source) as f:
        document = json.load(f)
    rows = {row["id"]: row for row in document["rows"]}
    panels = [p for p in PANELS if p[0] in rows]
    columns = 4
    lines = max(1, (len(panels) + columns - 1) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.3 * lines), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (row_id, title, threshold) in zip(axes.flat, panels):
        row = rows[row_id]
        names = [t for t in TARGETS if t in row["values"]]
        medians = [row["values"][n]["median"] for n in names if row["values"][n].get("median", 0) > 0]
        log = bool(medians) and max(medians) / min(medians) > 30
        if log:
            ax.set_yscale("log")
            title += " (log)"
        for i, name in enumerate(names):
            value = row["values"][name]
            if "median" in value:
                med = value["median"]
                ax.bar(i, med, color=COLORS[name])
                ax.errorbar(i, med, yerr=[[med - value["min"]], [value["max"] - med]], color="black", capsize=3, lw=1)
                if value.get("failures"):
                    ax.text(i, 0.02, f"{len(value['failures'])} failed", ha="center", va="bottom", color="red",
                            fontsize=7, transform=ax.get_xaxis_transform())
                ax.annotate(f"{med:,.0f}" if med >= 100 else f"{med:.3g}", (i, med), ha="center", va="bottom",
                            fontsize=8, xytext=(0, 2), textcoords="offset points")
            else:
                ax.text(i, 0.02, "FAIL", ha="center", va="bottom", color="red", fontsize=9, fontweight="bold",
                        transform=ax.get_xaxis_transform())
        ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        if threshold is not None:
            ax.axhline(threshold, color="#1f77b4", ls="--", lw=1)
        check = row.get("check")
        if check and check["pass"] is not None:
            ax.text(0.98, 0.95, "PASS" if check["pass"] else "MISS", transform=ax.transAxes, ha="right", va="top",
                    fontsize=8, color="green" if check["pass"] else "red")
    meta = document["meta"]
    m = meta["machine"]
    fig.suptitle(
        f"trioproxy benchmarks — {meta['mode']} run {meta['date'][:10]}, {m['cpus']} CPUs ({m['cpu_model']}), "
        f"jupyter-server-proxy {meta['versions'].get('jupyter-server-proxy', 'n/a')}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(destination, dpi=90)


if __name__ == "__main__":
    main()
