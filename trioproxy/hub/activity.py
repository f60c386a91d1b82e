"""Telling the Hub the server is in use, so that its idle culler leaves it alone.

Once per interval, the latest activity is reported if it is newer than what the Hub has
already been told; a report the Hub did not take is tried again at the next interval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import NoReturn

import trio

from .client import HubClient, HubUnavailable

log = logging.getLogger("trioproxy.hub")


async def report_activity_forever(
    interval: float,
    latest: Callable[[], float],
    report: Callable[[float], Awaitable[bool]],
) -> NoReturn:
    """Every ``interval`` s, ``report`` the trio time ``latest()`` gives if it is news.

    ``latest`` gives ``-math.inf`` while nothing happened; ``report`` returns whether the Hub
    took it. Activity before this starts is not news: the Hub has just spawned the server.
    """
    reported = trio.current_time()
    while True:
        await trio.sleep(interval)
        when = latest()
        if when > reported and await report(when):
            reported = when


def hub_reporter(client: HubClient) -> Callable[[float], Awaitable[bool]]:
    """A ``report`` for :func:`report_activity_forever` that posts to the Hub's activity URL."""

    async def report(when: float) -> bool:
        try:
            await client.report_activity(iso_utc(when))
        except HubUnavailable as exc:
            log.warning("cannot report activity to the Hub: %s", exc)
            return False
        return True

    return report


def latest_of(*sources: Callable[[], float | None]) -> Callable[[], float]:
    """The latest of several activity clocks (None or -inf: no activity yet)."""

    def latest() -> float:
        times = [time for time in (source() for source in sources) if time is not None]
        return max(times, default=-math.inf)

    return latest


def iso_utc(trio_time: float) -> str:
    """The wall-clock time, as JupyterHub's ISO 8601 with "Z", of a trio clock reading."""
    moment = datetime.now(timezone.utc) - timedelta(seconds=trio.current_time() - trio_time)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
