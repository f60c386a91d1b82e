"""The lifecycle table, row by row: pure logic, plain asserts, no processes, no clock.

Every row of ``TABLE`` has a case in ``CASES`` (checked by the first test): the state and
facts it starts from, the event, and what must hold afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from trioproxy.lifecycle import (
    TABLE,
    TRANSITIONS,
    BackoffOver,
    CycleEnded,
    Effect,
    Event,
    Exited,
    Idle,
    InvalidTransition,
    Lifecycle,
    PortTaken,
    PredecessorGone,
    ProcessStarted,
    QuietDeadline,
    Ready,
    Shutdown,
    StartAsked,
    StartDeadline,
    StartFailed,
    State,
    StopAsked,
    Unhealthy,
)
from trioproxy.restart import RestartPolicy

S, E = State, Effect


def lifecycle(state: State = S.STOPPED, **facts: Any) -> Lifecycle:
    policy = RestartPolicy(backoff_initial=1.0, backoff_max=8.0, max_failures=3, window=60.0, jitter=0.0, rng=random.Random(1))
    mode = facts.pop("mode", None)
    if mode is not None:
        policy.mode = mode
    failures = facts.pop("failures", 0)
    for at in range(failures):
        policy.on_exit(float(at), 1)
    lc = Lifecycle(policy, state=state)
    for name, value in facts.items():
        setattr(lc, name, value)
    return lc


Check = Callable[[Lifecycle, Any], None]


def nothing(lc: Lifecycle, step: Any) -> None:
    pass


def fails_waiters(lc: Lifecycle, step: Any) -> None:
    assert lc.failed_attempts == 1 and E.FAIL_WAITERS in step.effects


# (state, event type, qualifier) -> (facts, event, target, check)
CASES: dict[tuple[State, type, str | None], tuple[dict[str, Any], Event, State, Check]] = {}


def case(state: State, event: Event, qualifier: str | None, target: State, check: Check = nothing, **facts: Any) -> None:
    CASES[(state, type(event), qualifier)] = (facts, event, target, check)


# -- starts ---------------------------------------------------------------------------------


def spawns_fresh(lc: Lifecycle, step: Any) -> None:
    assert step.effects == {E.SPAWN_CYCLE} and lc.cycle_was_ready is False and lc.reason == ""


case(S.STOPPED, StartAsked(), None, S.STARTING, spawns_fresh, cycle_was_ready=True, reason="exit code 0")
case(S.FAILED, StartAsked(), None, S.STARTING, spawns_fresh, cycle_was_ready=True, reason="broken")


def no_effect(lc: Lifecycle, step: Any) -> None:
    assert step.effects == frozenset() and lc.reason == "as before"


case(S.STARTING, StartAsked(), None, S.STARTING, no_effect, reason="as before")
case(S.READY, StartAsked(), None, S.READY, no_effect, reason="as before")
case(S.BACKOFF, StartAsked(), None, S.BACKOFF, no_effect, reason="as before")


def pends(lc: Lifecycle, step: Any) -> None:
    assert lc.start_pending and step.effects == {E.PEND_START} and lc.reason == "stop requested"


case(S.STOPPING, StartAsked(), None, S.STOPPING, pends, reason="stop requested")


def predecessor_cleared(lc: Lifecycle, step: Any) -> None:
    assert lc.predecessor_pending is False


case(S.STARTING, PredecessorGone(), None, S.STARTING, predecessor_cleared, predecessor_pending=True)


def started(lc: Lifecycle, step: Any) -> None:
    assert lc.ready_since is None and lc.ready_for == 0.0 and step.effects == frozenset() and lc.started_at == 1.0


case(S.STARTING, ProcessStarted(7, 1.0), None, S.STARTING, started, ready_since=0.5, ready_for=3.0)
case(S.STOPPING, ProcessStarted(7, 1.0), None, S.STOPPING, started, ready_for=3.0)


def ready(lc: Lifecycle, step: Any) -> None:
    assert lc.ready_since == 4.0 and lc.cycle_was_ready and lc.reason == "pid 7 on 127.0.0.1:8000"


case(S.STARTING, Ready(7, 4.0, "127.0.0.1:8000"), None, S.READY, ready)


def not_ready(lc: Lifecycle, step: Any) -> None:
    assert lc.ready_since is None and not lc.cycle_was_ready and lc.reason == "stop requested"


case(S.STOPPING, Ready(7, 4.0, "127.0.0.1:8000"), None, S.STOPPING, not_ready, reason="stop requested")


def port_retry(lc: Lifecycle, step: Any) -> None:
    assert lc.reason == "port 8000 was taken; trying another" and lc.policy.failures(0.0) == 0
    assert lc.failed_attempts == 0  # a retry on another port is not a failure of the start


case(S.STARTING, PortTaken(8000), None, S.STARTING, port_retry)


def start_failed(lc: Lifecycle, step: Any) -> None:
    fails_waiters(lc, step)
    assert lc.reason == "command not found: 'x'"
    assert lc.policy.failures(2.0) == 1  # counted: a request's retry waits for the backoff


case(S.STARTING, StartFailed("command not found: 'x'", 2.0), None, S.FAILED, start_failed)


def stop_wins(lc: Lifecycle, step: Any) -> None:
    assert lc.failed_attempts == 0 and lc.reason == "stop requested"


case(S.STOPPING, StartFailed("command not found: 'x'", 2.0), None, S.STOPPING, stop_wins, reason="stop requested")


# -- giving a process up --------------------------------------------------------------------


def halted_deadline(lc: Lifecycle, step: Any) -> None:
    assert step.effects == {E.HALT_PROCESS} and lc.halt == "not ready after 300 s (start_timeout)"
    assert lc.reason == "not ready after 300 s (start_timeout); stopping pid 7"


case(S.STARTING, StartDeadline(7, 300, "not ready after 300 s (start_timeout)"), None, S.STARTING, halted_deadline)


def halted_quiet(lc: Lifecycle, step: Any) -> None:
    assert step.effects == {E.HALT_PROCESS} and lc.halt == "printed nothing for 20 s (start_quiet_timeout)"
    assert lc.reason == "printed nothing for 20 s (start_quiet_timeout); stopping pid 7"


case(S.STARTING, QuietDeadline(7, 20), None, S.STARTING, halted_quiet)


def halted_unhealthy(lc: Lifecycle, step: Any) -> None:
    assert step.effects == {E.HALT_PROCESS, E.DROP_CLIENT} and lc.halt == "unhealthy: GET /h timed out 3 times"
    assert lc.reason == "unhealthy: GET /h timed out 3 times; stopping pid 7"


case(S.READY, Unhealthy(7, "GET /h timed out 3 times"), None, S.STOPPING, halted_unhealthy)


def culled(lc: Lifecycle, step: Any) -> None:
    assert step.effects == {E.CANCEL_CYCLE, E.DROP_CLIENT} and lc.halt is None and lc.reason == "idle for 30 s"


case(S.READY, Idle(30), None, S.STOPPING, culled)


# -- exits ------------------------------------------------------------------------------------
# The restart policy (max 3 failures in 60 s, backoff from 1 s) decides the qualifier.


def exit_check(reason: str, *, waiters_fail: bool, delay: float = 0.0, restarts: int = 0) -> Check:
    def check(lc: Lifecycle, step: Any) -> None:
        assert lc.reason == reason
        assert (E.FAIL_WAITERS in step.effects) is waiters_fail and lc.failed_attempts == int(waiters_fail)
        assert step.delay == delay and lc.restarts == restarts
        assert lc.halt is None and lc.ready_since is None
        if delay:
            assert lc.backoff_until == 10.0 + delay

    return check


before = "exited before it was ready (exit code 1)"
case(S.STARTING, Exited(1, 10.0), "restart", S.STARTING, exit_check(f"{before}; restarting", waiters_fail=True, restarts=1))
case(
    S.STARTING, Exited(1, 10.0), "backoff", S.BACKOFF,
    exit_check(f"{before}; restarting in 1.00 s", waiters_fail=True, delay=1.0, restarts=1), failures=1,
)
case(S.STARTING, Exited(0, 10.0), "done", S.STOPPED, exit_check("exited before it was ready (exit code 0)", waiters_fail=True))
case(
    S.STARTING, Exited(1, 10.0), "give-up", S.FAILED,
    exit_check(f"{before}; gave up after 3 failures in 60 s", waiters_fail=True), failures=2,
)
case(S.READY, Exited(-9, 10.0), "restart", S.STARTING, exit_check("killed by SIGKILL; restarting", waiters_fail=False, restarts=1), ready_since=8.0)
case(
    S.READY, Exited(1, 10.0), "backoff", S.BACKOFF,
    exit_check("exit code 1; restarting in 1.00 s", waiters_fail=False, delay=1.0, restarts=1), ready_since=8.0, failures=1,
)
case(S.READY, Exited(0, 10.0), "done", S.STOPPED, exit_check("exit code 0", waiters_fail=False), ready_since=8.0)
case(
    S.READY, Exited(1, 10.0), "give-up", S.FAILED,
    exit_check("exit code 1; not restarting (restart: never)", waiters_fail=False), ready_since=8.0, mode="never",
)
unhealthy = "unhealthy: connect was refused 3 times; stopped (exit code 0)"  # a SIGTERM taken well still failed
case(
    S.STOPPING, Exited(0, 10.0), "restart", S.STARTING,
    exit_check(f"{unhealthy}; restarting", waiters_fail=False, restarts=1),
    halt="unhealthy: connect was refused 3 times", ready_since=8.0, start_pending=True,
)
case(
    S.STOPPING, Exited(0, 10.0), "backoff", S.BACKOFF,
    exit_check(f"{unhealthy}; restarting in 1.00 s", waiters_fail=False, delay=1.0, restarts=1),
    halt="unhealthy: connect was refused 3 times", ready_since=8.0, failures=1, start_pending=True,
)
case(
    S.STOPPING, Exited(-15, 10.0), "give-up", S.FAILED,
    exit_check("unhealthy: x; stopped (killed by SIGTERM); gave up after 3 failures in 60 s", waiters_fail=False),
    halt="unhealthy: x", ready_since=8.0, failures=2,
)


def requested(lc: Lifecycle, step: Any) -> None:
    assert lc.reason == "stop requested" and lc.policy.failures(10.0) == 0 and lc.restarts == 0


case(S.STOPPING, Exited(-15, 10.0), "requested", S.STOPPING, requested, reason="stop requested", ready_since=8.0)


def backoff_over(lc: Lifecycle, step: Any) -> None:
    assert lc.reason == "" and step.effects == frozenset()


case(S.BACKOFF, BackoffOver(), None, S.STARTING, backoff_over, reason="restarting in 1.00 s")


# -- stops ------------------------------------------------------------------------------------


def stop_check(reason: str, effects: set[Effect]) -> Check:
    def check(lc: Lifecycle, step: Any) -> None:
        assert lc.reason == reason and step.effects == effects
        assert lc.stops == int(E.COUNT_STOP in effects) and lc.start_pending is (E.PEND_START in effects)

    return check


STOP = {E.COUNT_STOP, E.CLEAR_PENDING, E.CANCEL_CYCLE, E.DROP_CLIENT}
RESTART = {E.PEND_START, E.RESET_POLICY, E.CANCEL_CYCLE, E.DROP_CLIENT}
case(S.STOPPED, StopAsked(), None, S.STOPPED, stop_check("exit code 0", {E.COUNT_STOP, E.CLEAR_PENDING}), reason="exit code 0")
for source in (S.STARTING, S.READY, S.BACKOFF):
    case(source, StopAsked(), None, S.STOPPING, stop_check("stop requested", STOP), start_pending=True)
    case(source, StopAsked(restart=True), "restart", S.STOPPING, stop_check("restart requested", RESTART))
case(S.STOPPING, StopAsked(), None, S.STOPPING, stop_check("idle for 30 s", STOP), reason="idle for 30 s", start_pending=True)
case(S.STOPPING, StopAsked(restart=True), "restart", S.STOPPING, stop_check("idle for 30 s", RESTART), reason="idle for 30 s")


def failed_stopped(lc: Lifecycle, step: Any) -> None:
    stop_check("stopped on request", {E.COUNT_STOP, E.CLEAR_PENDING, E.RESET_POLICY})(lc, step)
    assert lc.policy.failures(2.0) == 0


case(S.FAILED, StopAsked(), None, S.STOPPED, failed_stopped, reason="broken", failures=2)


def cycle_over(reason: str) -> Check:
    def check(lc: Lifecycle, step: Any) -> None:
        assert lc.reason == reason and step.effects == frozenset()
        assert lc.ready_since is None and lc.started_at is None and lc.halt is None

    return check


case(S.STOPPING, CycleEnded(), None, S.STOPPED, cycle_over("stop requested"), reason="stop requested", ready_since=3.0, started_at=1.0)
case(S.STOPPED, CycleEnded(), None, S.STOPPED, cycle_over("exit code 0"), reason="exit code 0")
case(S.FAILED, CycleEnded(), None, S.FAILED, cycle_over("broken"), reason="broken")


def starts_again(lc: Lifecycle, step: Any) -> None:
    assert step.effects == {E.SPAWN_CYCLE, E.CLEAR_PENDING} and not lc.start_pending and lc.reason == ""


for source in (S.STOPPING, S.STOPPED, S.FAILED):
    case(source, CycleEnded(), "pending", S.STARTING, starts_again, start_pending=True, reason="why")


def shut_down(lc: Lifecycle, step: Any) -> None:
    assert lc.reason == "trioproxy stopped" and step.effects == {E.DROP_CLIENT} and lc.ready_since is None


for source in State:
    case(source, Shutdown(), None, S.STOPPED, shut_down, ready_since=None if source is not S.READY else 3.0)


# -- the tests ----------------------------------------------------------------------------------


def test_every_row_has_a_case_and_no_case_is_outside_the_table() -> None:
    assert set(CASES) == set(TABLE)


@pytest.mark.parametrize("key", list(CASES), ids=lambda key: f"{key[0].value}-{key[1].__name__}-{key[2] or ''}")
def test_row(key: tuple[State, type, str | None]) -> None:
    facts, event, target, check = CASES[key]
    lc = lifecycle(key[0], **facts)
    assert lc.qualifier(event) in (key[2], "?")
    step = lc.handle(event)
    assert step.previous is key[0]
    assert lc.state is target and step.state is target
    assert TABLE[key].target is target
    check(lc, step)


def test_an_event_without_a_row_is_refused_and_changes_nothing() -> None:
    lc = lifecycle(S.STOPPED, reason="as before")
    for event in (Ready(1, 0.0, "x"), Exited(0, 0.0), Idle(1), Unhealthy(1, "x"), BackoffOver(), StartDeadline(1, 1, "x")):
        with pytest.raises(InvalidTransition):
            lc.handle(event)
        assert lc.state is S.STOPPED and lc.reason == "as before"
        assert lc.policy.failures(0.0) == 0 and lc.restarts == 0 and lc.failed_attempts == 0


def test_transitions_are_the_rows_changes_of_state() -> None:
    assert set(TRANSITIONS) == set(State)
    assert State.READY not in TRANSITIONS[State.STOPPING]  # a stop ends; it never leaves a process ready
    assert State.READY not in TRANSITIONS[State.STOPPED]  # a server is started before it is ready
    assert TRANSITIONS[State.BACKOFF] == {State.STARTING, State.STOPPING, State.STOPPED}


def test_a_waiting_request_fails_on_an_early_failure_but_rides_through_restarts_once_ready() -> None:
    lc = lifecycle()
    lc.handle(StartAsked())
    mark = lc.mark()
    lc.handle(ProcessStarted(1, 0.0))
    assert lc.verdict(mark) is None
    lc.handle(Exited(1, 1.0))  # never ready: the request waiting fails now, with the reason
    assert lc.verdict(mark) == "failed"
    mark = lc.mark()
    lc.handle(ProcessStarted(2, 1.0))
    lc.handle(Ready(2, 2.0, "x"))
    lc.handle(Exited(-9, 3.0))  # crashed once ready: the second failure backs off
    assert lc.state is S.BACKOFF and lc.verdict(mark) is None
    lc.handle(BackoffOver())
    lc.handle(ProcessStarted(3, 3.0))
    lc.handle(Exited(1, 3.5))  # this cycle was ready once: requests wait through the restarts
    assert lc.verdict(mark) is None


def test_a_stop_fails_the_waiting_requests_and_a_restart_does_not() -> None:
    lc = lifecycle()
    lc.handle(StartAsked())
    mark = lc.mark()
    lc.handle(StopAsked(restart=True))
    lc.handle(CycleEnded())  # the pending start: a new cycle at once
    assert lc.state is S.STARTING and lc.verdict(mark) is None
    lc.handle(StopAsked())
    assert lc.verdict(mark) == "stopped"


def test_a_stop_asked_while_unhealthy_wins_over_the_restart_policy() -> None:
    lc = lifecycle(S.READY, ready_since=0.0, cycle_was_ready=True)
    lc.handle(Unhealthy(1, "connect was refused 3 times"))
    lc.handle(StopAsked())
    lc.handle(Exited(-15, 5.0))
    assert lc.state is S.STOPPING and lc.restarts == 0 and lc.policy.failures(5.0) == 0
    lc.handle(CycleEnded())
    assert lc.state is S.STOPPED and lc.reason == "unhealthy: connect was refused 3 times; stopping pid 1"


def test_a_start_deadline_fails_the_start_through_the_restart_policy() -> None:
    lc = lifecycle()
    lc.handle(StartAsked())
    lc.handle(ProcessStarted(1, 0.0))
    lc.handle(StartDeadline(1, 300, "not ready after 300 s (start_timeout)"))
    assert lc.state is S.STARTING and lc.halt is not None
    step = lc.handle(Exited(-15, 300.5))
    assert lc.reason == "not ready after 300 s (start_timeout); stopped (killed by SIGTERM); restarting"
    assert E.FAIL_WAITERS in step.effects and lc.policy.failures(300.5) == 1 and lc.halt is None
