"""A server's lifecycle as one table: which event, in which state, leads where (pure logic).

In the style of h11's ``_state.py``: events are frozen dataclasses, and :data:`TABLE` maps
``(state, event type, qualifier)`` to a :class:`Row`, the state that follows and the
:class:`Effect` s the owner must carry out. :class:`Lifecycle` holds the state and the few
facts the rows depend on (whether a stop was asked, a start is pending, the process was
ever ready, a process is being stopped for cause) and changes them only as the rows say; the
restart policy (:mod:`trioproxy.restart`, also pure) decides what follows an exit. No I/O, no
clock: every event carries its time. The supervisor (:mod:`trioproxy.supervisor`) feeds the
events and the process-cycle driver (:mod:`trioproxy.cycle`) produces most of them.

An event with no row in the current state is a bug of the feeder (:class:`InvalidTransition`):
the drivers check the state right before feeding an event that may come late (idle, unhealthy).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import Enum
from typing import Union

from .restart import Action, RestartPolicy


class State(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartAsked:
    """A request, the API or autostart wants the server running."""


@dataclass(frozen=True)
class PredecessorGone:
    """The supervisor this one replaces (a reload) has stopped: its port or socket is free."""


@dataclass(frozen=True)
class ProcessStarted:
    pid: int
    at: float


@dataclass(frozen=True)
class Ready:
    pid: int
    at: float
    where: str  # the backend, for the reason


@dataclass(frozen=True)
class PortTaken:
    """The process exited before it was ready, saying its (chosen) port was taken."""

    port: int


@dataclass(frozen=True)
class StartFailed:
    """The command could not be started at all (not found, not executable, bad template)."""

    reason: str
    at: float


@dataclass(frozen=True)
class Exited:
    """The process exited (by itself, or stopped by trioproxy) and was reaped."""

    code: int
    at: float


@dataclass(frozen=True)
class StartDeadline:
    """The process was not ready within ``seconds``: trioproxy gives it up."""

    pid: int
    seconds: float
    why: str  # e.g. "not ready after 300 s (start_timeout)"


@dataclass(frozen=True)
class QuietDeadline:
    """The starting process printed nothing for ``seconds``: trioproxy gives it up."""

    pid: int
    seconds: float


@dataclass(frozen=True)
class Unhealthy:
    pid: int
    reason: str


@dataclass(frozen=True)
class Idle:
    seconds: float


@dataclass(frozen=True)
class StopAsked:
    """A stop asked for (API, reload, shutdown of one server). ``restart``: start again once
    it is over; the requests waiting then ride through instead of failing."""

    restart: bool = False


@dataclass(frozen=True)
class BackoffOver:
    pass


@dataclass(frozen=True)
class CycleEnded:
    """The process cycle is over (returned, or cancelled by a stop): everything is reaped."""


@dataclass(frozen=True)
class Shutdown:
    """trioproxy stops (or this supervisor is ended)."""


Event = Union[
    StartAsked,
    PredecessorGone,
    ProcessStarted,
    Ready,
    PortTaken,
    StartFailed,
    Exited,
    StartDeadline,
    QuietDeadline,
    Unhealthy,
    Idle,
    StopAsked,
    BackoffOver,
    CycleEnded,
    Shutdown,
]


class Effect(Enum):
    SPAWN_CYCLE = "spawn a process cycle"
    CANCEL_CYCLE = "cancel the process cycle (the process is stopped, no restart)"
    HALT_PROCESS = "stop the process; the restart policy decides after its exit"
    DROP_CLIENT = "close the ready process's client (new requests wait)"
    FAIL_WAITERS = "requests waiting for this start fail now (503, with the reason)"
    COUNT_STOP = "requests waiting for a start fail ('stopped on request')"
    PEND_START = "start again once the stop is over"
    CLEAR_PENDING = "forget a pending start"
    RESET_POLICY = "forget the failures counted"
    BACKOFF = "wait the restart delay, then BackoffOver"


@dataclass(frozen=True)
class Row:
    target: State
    effects: frozenset[Effect] = frozenset()


def _row(target: State, *effects: Effect) -> Row:
    return Row(target, frozenset(effects))


S, E = State, Effect
_STOP = (E.COUNT_STOP, E.CLEAR_PENDING, E.CANCEL_CYCLE, E.DROP_CLIENT)
_RESTART = (E.PEND_START, E.RESET_POLICY, E.CANCEL_CYCLE, E.DROP_CLIENT)

# Qualifiers: for Exited, what follows the exit ("requested": trioproxy stopped it on request;
# otherwise the restart policy's decision: "restart" at once, "backoff", "done" (exit 0, or
# restart: never after success), "give-up"); for CycleEnded, "pending" when a start was asked
# during the stop; for StopAsked, "restart" for a restart. The state an exit comes in says whether the process had been ready:
# STARTING never, READY and STOPPING (stopped as unhealthy) yes. A process stopped for cause
# failed, so the policy never says "done" for it.
TABLE: dict[tuple[State, type, str | None], Row] = {
    (S.STOPPED, StartAsked, None): _row(S.STARTING, E.SPAWN_CYCLE),
    (S.FAILED, StartAsked, None): _row(S.STARTING, E.SPAWN_CYCLE),
    (S.STARTING, StartAsked, None): _row(S.STARTING),
    (S.READY, StartAsked, None): _row(S.READY),
    (S.BACKOFF, StartAsked, None): _row(S.BACKOFF),
    (S.STOPPING, StartAsked, None): _row(S.STOPPING, E.PEND_START),
    (S.STARTING, PredecessorGone, None): _row(S.STARTING),
    (S.STARTING, ProcessStarted, None): _row(S.STARTING),
    (S.STOPPING, ProcessStarted, None): _row(S.STOPPING),  # a stop came as it started
    (S.STARTING, Ready, None): _row(S.READY),
    (S.STOPPING, Ready, None): _row(S.STOPPING),  # answered as the stop came: never ready
    (S.STARTING, PortTaken, None): _row(S.STARTING),
    (S.STARTING, StartFailed, None): _row(S.FAILED, E.FAIL_WAITERS),
    (S.STOPPING, StartFailed, None): _row(S.STOPPING),
    (S.STARTING, StartDeadline, None): _row(S.STARTING, E.HALT_PROCESS),
    (S.STARTING, QuietDeadline, None): _row(S.STARTING, E.HALT_PROCESS),
    (S.READY, Unhealthy, None): _row(S.STOPPING, E.HALT_PROCESS, E.DROP_CLIENT),
    (S.READY, Idle, None): _row(S.STOPPING, E.CANCEL_CYCLE, E.DROP_CLIENT),
    (S.STARTING, Exited, "restart"): _row(S.STARTING, E.FAIL_WAITERS),
    (S.STARTING, Exited, "backoff"): _row(S.BACKOFF, E.FAIL_WAITERS, E.BACKOFF),
    (S.STARTING, Exited, "done"): _row(S.STOPPED, E.FAIL_WAITERS),
    (S.STARTING, Exited, "give-up"): _row(S.FAILED, E.FAIL_WAITERS),
    (S.READY, Exited, "restart"): _row(S.STARTING),
    (S.READY, Exited, "backoff"): _row(S.BACKOFF, E.BACKOFF),
    (S.READY, Exited, "done"): _row(S.STOPPED),
    (S.READY, Exited, "give-up"): _row(S.FAILED),
    (S.STOPPING, Exited, "restart"): _row(S.STARTING, E.CLEAR_PENDING),
    (S.STOPPING, Exited, "backoff"): _row(S.BACKOFF, E.CLEAR_PENDING, E.BACKOFF),
    (S.STOPPING, Exited, "give-up"): _row(S.FAILED),
    (S.STOPPING, Exited, "requested"): _row(S.STOPPING),
    (S.BACKOFF, BackoffOver, None): _row(S.STARTING),
    (S.STOPPED, StopAsked, None): _row(S.STOPPED, E.COUNT_STOP, E.CLEAR_PENDING),
    (S.STARTING, StopAsked, None): _row(S.STOPPING, *_STOP),
    (S.READY, StopAsked, None): _row(S.STOPPING, *_STOP),
    (S.BACKOFF, StopAsked, None): _row(S.STOPPING, *_STOP),
    (S.STOPPING, StopAsked, None): _row(S.STOPPING, *_STOP),
    (S.FAILED, StopAsked, None): _row(S.STOPPED, E.COUNT_STOP, E.CLEAR_PENDING, E.RESET_POLICY),
    (S.STARTING, StopAsked, "restart"): _row(S.STOPPING, *_RESTART),
    (S.READY, StopAsked, "restart"): _row(S.STOPPING, *_RESTART),
    (S.BACKOFF, StopAsked, "restart"): _row(S.STOPPING, *_RESTART),
    (S.STOPPING, StopAsked, "restart"): _row(S.STOPPING, *_RESTART),
    (S.STOPPING, CycleEnded, None): _row(S.STOPPED),
    (S.STOPPED, CycleEnded, None): _row(S.STOPPED),
    (S.FAILED, CycleEnded, None): _row(S.FAILED),
    (S.STOPPING, CycleEnded, "pending"): _row(S.STARTING, E.SPAWN_CYCLE, E.CLEAR_PENDING),
    (S.STOPPED, CycleEnded, "pending"): _row(S.STARTING, E.SPAWN_CYCLE, E.CLEAR_PENDING),
    (S.FAILED, CycleEnded, "pending"): _row(S.STARTING, E.SPAWN_CYCLE, E.CLEAR_PENDING),
    **{(state, Shutdown, None): _row(S.STOPPED, E.DROP_CLIENT) for state in State},
}

# The changes of state the table can make, by state (for readers and tests).
TRANSITIONS: dict[State, frozenset[State]] = {
    state: frozenset(row.target for (source, _, _), row in TABLE.items() if source is state and row.target is not state)
    for state in State
}


class InvalidTransition(RuntimeError):
    """An event with no row in the current state (a bug of whoever fed it)."""


class ServerUnavailable(Exception):
    """A server that cannot take requests now: 503 (failed or exited) or 504 (too slow).

    ``retry_after``: seconds after which a request may find it ready (it is starting, backing
    off, or may be started again then), or None if nothing will change by itself.
    """

    def __init__(
        self,
        server: str,
        status: int,
        reason: str,
        output: list[str] | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(f"server {server!r}: {reason}")
        self.server = server
        self.status = status
        self.reason = reason
        self.output = output or []
        self.retry_after = retry_after


@dataclass(frozen=True)
class Step:
    """What one event did: the state before and after, the reason, the effects to carry out."""

    previous: State
    state: State
    reason: str
    effects: frozenset[Effect]
    delay: float = 0.0  # with Effect.BACKOFF


@dataclass(frozen=True)
class Mark:
    """Where a waiting request began: failed attempts and stops seen so far."""

    failed_attempts: int
    stops: int


@dataclass
class Lifecycle:
    """The state of one server and the facts its table rows depend on."""

    policy: RestartPolicy
    state: State = State.STOPPED
    reason: str = ""
    failed_attempts: int = 0  # attempts that failed before they were ready
    stops: int = 0  # stops asked for: they fail the requests waiting for a start
    start_pending: bool = False  # a start asked while stopping: done when the stop is over
    cycle_was_ready: bool = False  # a process of this cycle was ready once
    ready_since: float | None = None  # the process's, while it is ready
    ready_for: float = 0.0  # how long the last process was ready before it exited
    backoff_until: float = 0.0
    halt: str | None = None  # why trioproxy is stopping the process for cause
    predecessor_pending: bool = False  # nothing starts before the replaced supervisor is gone
    restarts: int = 0  # restarts the policy decided
    started_at: float | None = None  # when the process under way was started

    def qualifier(self, event: Event) -> str | None:
        if isinstance(event, CycleEnded):
            return "pending" if self.start_pending else None
        if isinstance(event, StopAsked):
            return "restart" if event.restart else None
        if isinstance(event, Exited):
            if self.state is State.STOPPING and self.halt is None:
                return "requested"
            return "?"  # the restart policy's decision, taken in handle
        return None

    def row(self, event: Event, qualifier: str | None) -> Row:
        row = TABLE.get((self.state, type(event), qualifier))
        if row is None:
            raise InvalidTransition(f"{type(event).__name__} in state {self.state.value} ({qualifier or 'no qualifier'})")
        return row

    def handle(self, event: Event) -> Step:
        """Apply ``event``: the state, reason and flags change as its row says."""
        previous = self.state
        qualifier = self.qualifier(event)
        reason: str | None = None  # None: the reason stays
        delay = 0.0
        if qualifier == "?":
            assert isinstance(event, Exited)
            if not any(source is self.state and kind is Exited for source, kind, _ in TABLE):
                self.row(event, None)  # refused before the policy counts anything
            qualifier, reason, delay = self._decide_exit(event)
        row = self.row(event, qualifier)
        if reason is None:
            reason = self._reason(event, row)
        self._record(event, row)
        effects = row.effects
        if Effect.FAIL_WAITERS in effects:
            self.failed_attempts += 1
        if Effect.COUNT_STOP in effects:
            self.stops += 1
        if Effect.PEND_START in effects:
            self.start_pending = True
        if Effect.CLEAR_PENDING in effects:
            self.start_pending = False
        if Effect.RESET_POLICY in effects:
            self.policy.reset()
        if Effect.SPAWN_CYCLE in effects:
            self.cycle_was_ready = False
        if Effect.BACKOFF in effects:
            assert isinstance(event, Exited)
            self.backoff_until = event.at + delay
        if isinstance(event, StartFailed) and row.target is State.FAILED:
            self.policy.on_exit(event.at, 127)  # counted, so that a request's retry waits
        self.state = row.target
        if reason is not None:
            self.reason = reason
        return Step(previous, self.state, self.reason, effects, delay)

    def _record(self, event: Event, row: Row) -> None:
        if isinstance(event, ProcessStarted):
            self.started_at = event.at
            self.ready_since = None
            self.ready_for = 0.0
        elif isinstance(event, Ready) and row.target is State.READY:
            self.ready_since = event.at
            self.cycle_was_ready = True
        elif isinstance(event, (StartDeadline, QuietDeadline, Unhealthy)):
            self.halt = self._halt_reason(event)
        elif isinstance(event, PredecessorGone):
            self.predecessor_pending = False
        elif isinstance(event, (Exited, Shutdown)):
            self.ready_since = self.started_at = None
            self.halt = None
        elif isinstance(event, CycleEnded):
            self.ready_since = self.started_at = None  # stopped: no Exited came
            self.halt = None
        elif isinstance(event, StopAsked):
            self.halt = None  # a stop on request wins over one for cause

    def _halt_reason(self, event: StartDeadline | QuietDeadline | Unhealthy) -> str:
        if isinstance(event, StartDeadline):
            return event.why
        if isinstance(event, QuietDeadline):
            return f"printed nothing for {event.seconds:g} s (start_quiet_timeout)"
        return f"unhealthy: {event.reason}"

    def _decide_exit(self, event: Exited) -> tuple[str, str, float]:
        """The restart policy's decision on an exit; its qualifier, reason and delay."""
        was_ready = self.ready_since is not None
        self.ready_for = event.at - self.ready_since if self.ready_since is not None else 0.0
        detail = describe_exit(event.code)
        code = event.code
        if self.halt is not None:
            detail = f"{self.halt}; stopped ({detail})"
            code = code or 1  # stopped for cause: it failed, however it took the SIGTERM
        elif not was_ready:
            detail = f"exited before it was ready ({detail})"
        decision = self.policy.on_exit(event.at, code, ready_for=self.ready_for)
        if decision.action is Action.STOP:
            return "done", detail, 0.0
        if decision.action is Action.GIVE_UP:
            failures = self.policy.failures(event.at)
            if self.policy.mode == "never":
                why = "not restarting (restart: never)"
            else:
                why = f"gave up after {failures} failure{'' if failures == 1 else 's'} in {self.policy.window:g} s"
            return "give-up", f"{detail}; {why}", 0.0
        self.restarts += 1
        if decision.delay > 0:
            return "backoff", f"{detail}; restarting in {decision.delay:.2f} s", decision.delay
        return "restart", f"{detail}; restarting", 0.0

    def _reason(self, event: Event, row: Row) -> str | None:
        if isinstance(event, StartAsked):
            return "" if row.target is not self.state else None
        if isinstance(event, (BackoffOver, CycleEnded)):
            return "" if row.target is State.STARTING else None
        if isinstance(event, Ready):
            return f"pid {event.pid} on {event.where}" if row.target is State.READY else None
        if isinstance(event, PortTaken):
            return f"port {event.port} was taken; trying another"
        if isinstance(event, StartFailed):
            return event.reason if row.target is State.FAILED else None
        if isinstance(event, StartDeadline):
            return f"{event.why}; stopping pid {event.pid}"
        if isinstance(event, QuietDeadline):
            return f"printed nothing for {event.seconds:g} s (start_quiet_timeout); stopping pid {event.pid}"
        if isinstance(event, Unhealthy):
            return f"unhealthy: {event.reason}; stopping pid {event.pid}"
        if isinstance(event, Idle):
            return f"idle for {event.seconds:g} s"
        if isinstance(event, StopAsked):
            if self.state is State.FAILED:
                return "stopped on request"
            if self.state is State.STOPPING or row.target is not State.STOPPING:
                return None
            return "restart requested" if event.restart else "stop requested"
        if isinstance(event, Shutdown):
            return "trioproxy stopped"
        return None

    # -- what a waiting request learns --------------------------------------------------------

    def mark(self) -> Mark:
        return Mark(self.failed_attempts, self.stops)

    def verdict(self, since: Mark) -> str | None:
        """Why a request waiting since ``since`` must fail now, or None while it may wait:
        ``"stopped"`` (a stop was asked), ``"failed"`` (an attempt failed before it was ready,
        and no process of this cycle was ready: once one was, requests ride through restarts).
        """
        if self.stops != since.stops:
            return "stopped"
        if self.failed_attempts != since.failed_attempts and not self.cycle_was_ready:
            return "failed"
        return None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
