"""How long each server took from its process's start to readiness, for the estimate that a
starting server's page and the launcher show ("usually ready in ~12 s").

Durations are kept per server *name* (a reload that replaces a server keeps its history), the
last :data:`KEEP` of each; the estimate is their median, so one slow start (a cold disk cache)
does not move it much. With a path (the CLI gives one in Jupyter's runtime directory), the
history is read at start-up and written again after every start, atomically, so the next
trioproxy knows it too; several trioproxies sharing the directory each write their own
servers' lists over what is there. Writing is best effort: a failure is logged once and the
history stays in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
from pathlib import Path

log = logging.getLogger("trioproxy.start_history")

KEEP = 5  # durations kept per server
# Not "trioproxy-*.json": those are the runtime files of running instances.
FILE_NAME = "trioproxy_start_times.json"


class StartHistory:
    """Start-to-ready durations per server name; see the module's docstring."""

    def __init__(self, path: Path | None = None, keep: int = KEEP) -> None:
        self.path = path
        self.keep = keep
        self._durations: dict[str, list[float]] = _read(path) if path is not None else {}
        self._write_failed = False

    @classmethod
    def in_runtime_dir(cls) -> StartHistory:
        from .runtime import runtime_dir

        return cls(runtime_dir() / FILE_NAME)

    def record(self, name: str, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        kept = self._durations.setdefault(name, [])
        kept.append(round(seconds, 3))
        del kept[: -self.keep]
        if self.path is not None:
            self._write(name)

    def durations(self, name: str) -> list[float]:
        return list(self._durations.get(name, ()))

    def estimate(self, name: str) -> float | None:
        """The median of the last starts' durations, or None before the first start."""
        kept = self._durations.get(name)
        return statistics.median(kept) if kept else None

    def _write(self, name: str) -> None:
        assert self.path is not None
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            on_disk = _read(self.path)  # other trioproxies' servers are kept
            on_disk[name] = self._durations[name]
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            partial.write_text(json.dumps(on_disk, indent=1, sort_keys=True) + "\n")
            os.replace(partial, self.path)
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                log.warning("cannot write the start times to %s (kept in memory): %s", self.path, exc)
            with contextlib.suppress(OSError):
                partial.unlink()


def _read(path: Path) -> dict[str, list[float]]:
    """What the file says, keeping only well-formed entries; {} if it is missing or broken."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the start times in %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    found: dict[str, list[float]] = {}
    for name, values in data.items():
        if isinstance(name, str) and isinstance(values, list):
            numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            kept = [v for v in numbers if math.isfinite(v) and v >= 0][-KEEP:]
            if kept:
                found[name] = kept
    return found
