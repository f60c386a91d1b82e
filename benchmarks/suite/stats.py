"""Figures: median with min and max over runs, failures kept beside them."""

from __future__ import annotations

import statistics
from typing import Any


def summary(values: list[float], failures: list[str] | None = None) -> dict[str, Any]:
    """Median, min, max of the runs that produced a figure; failures as text.

    With no figure at all the summary is a failure: {"error": ...}.
    """
    failures = [f for f in (failures or []) if f]
    if not values:
        reasons = sorted(set(failures))
        return {"error": "; ".join(reasons) if reasons else "no data", "failures": failures}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "runs": [round(v, 6) for v in values],
        "failures": failures,
    }


def verdict(ok: bool, detail: str = "") -> dict[str, Any]:
    return {"ok": bool(ok), "detail": detail}


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; sorted_values must be sorted."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def describe_body(body: bytes, limit: int = 120) -> str:
    """A short text for an error body: an HTML page's message, not its markup."""
    import re

    text = body.decode("utf-8", "replace")
    if "<html" in text[:500].lower() or "<!doctype" in text[:100].lower():
        text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text)
        text = re.sub(r"<[^>]+>", " ", text)
        text = re.sub(r"\s+", " ", text).strip()
        if "The error was:" in text:  # Jupyter Server's error page
            text = text[text.index("The error was:") :]
    text = " ".join(text.split())
    if not text:
        return "(empty body)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def failure(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name


class Rows:
    """The measured figures, one row per metric, each with a value per target."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        id: str,
        scenario: str,
        label: str,
        unit: str,
        values: dict[str, dict[str, Any]],
        better: str = "higher",
        kind: str = "number",
    ) -> dict[str, Any]:
        row = {
            "id": id,
            "scenario": scenario,
            "label": label,
            "unit": unit,
            "better": better,
            "kind": kind,
            "values": values,
        }
        self.rows.append(row)
        return row
