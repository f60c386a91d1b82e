"""The targets trioproxy must meet, and the table (text for the terminal, Markdown for the
README), both computed from one run's rows."""

from __future__ import annotations

from typing import Any, Callable

from .targets import ALL_TARGETS, DIRECT, HYPERCORN, JSP, TRIOPROXY

SHORT = {DIRECT: "direct", TRIOPROXY: "trioproxy", JSP: "jsp", HYPERCORN: "hypercorn"}


def median(row: dict[str, Any] | None, target: str) -> float | None:
    if row is None:
        return None
    value = row["values"].get(target)
    if not value or "median" not in value:
        return None
    return float(value["median"])


def _threshold(limit: float, unit: str, higher: bool) -> Callable[[dict[str, Any], dict[str, dict[str, Any]]], tuple[bool | None, str]]:
    def check(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
        value = median(row, TRIOPROXY)
        if value is None:
            return False, "trioproxy: no figure"
        ok = value >= limit if higher else value <= limit
        return ok, f"{value:.4g} {unit}"

    return check


def _versus(other: str, factor: float, metric: str | None = None):
    def check(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
        source = rows.get(metric) if metric else row
        mine, theirs = median(source, TRIOPROXY), median(source, other)
        if mine is None:
            return False, "trioproxy: no figure"
        if theirs is None:
            if other == JSP and source is not None and "error" in source["values"].get(JSP, {}):
                return True, f"{SHORT[other]} failed, trioproxy did not"
            return None, f"{SHORT[other]} not measured"
        return mine >= factor * theirs, f"{mine / theirs:.2f}× {SHORT[other]}"

    return check


def _verdict(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
    value = row["values"].get(TRIOPROXY)
    if not value:
        return False, "trioproxy: not measured"
    return bool(value["ok"]), "" if value["ok"] else value.get("detail", "")[:80]


def _zero_failed(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
    value = row["values"].get(TRIOPROXY)
    if not value or "total" not in value:
        return False, "trioproxy: not measured"
    return value["total"] == 0 and not value.get("failures"), f"{value['total']:g} failed in all"


def _recovery(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
    mine, own = median(row, TRIOPROXY), median(row, DIRECT)
    if mine is None:
        return False, "trioproxy: no recovery"
    if own is None:
        return None, "backend start-up not measured"
    return mine <= own + 20, f"{mine - own:+.1f} ms over the backend's start"


def _all(*checks):
    def check(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> tuple[bool | None, str]:
        results = [c(row, rows) for c in checks]
        oks = [ok for ok, _ in results]
        verdict: bool | None
        if any(ok is False for ok in oks):
            verdict = False
        elif all(ok is True for ok in oks):
            verdict = True
        else:
            verdict = None if not any(ok is True for ok in oks) else True
        return verdict, "; ".join(text for _, text in results)

    return check


# row id -> (what the target is, how it is checked)
TARGETS: dict[str, tuple[str, Callable[..., tuple[bool | None, str]]]] = {
    "startup_ms": ("≤ 1 s", _threshold(1000, "ms", higher=False)),
    "cold0_overhead_ms": ("≤ 10 ms", _threshold(10, "ms", higher=False)),
    "cold500_overhead_ms": ("≤ 10 ms", _threshold(10, "ms", higher=False)),
    "cold2000_overhead_ms": ("≤ 10 ms", _threshold(10, "ms", higher=False)),
    "restart_recovery_ms": ("≤ backend start + 20 ms", _recovery),
    "restart_failed": ("0", _zero_failed),
    "crash_spawns_per_min": ("≤ 10/min", _threshold(10, "/min", higher=False)),
    "crash_cpu_pct": ("near zero (≤ 2%)", _threshold(2, "%", higher=False)),
    "small_c32_rps": ("≥ 2× jsp, ≥ 0.75× hypercorn", _all(_versus(JSP, 2), _versus(HYPERCORN, 0.75))),
    "small_c1_p50_ms": ("≤ 1.5 ms", _threshold(1.5, "ms", higher=False)),
    "down_mbps": ("≥ 400 MB/s", _threshold(400, "MB/s", higher=True)),
    "down_rss_mib": ("≤ 100 MiB", _threshold(100, "MiB", higher=False)),
    "down_exact": ("exact", _verdict),
    "up_mbps": ("≥ 400 MB/s", _threshold(400, "MB/s", higher=True)),
    "up_rss_mib": ("≤ 100 MiB", _threshold(100, "MiB", higher=False)),
    "up_exact": ("exact", _verdict),
    "ws_seq_rate": ("≥ 1.5× jsp", _versus(JSP, 1.5)),
    "ws_conc_rate": ("≥ 1.5× jsp", _versus(JSP, 1.5)),
    "ws_large_deflate_mbps": ("≥ 2× jsp, ≥ 0.75× direct", _all(_versus(JSP, 2), _versus(DIRECT, 0.75))),
    "sse_accept_incremental": ("incremental", _verdict),
    "sse_plain_incremental": ("incremental", _verdict),
}


def evaluate(rows: list[dict[str, Any]]) -> None:
    """Attach {"target", "pass", "why"} to every row that has a target."""
    by_id = {row["id"]: row for row in rows}
    for row in rows:
        if row["id"] in TARGETS:
            text, check = TARGETS[row["id"]]
            try:
                ok, why = check(row, by_id)
            except Exception as exc:  # a check must never lose the run's figures
                ok, why = False, f"check failed: {exc}"
            row["check"] = {"target": text, "pass": ok, "why": why}


# -- formatting ----------------------------------------------------------------------------------


def number(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(row: dict[str, Any], target: str, width: int | None = 48) -> str:
    value = row["values"].get(target)
    if value is None:
        return ""
    if row["kind"] == "verdict":
        return "yes" if value["ok"] else "NO"
    if "median" not in value:
        text = "FAIL: " + value.get("error", "")
        return text if width is None or len(text) <= width else text[: width - 1] + "…"
    text = number(value["median"])
    if value["n"] > 1 and value["min"] != value["max"]:
        text += f" ({number(value['min'])}–{number(value['max'])})"
    if value.get("failures"):
        text += f" [{len(value['failures'])} failed]"
    return text


def ratio(row: dict[str, Any], other: str) -> str:
    mine, theirs = median(row, TRIOPROXY), median(row, other)
    if row["kind"] != "number" or mine is None or theirs is None or theirs == 0:
        return ""
    return f"{mine / theirs:.2f}×"


def table_cells(rows: list[dict[str, Any]], targets: list[str], width: int | None) -> tuple[list[str], list[list[str]]]:
    header = ["metric", "unit"] + [SHORT[t] for t in targets] + ["tp/direct", "tp/jsp", "target", "pass"]
    lines = []
    for row in rows:
        check = row.get("check")
        verdict = ""
        if check:
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[check["pass"]]
        lines.append(
            [row["label"], row["unit"]]
            + [cell(row, t, width) for t in targets]
            + [ratio(row, DIRECT), ratio(row, JSP), check["target"] if check else "", verdict]
        )
    return header, lines


def text_table(rows: list[dict[str, Any]], targets: list[str]) -> str:
    header, lines = table_cells(rows, targets, width=40)
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    out = []
    for i, r in enumerate([header] + lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: list[dict[str, Any]], targets: list[str]) -> str:
    header, lines = table_cells(rows, targets, width=60)

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in lines]
    return "\n".join(out)


def failures_text(rows: list[dict[str, Any]]) -> str:
    """Every failure and detail in full, below the table."""
    out = []
    for row in rows:
        for target in ALL_TARGETS:
            value = row["values"].get(target)
            if not value:
                continue
            notes = []
            if "error" in value:
                notes.append(value["error"])
            elif value.get("failures"):
                notes.append("; ".join(sorted(set(value["failures"]))))
            if value.get("detail") and (row["kind"] != "verdict" or not value["ok"]):
                notes.append(value["detail"])
            if notes:
                out.append(f"- {row['label']} / {SHORT[target]}: " + " — ".join(notes))
        check = row.get("check")
        if check and check["pass"] is False and check["why"]:
            out.append(f"- {row['label']}: target {check['target']} missed: {check['why']}")
    return "\n".join(out)


def summary_line(rows: list[dict[str, Any]]) -> str:
    checks = [r["check"] for r in rows if r.get("check")]
    passed = sum(1 for c in checks if c["pass"] is True)
    failed = sum(1 for c in checks if c["pass"] is False)
    other = len(checks) - passed - failed
    return f"targets: {passed} passed, {failed} missed" + (f", {other} not measurable" if other else "")
