"""ServerSupervisor: one configured server, from first request to shutdown.

It owns the server's state (a :class:`~trioproxy.lifecycle.Lifecycle`, whose table decides every
transition), answers the requests that need the server (:meth:`ServerSupervisor.ensure_ready`:
they wait for a start, or learn why there is none), and takes the API's controls. The processes
themselves are run by the cycle driver (:mod:`trioproxy.cycle`); the set of all servers is the
registry (:mod:`trioproxy.registry`, re-exported here as :class:`Supervisors`).

Every task and process a supervisor starts lives in the nursery of its :meth:`run`, so
cancelling that cancels and reaps everything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from .addresses import ServerAddress
from .backend import Backend, BackendClient, ClientOptions
from .backend_tls import server_tls
from .config import ServerProcess
from .cycle import ProcessCycle
from .health import Prober
from .histogram import Histogram
from .lifecycle import TRANSITIONS as TRANSITIONS
from .lifecycle import (
    CycleEnded,
    Effect,
    Event,
    Lifecycle,
    Shutdown,
    StartAsked,
    Step,
    StopAsked,
)
from .lifecycle import InvalidTransition as InvalidTransition
from .lifecycle import ServerUnavailable as ServerUnavailable
from .lifecycle import State as State
from .process import OrphanGuard, OutputLog
from .restart import RestartPolicy
from .start_history import StartHistory
from .urls import public_prefix

# How long a request whose backend broke off waits to see whether its process exited.
EXIT_GRACE = 0.5
# When an error page for a server that is starting again tells the browser to try again (s).
RETRY_WHILE_STARTING = 2.0

log = logging.getLogger("trioproxy.supervisor")


class ServerSupervisor:
    """Owns one server's process: starts it on demand, restarts it, stops it."""

    def __init__(
        self,
        process: ServerProcess,
        *,
        base_url: str = "/",
        guard: OrphanGuard | None = None,
        public_url: str = "",
    ) -> None:
        self.process = process
        self.name = process.name
        self.base_url = base_url
        self.public_url = public_url  # trioproxy's, if known (trioproxy.urls)
        self.guard = guard
        self.log = logging.getLogger(f"trioproxy.supervisor.{self.name}")
        self.output = OutputLog()
        self.policy = RestartPolicy(
            mode=process.restart,
            backoff_initial=process.backoff_initial,
            backoff_max=process.backoff_max,
            max_failures=process.max_failures,
            window=process.failure_window,
            stable_after=process.stable_after,
        )
        self.lifecycle = Lifecycle(self.policy)
        self.pid: int | None = None
        self.starts = 0
        self.last_exit_code: int | None = None
        self.last_activity = trio.current_time() if _in_trio() else 0.0
        self.start_latency = Histogram()
        self.history = StartHistory()  # Supervisors gives every supervisor its shared one
        self.start_began: float | None = None  # when the current start (or attempt) began
        self._in_use = 0  # requests and WebSockets admitted and not done (see in_use)
        self._unused = trio.Event()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._cycle_scope: trio.CancelScope | None = None
        self._cycle_done: trio.Event | None = None
        self.cycle = ProcessCycle(self)
        self.health_check = process.health if process.command else None
        self.prober = Prober()  # readiness and health checks, over one kept-alive client
        self.health_failures = 0  # failed checks, all told
        self.last_health_failure: str | None = None
        self.unhealthy = 0  # processes stopped for failing their checks
        self.client: BackendClient | None = None  # the ready process's, closed when it exits
        self.client_options = ClientOptions(
            connect_timeout=process.connect_timeout,
            response_timeout=process.response_timeout,
            max_connections=process.max_connections,
            max_websockets=process.max_websockets,
            pool_idle_timeout=process.pool_idle_timeout,
        )
        self.address = ServerAddress(process.port, process.unix_socket, server_tls(process))
        if guard is not None and self.address.owned_dir:
            guard.remove_on_exit(self.address.owned_dir)  # even if trioproxy is killed
        self.has_command = bool(process.command)
        if not self.has_command:
            self.lifecycle.state = State.READY
        self._predecessor_gone: trio.Event | None = None

    @property
    def predecessor_gone(self) -> trio.Event | None:
        """Set when this supervisor replaces one being stopped (a reload): no process of this
        one starts before that one's is gone, since they may need the same port or socket."""
        return self._predecessor_gone

    @predecessor_gone.setter
    def predecessor_gone(self, event: trio.Event | None) -> None:
        self._predecessor_gone = event
        self.lifecycle.predecessor_pending = event is not None

    # -- state ----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def reason(self) -> str:
        return self.lifecycle.reason

    @property
    def restarts(self) -> int:
        return self.lifecycle.restarts

    @property
    def ready_since(self) -> float | None:
        return self.lifecycle.ready_since

    def feed(self, event: Event) -> Step:
        """Apply one event to the lifecycle table, then carry out the effects of its row."""
        before = (self.lifecycle.state, self.lifecycle.reason)
        try:
            step = self.lifecycle.handle(event)
        except InvalidTransition as exc:
            raise InvalidTransition(f"{self.name}: {exc}") from None
        if (step.state, step.reason) != before:
            reason = f" ({step.reason})" if step.reason else ""
            self.log.info("%s: %s -> %s%s", self.name, step.previous.value, step.state.value, reason)
        effects = step.effects
        if Effect.DROP_CLIENT in effects:
            self.drop_client()
        if Effect.HALT_PROCESS in effects:
            self.cycle.halt()
        if Effect.CANCEL_CYCLE in effects and self._cycle_scope is not None:
            self._cycle_scope.cancel()
        if Effect.SPAWN_CYCLE in effects:
            self._spawn_cycle()
        self._notify()
        return step

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def drop_client(self) -> None:
        """Close the ready process's client: its pooled connections lead to the old process."""
        client, self.client = self.client, None
        if client is not None:
            client.close()
            self._notify()

    # -- addresses ------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        return self.address.backend

    @property
    def port(self) -> int:
        return self.address.port

    @property
    def unix_socket(self) -> str | None:
        return self.address.unix_socket

    def template_variables(self) -> dict[str, Any]:
        return {
            "port": self.address.port,
            "unix_socket": self.address.unix_socket or "",
            "base_url": self.base_url,
            "public_prefix": public_prefix(self.base_url, self.process),
        }

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until cancelled; then stop the process and return."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not self.has_command:
                    # Already running elsewhere: one client for trioproxy's whole run.
                    self.client = BackendClient(self.backend, self.name, self.client_options)
                    nursery.start_soon(self.client.maintain)
                elif self.process.autostart:
                    self._request_start()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.drop_client()
            await self.prober.aclose()
            if self.has_command and self.state is not State.STOPPED:
                self.feed(Shutdown())
            self.address.close()

    async def wait_for_state(self, *states: State) -> State:
        """Wait until the server is in one of ``states``; return that state. No timeout: wrap
        the call in ``trio.fail_after`` or ``move_on_after``."""
        while self.state not in states:
            await self._changed.wait()
        return self.state

    def touch(self) -> None:
        """Record activity (idle culling counts from the last one)."""
        self.last_activity = trio.current_time()

    @property
    def active(self) -> int:
        """Requests and WebSockets in use now: admitted (maybe waiting for a start) and not done."""
        return self._in_use

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Count a request or WebSocket as using this server while the context lasts.

        The admission pipeline enters it before the server is started; idle culling and
        :meth:`wait_until_unused` (a ``?when=idle`` reload) wait for every use to end.
        """
        self._in_use += 1
        try:
            yield
        finally:
            self._in_use -= 1
            if not self._in_use:
                self._unused.set()
                self._unused = trio.Event()

    async def wait_until_unused(self) -> None:
        while self._in_use:
            await self._unused.wait()

    # -- requests -------------------------------------------------------------------------

    async def ensure_ready(self) -> BackendClient:
        """Start the server if needed, wait until it is ready, and give its client.

        Raises ServerUnavailable: 503 when the process fails or exits before it is ready
        (at once, with its output, unless it was ready since it was started: then the
        request rides through restarts), 504 when it is not ready within ``timeout`` (the start goes on).
        """
        client = self.client
        if client is not None and self.state is State.READY:
            return client
        return await self._wait_ready_until(trio.current_time() + self.process.timeout)

    async def _wait_ready_until(self, deadline: float) -> BackendClient:
        with trio.move_on_at(deadline):
            return await self._wait_ready()
        raise ServerUnavailable(self.name, 504, self._still_waiting(), self.output.tail(20), self._retry_after())

    def _still_waiting(self) -> str:
        """Why a request that waited ``timeout`` is answered 504: the server's state, and
        that a start under way goes on (only ``start_timeout`` gives a process up)."""
        waited = f"{self.process.timeout:g} s"
        state = self.state
        if state is State.STARTING:
            started = self.lifecycle.started_at
            running = "" if started is None or self.pid is None else (
                f" (pid {self.pid}, starting for {trio.current_time() - started:.0f} s of at most {self.process.start_timeout:g} s)"
            )
            if self.lifecycle.halt is not None:
                return f"still starting after {waited}, and being stopped: {self.reason}"
            return f"still starting after {waited}; the start goes on{running}"
        if state is State.BACKOFF:
            return f"not ready after {waited}: backing off after a failure ({self.reason}); the start goes on"
        if state is State.STOPPING:
            return f"not ready after {waited}: stopping ({self.reason})"
        return f"not ready after {waited} (state: {state.value}{'; ' + self.reason if self.reason else ''})"

    def _retry_after(self) -> float | None:
        """For a request that failed now: when another might not (see ServerUnavailable)."""
        now = trio.current_time()
        if self.state is State.BACKOFF:
            return max(self.lifecycle.backoff_until - now, 0.0) or RETRY_WHILE_STARTING
        if self.state is State.STARTING:
            return RETRY_WHILE_STARTING
        if self.state is State.FAILED:
            return self.policy.retry_after(now) or None
        return None

    async def _wait_ready(self) -> BackendClient:
        mark = self.lifecycle.mark()
        while True:
            if self.state is State.READY and self.client is not None:
                return self.client
            verdict = self.lifecycle.verdict(mark)
            if verdict == "failed":
                raise ServerUnavailable(self.name, 503, self.reason, self.output.tail(20), self._retry_after())
            if verdict == "stopped":
                raise ServerUnavailable(self.name, 503, "stopped on request")
            if self.state is State.STOPPED:
                self._request_start()
            elif self.state is State.FAILED:
                wait = self.policy.retry_after(trio.current_time())
                if wait > 0:
                    raise ServerUnavailable(
                        self.name,
                        503,
                        f"{self.reason}; will retry on a request in {wait:.1f} s",
                        self.output.tail(20),
                        wait,
                    )
                self._request_start()
            await self._changed.wait()

    def replacement(self, deadline: float) -> Callable[[BackendClient], Awaitable[BackendClient | None]]:
        """For one request, a way to reach the process that replaces the one it was sent to.

        Called with the client whose connection failed: if that client's process has exited
        (or does within EXIT_GRACE, the time it takes to notice), wait for the next ready
        process, through restarts and backoff, until ``deadline`` (the request's ``timeout``),
        and give its client. None if the same process is still the ready one.
        """

        async def replace(failed: BackendClient) -> BackendClient | None:
            if not self.has_command:
                return None
            with trio.move_on_after(EXIT_GRACE):
                while self.client is failed:
                    await self._changed.wait()
            if self.client is failed:
                return None
            return await self._wait_ready_until(deadline)

        return replace

    def _request_start(self) -> None:
        if not self.has_command:
            return
        if self._nursery is None:
            raise ServerUnavailable(self.name, 503, "trioproxy is shutting down")
        self.feed(StartAsked())

    def _spawn_cycle(self) -> None:
        if self._nursery is None or self._cycle_scope is not None:
            return  # shutting down; or the cycle under way goes on
        self._cycle_scope = trio.CancelScope()
        self._cycle_done = trio.Event()
        self.start_began = trio.current_time()
        self._nursery.start_soon(self._cycle, self._cycle_scope, self._cycle_done)

    async def _cycle(self, scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            with scope:
                await self.cycle.run()
            # Over by itself or by our stop (not when trioproxy's shutdown cancels it).
            self._cycle_scope = self._cycle_done = None
            self.feed(CycleEnded())
        finally:
            if self._cycle_scope is scope:
                self._cycle_scope = self._cycle_done = None
            done.set()

    # -- control --------------------------------------------------------------------------

    async def start(self, wait: bool = True) -> None:
        if self.state is State.FAILED:
            self.policy.reset()
        self._request_start()  # while stopping: as soon as the stop is over
        if wait:
            await self.ensure_ready()

    async def stop(self) -> None:
        """Stop the process (SIGTERM to its family, SIGKILL after stop_timeout).

        Requests waiting for the server to start fail with 503: the stop wins.
        """
        if not self.has_command:
            return
        done = self._cycle_done
        self.feed(StopAsked())
        if done is not None:
            await done.wait()

    async def restart(self, wait: bool = True) -> None:
        """Stop the process and start a new one; requests waiting for it wait on."""
        if not self.has_command:
            return
        if self.state in (State.STOPPED, State.FAILED):
            self.policy.reset()
            await self.start(wait)
            return
        done = self._cycle_done
        self.feed(StopAsked(restart=True))
        if done is not None:
            await done.wait()
        if wait:
            await self.ensure_ready()

    def spawn(self, action: Callable[[], Awaitable[object]]) -> None:
        """Run ``action`` (e.g. a start asked for by the API) in this supervisor's own nursery,
        so that it lives as long as the supervisor, not as long as the request that asked.

        Raises ServerUnavailable (503) once trioproxy is shutting down. An error in ``action``
        is logged; it does not end the supervisor.
        """
        if self._nursery is None:
            raise ServerUnavailable(self.name, 503, "trioproxy is shutting down")

        async def logged() -> None:
            try:
                await action()
            except Exception:
                self.log.exception("%s: action failed", self.name)

        self._nursery.start_soon(logged)

    # -- reporting ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        ready_since = self.ready_since
        return {
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "pid": self.pid,
            "port": None if self.address.unix_socket else (self.address.port or None),
            "unix_socket": self.address.unix_socket,
            "restarts": self.restarts,
            "uptime": (now - ready_since) if ready_since is not None else None,
            "last_exit_code": self.last_exit_code,
            "idle_seconds": now - self.last_activity,
            "health": self._health_status(),
        }

    def _health_status(self) -> dict[str, Any] | None:
        check = self.health_check
        if check is None:
            return None
        return {
            "check": check.what,
            "interval": check.interval,
            "checks_failed": self.health_failures,
            "last_failure": self.last_health_failure,
            "unhealthy": self.unhealthy,
        }


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


# The registry lives in its own module; imported here (last: it needs this module's names
# only when it runs) so that ``from trioproxy.supervisor import Supervisors`` stays as it was.
from .registry import Supervisors as Supervisors  # noqa: E402
