"""The restart policy's decisions and delays, exactly (pure logic, no processes)."""

from __future__ import annotations

import random

import pytest

from trioproxy.restart import Action, RestartPolicy


def policy(**kwargs: object) -> RestartPolicy:
    settings = {"backoff_initial": 0.5, "backoff_max": 4.0, "max_failures": 5, "window": 60.0}
    settings.update(kwargs)
    return RestartPolicy(jitter=0.0, rng=random.Random(1), **settings)  # type: ignore[arg-type]


def test_first_failure_restarts_at_once_then_backs_off_exponentially() -> None:
    p = policy(max_failures=10)
    delays = [p.on_exit(now=float(t), exit_code=1).delay for t in range(7)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_gives_up_after_max_failures_within_the_window() -> None:
    p = policy(max_failures=3)
    assert p.on_exit(0.0, 1).action is Action.RESTART
    assert p.on_exit(1.0, 1).action is Action.RESTART
    assert p.on_exit(2.0, 1).action is Action.GIVE_UP


def test_failures_outside_the_window_are_forgotten() -> None:
    p = policy(max_failures=3, window=10.0)
    p.on_exit(0.0, 1)
    p.on_exit(1.0, 1)
    decision = p.on_exit(20.0, 1)
    assert decision.action is Action.RESTART
    assert decision.delay == 0.0


def test_exit_zero_stops_unless_always() -> None:
    assert policy().on_exit(0.0, 0).action is Action.STOP
    assert policy(mode="always").on_exit(0.0, 0).action is Action.RESTART


def test_never_gives_up_on_the_first_failure() -> None:
    assert policy(mode="never").on_exit(0.0, 1).action is Action.GIVE_UP
    assert policy(mode="never").on_exit(0.0, 0).action is Action.STOP


def test_requested_stop_is_not_a_failure() -> None:
    p = policy()
    assert p.on_exit(0.0, -15, requested=True).action is Action.STOP
    assert p.failures(0.0) == 0


def test_retry_after_a_give_up_waits_for_the_backoff() -> None:
    p = policy(max_failures=2)
    p.on_exit(0.0, 1)
    p.on_exit(0.1, 1)
    assert p.retry_after(0.1) == pytest.approx(1.0)
    assert p.retry_after(5.0) == 0.0


def test_jitter_stays_within_its_fraction() -> None:
    p = RestartPolicy(backoff_initial=1.0, backoff_max=100, max_failures=100, jitter=0.1)
    for _ in range(200):
        assert 0.9 <= p.delay(2) <= 1.1


def test_a_process_that_was_stable_starts_the_count_afresh() -> None:
    p = policy(max_failures=3, stable_after=10.0)
    for t in range(5):  # killed every 20 s after serving: never given up on, never delayed
        decision = p.on_exit(float(t * 20), -9, ready_for=15.0)
        assert decision.action is Action.RESTART and decision.delay == 0.0


def test_crashes_soon_after_each_start_still_give_up() -> None:
    p = policy(max_failures=3, stable_after=10.0)
    assert p.on_exit(0.0, 1, ready_for=0.5).action is Action.RESTART
    assert p.on_exit(1.0, 1, ready_for=0.5).action is Action.RESTART
    assert p.on_exit(2.0, 1, ready_for=0.5).action is Action.GIVE_UP
