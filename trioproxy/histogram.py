"""A cumulative histogram for Prometheus: fixed buckets, counts only ever grow."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, bounds: Sequence[float] = START_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * len(self.bounds)  # per bucket, not yet cumulative
        self.count = 0
        self.sum = 0.0

    def record(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self._counts):
            self._counts[index] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) for each bucket, as Prometheus wants."""
        total, rows = 0, []
        for bound, count in zip(self.bounds, self._counts, strict=True):
            total += count
            rows.append((bound, total))
        return rows
