"""When to restart a server process, and after how long: pure logic, no I/O."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class Action(Enum):
    RESTART = "restart"
    STOP = "stop"  # the process is done; the next request starts it again
    GIVE_UP = "give-up"  # too many failures; report failed


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0


@dataclass
class RestartPolicy:
    """Decides what follows each exit of a process.

    The first failure within ``window`` restarts at once, so that a server killed under load
    is back as soon as it can be; each further failure waits twice as long (with jitter so
    that many servers do not retry in step), up to ``backoff_max``. ``max_failures`` failures
    within ``window`` give up. A process that stayed ready for ``stable_after`` seconds was
    healthy: its exit starts the count afresh (as supervisord's ``startsecs``), so a server
    killed now and then is never given up on, while one that crashes soon after each start is.
    """

    mode: str = "on-failure"  # on-failure | always | never
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_failures: int = 5
    window: float = 60.0
    jitter: float = 0.1
    stable_after: float = 10.0
    rng: random.Random = field(default_factory=random.Random)
    _failures: deque[float] = field(default_factory=deque, init=False)

    def failures(self, now: float) -> int:
        while self._failures and now - self._failures[0] > self.window:
            self._failures.popleft()
        return len(self._failures)

    def reset(self) -> None:
        self._failures.clear()

    def on_exit(
        self, now: float, exit_code: int, requested: bool = False, ready_for: float = 0.0
    ) -> Decision:
        """What to do after the process exited with ``exit_code`` at time ``now``.

        ``requested`` is true when trioproxy itself stopped the process; ``ready_for`` is how
        long it had been ready (0 if it never was).
        """
        if requested:
            return Decision(Action.STOP)
        if ready_for >= self.stable_after:
            self._failures.clear()
        failed = exit_code != 0
        if not failed and self.mode != "always":
            return Decision(Action.STOP)
        if failed or self.mode == "always":
            self._failures.append(now)
        count = self.failures(now)
        if failed and self.mode == "never":
            return Decision(Action.GIVE_UP)
        if count >= self.max_failures:
            return Decision(Action.GIVE_UP)
        return Decision(Action.RESTART, self.delay(count))

    def delay(self, failures: int) -> float:
        """Backoff before the next start, given the failures counted in the window."""
        if failures <= 1:
            return 0.0
        base = min(self.backoff_max, self.backoff_initial * 2 ** (failures - 2))
        return base * (1 + self.jitter * (2 * self.rng.random() - 1))

    def retry_after(self, now: float) -> float:
        """Seconds until a failed server may be started again by a request (0: now)."""
        if not self._failures:
            return 0.0
        wait = min(self.backoff_max, self.backoff_initial * 2 ** max(0, len(self._failures) - 1))
        return max(0.0, self._failures[-1] + wait - now)
