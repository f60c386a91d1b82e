"""Slowing down guesses: failed logins from one address are limited per minute.

A generated token (192 bits) cannot be guessed, but ``--token`` lets people choose a short one,
and the login form is the place to try many. After ``limit`` failures from one address within
``window`` seconds, that address gets 429 until the oldest failure leaves the window. Memory is
bounded: at most ``max_addresses`` addresses are remembered, the least recent dropped first.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class LoginThrottle:
    def __init__(self, limit: int = 10, window: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again; 0 if it may now."""
        failures = self._recent(address, now)
        if len(failures) < self.limit:
            return 0.0
        return max(0.0, failures[0] + self.window - now)

    def failed(self, address: str, now: float) -> None:
        failures = self._recent(address, now)
        failures.append(now)
        self._failures[address] = failures
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _recent(self, address: str, now: float) -> deque[float]:
        failures = self._failures.get(address, deque())
        while failures and now - failures[0] > self.window:
            failures.popleft()
        return failures
