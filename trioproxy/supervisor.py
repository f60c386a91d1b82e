"""ServerSupervisor: one configured server's process, from first request to shutdown.

States and their transitions (the table the code checks is :data:`TRANSITIONS`)::

    stopped ──start──▶ starting ──port answers──▶ ready
       ▲                  │  ▲                      │
       │ exit 0           │  └──── backoff ◀────────┤ exit ≠ 0
       └──────────────────┴─────────────────────────┘
    too many failures in the window ──▶ failed (a request after the backoff, or the API, starts it)
    stop() from any state ──▶ stopping ──▶ stopped

Every task and process a supervisor starts lives in the nursery of its :meth:`run`, so
cancelling that cancels and reaps everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from enum import Enum
from functools import partial
from typing import Any, TypeVar, cast

import trio

from .addresses import ServerAddress
from .auth import learn_secrets, mask_argv, mask_environment, secret_values
from .backend import Backend, BackendClient, ClientOptions
from .backend_tls import server_tls
from .config import ServerProcess, failed_server
from .errors import sole_exception
from .health import FailureStreak, Prober, probe, wait_until_ready
from .histogram import Histogram
from .identity import secret_environment
from .options import OptionError, check_argv, check_environment, check_unix_socket
from .process import ChildSpec, OrphanGuard, OutputLog, open_orphan_guard, run_child
from .restart import Action, RestartPolicy
from .start_history import StartHistory
from .templating import TemplateError, expand_environment, expand_list
from .urls import child_environment, public_prefix

# How long a request whose backend broke off waits to see whether its process exited.
EXIT_GRACE = 0.5
MAX_PORT_RETRIES = 3
# When an error page for a server that is starting again tells the browser to try again (s).
RETRY_WHILE_STARTING = 2.0

_T = TypeVar("_T")
log = logging.getLogger("trioproxy.supervisor")


class State(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


# Every change of state a supervisor makes, and only those (as h11's _state.py keeps its
# transitions): _set_state refuses any other as a bug. Restating a state with a new reason
# (STARTING "restarting", ...) is always allowed.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    # ready; exited (restart at once, back off, give up, done with exit 0); stopped by request
    State.STARTING: frozenset({State.READY, State.BACKOFF, State.FAILED, State.STOPPED, State.STOPPING}),
    State.READY: frozenset({State.STARTING, State.BACKOFF, State.FAILED, State.STOPPED, State.STOPPING}),
    State.BACKOFF: frozenset({State.STARTING, State.STOPPING, State.STOPPED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPED}),
    # stopped on request or for idleness; or stopped as unhealthy, then as after a crash
    State.STOPPING: frozenset({State.STOPPED, State.STARTING, State.BACKOFF, State.FAILED}),
}


class InvalidTransition(RuntimeError):
    """A supervisor tried a change of state that is not in TRANSITIONS (a bug)."""



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


class _StartFailed(Exception):
    """The command could not be started at all (not found, not executable, bad template).

    Trying again would not help, so the server is failed at once.
    """


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
        self._guard = guard
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
        self.state = State.STOPPED
        self.reason = ""
        self.pid: int | None = None
        self.restarts = 0
        self.starts = 0
        self.last_exit_code: int | None = None
        self.ready_since: float | None = None
        self.last_activity = trio.current_time() if _in_trio() else 0.0
        self.start_latency = Histogram()
        self.history = StartHistory()  # Supervisors gives every supervisor its shared one
        self.start_began: float | None = None  # when the current start (or attempt) began
        self._in_use = 0  # requests and WebSockets admitted and not done (see in_use)
        self._unused = trio.Event()
        self._changed = trio.Event()
        self._early_failures = 0
        self._stops = 0  # stops asked for by the API: they fail the requests waiting
        self._start_after_stop = False
        self._last_ready_for = 0.0  # how long the last process was ready before it exited
        self._backoff_until = 0.0  # when the backoff under way ends (trio time)
        self._nursery: trio.Nursery | None = None
        self._cycle_scope: trio.CancelScope | None = None
        self._cycle_done: trio.Event | None = None
        self._cycle_was_ready = False  # a process of this start was ready once
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
            self.state = State.READY
        # Set when this supervisor replaces one being stopped (a reload): no process of this
        # one starts before that one's is gone, since they may need the same port or socket.
        self.predecessor_gone: trio.Event | None = None

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
            self._drop_client()
            await self.prober.aclose()
            if self.has_command and self.state is not State.STOPPED:
                self._set_state(State.STOPPED, "trioproxy stopped")
            self.address.close()

    def _set_state(self, state: State, reason: str = "") -> None:
        if state is self.state and reason == self.reason:
            return
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.name}: {self.state.value} -> {state.value} ({reason})")
        previous, self.state, self.reason = self.state, state, reason
        self.log.info(
            "%s: %s -> %s%s", self.name, previous.value, state.value, f" ({reason})" if reason else ""
        )
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _drop_client(self) -> None:
        """Close the ready process's client: its pooled connections lead to the old process."""
        client, self.client = self.client, None
        if client is not None:
            client.close()
            self._notify()

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
        request rides through restarts), 504 when it is not ready within ``timeout``.
        """
        client = self.client
        if client is not None and self.state is State.READY:
            return client
        return await self._wait_ready_until(trio.current_time() + self.process.timeout)

    async def _wait_ready_until(self, deadline: float) -> BackendClient:
        with trio.move_on_at(deadline):
            return await self._wait_ready()
        raise ServerUnavailable(
            self.name,
            504,
            f"not ready within {self.process.timeout:g} s (state: {self.state.value}); "
            "raise the server's 'timeout' if it needs longer to start",
            self.output.tail(20),
            self._retry_after(),
        )

    def _retry_after(self) -> float | None:
        """For a request that failed now: when another might not (see ServerUnavailable)."""
        now = trio.current_time()
        if self.state is State.BACKOFF:
            return max(self._backoff_until - now, 0.0) or RETRY_WHILE_STARTING
        if self.state is State.STARTING:
            return RETRY_WHILE_STARTING
        if self.state is State.FAILED:
            return self.policy.retry_after(now) or None
        return None

    async def _wait_ready(self) -> BackendClient:
        failures_seen = self._early_failures
        stops_seen = self._stops
        while True:
            if self.state is State.READY and self.client is not None:
                return self.client
            if self._early_failures != failures_seen and not self._cycle_was_ready:
                raise ServerUnavailable(self.name, 503, self.reason, self.output.tail(20), self._retry_after())
            if self._stops != stops_seen:
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
        if self._cycle_scope is not None or not self.has_command:
            return
        if self._nursery is None:
            raise ServerUnavailable(self.name, 503, "trioproxy is shutting down")
        self._cycle_scope = trio.CancelScope()
        self._cycle_done = trio.Event()
        self._cycle_was_ready = False
        self.start_began = trio.current_time()
        self._set_state(State.STARTING)
        self._nursery.start_soon(self._cycle, self._cycle_scope, self._cycle_done)

    # -- control --------------------------------------------------------------------------

    async def start(self, wait: bool = True) -> None:
        if self.state is State.FAILED:
            self.policy.reset()
        if self.state is State.STOPPING and self._cycle_scope is not None and self._cycle_scope.cancel_called:
            self._start_after_stop = True  # the stopping cycle starts a new one as it ends
        else:
            self._request_start()
        if wait:
            await self.ensure_ready()

    async def stop(self) -> None:
        """Stop the process (SIGTERM to its group, SIGKILL after stop_timeout).

        Requests waiting for the server to start fail with 503: the stop wins.
        """
        self._stops += 1
        self._start_after_stop = False
        if self.state is State.FAILED:
            self.policy.reset()
            self._set_state(State.STOPPED, "stopped on request")
        await self._stop()

    async def _stop(self) -> None:
        scope, done = self._cycle_scope, self._cycle_done
        if scope is None or done is None:
            return
        if self.state is not State.STOPPING:
            self._set_state(State.STOPPING, "stop requested")
        self._drop_client()  # requests from now on wait for the next process
        scope.cancel()
        await done.wait()

    async def restart(self, wait: bool = True) -> None:
        await self._stop()
        self.policy.reset()
        await self.start(wait)

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

    # -- the process cycle ----------------------------------------------------------------

    async def _cycle(self, scope: trio.CancelScope, done: trio.Event) -> None:
        """Run the process, restarting it by the policy, until it stops for good."""
        try:
            with scope:
                await self._keep_running()
        finally:
            self._cycle_scope = None
            self._cycle_done = None
            self.pid = None
            self.ready_since = None
            if scope.cancel_called and self.state is State.STOPPING:
                self._set_state(State.STOPPED, self.reason)  # why it was stopped
            done.set()
            if self._start_after_stop and self._nursery is not None:
                self._start_after_stop = False
                self._request_start()

    async def _keep_running(self) -> None:
        if self.predecessor_gone is not None:
            await self.predecessor_gone.wait()
        port_retries = 0
        while True:
            if self.state is not State.STARTING:
                self._set_state(State.STARTING)
            try:
                exit_code, was_ready, not_ready, unhealthy = await self._run_once()
                if self._cycle_scope is not None and self._cycle_scope.cancel_called:
                    return  # stopped (it exited on its own as the stop came): no restart policy
            except _StartFailed as exc:
                # Not found, not executable, a bad template: no retry would change that.
                self.log.error("%s: cannot start: %s", self.name, exc)
                self.output.add(f"trioproxy: cannot start {self.name}: {exc}")
                self.policy.on_exit(trio.current_time(), 127)
                self._early_failures += 1
                self._set_state(State.FAILED, str(exc))
                return
            if not was_ready and not not_ready and exit_code != 0 and self.address.taken(self.output.tail(10)):
                port_retries += 1
                if port_retries <= MAX_PORT_RETRIES:
                    self.log.warning("%s: port %d was taken; trying another", self.name, self.address.port)
                    self.address.choose_another_port()
                    continue
            port_retries = 0
            detail = _describe_exit(exit_code)
            if not_ready:
                detail = (
                    f"not ready within {self.process.timeout:g} s, stopped ({detail}); "
                    "raise the server's 'timeout' if it needs longer to start"
                )
                exit_code = exit_code or 1  # a start that timed out failed, whatever it exited with
            elif unhealthy is not None:
                detail = f"unhealthy: {unhealthy}; stopped ({detail})"
                exit_code = exit_code or 1  # it failed, however it took the SIGTERM
            elif not was_ready:
                detail = f"exited before it was ready ({detail})"
            now = trio.current_time()
            decision = self.policy.on_exit(now, exit_code, ready_for=self._last_ready_for)
            if not was_ready:
                # Fail the requests waiting for this attempt at once, with the reason.
                self._early_failures += 1
            if decision.action is Action.STOP:
                self._set_state(State.STOPPED, detail)
                return
            if decision.action is Action.GIVE_UP:
                failures = self.policy.failures(now)
                if self.policy.mode == "never":
                    why = "not restarting (restart: never)"
                else:
                    plural = "" if failures == 1 else "s"
                    why = f"gave up after {failures} failure{plural} in {self.policy.window:g} s"
                self._set_state(State.FAILED, f"{detail}; {why}")
                return
            self.restarts += 1
            if decision.delay > 0:
                self._backoff_until = trio.current_time() + decision.delay
                self._set_state(State.BACKOFF, f"{detail}; restarting in {decision.delay:.2f} s")
                await trio.sleep(decision.delay)
            else:
                self._set_state(State.STARTING, f"{detail}; restarting")

    def _spec(self) -> ChildSpec:
        """What to start, every value checked: callables and templates are evaluated now,
        and a value that cannot work fails this server's start (with the option named),
        never the supervisor."""
        if self.process.config_error is not None:
            raise _StartFailed(self.process.config_error)
        try:
            if self.address.unix_socket and not self.address.owned_dir:
                check_unix_socket(self.address.unix_socket)  # a directory may have appeared since
            self.address.prepare()
        except OptionError as exc:
            raise _StartFailed(str(exc)) from None
        except OSError as exc:
            why = exc.strerror or str(exc)
            if self.address.unix_socket:
                raise _StartFailed(f"option 'unix_socket': cannot clear {self.address.unix_socket!r}: {why}") from None
            raise _StartFailed(f"cannot pick a port: {why}") from None
        variables = self.template_variables()
        argv = _expanded("command", expand_list, self.process.command, variables)
        extra_env = _expanded("environment", expand_environment, self.process.environment, variables)
        extra_env = {**extra_env, **secret_environment(self.process)}  # forward_user's secret wins
        if not argv:
            raise _StartFailed("the command is empty")
        # Before the checks, whose messages may quote a value: masked there too.
        learn_secrets(secret_values(argv, extra_env))
        try:
            check_argv(argv)
            check_environment(extra_env)
        except OptionError as exc:
            raise _StartFailed(str(exc)) from None
        env = {**os.environ, **child_environment(self.base_url, self.public_url, self.process), **extra_env}
        return ChildSpec(
            name=self.name,
            argv=argv,
            # None: leave the variable unset (also one trioproxy itself has).
            env={name: value for name, value in env.items() if value is not None},
            cwd=self.process.cwd,
            stop_timeout=self.process.stop_timeout,
            added_env=extra_env,
        )

    async def _run_once(self) -> tuple[int, bool, bool, str | None]:
        """Start the process once.

        Returns its exit code, whether it became ready, whether it was stopped for not
        becoming ready within ``timeout``, and why it was stopped for failing its health
        checks (None: it was not).
        """
        spec = self._spec()
        started_at = self.start_began = trio.current_time()
        self._last_ready_for = 0.0
        start_error: str | None = None
        was_ready = False
        not_ready = trio.CancelScope()  # cancelled when the start takes longer than timeout
        unhealthy = _Unhealthy()
        child: trio.Process | None = None
        try:
            with not_ready, unhealthy.scope:
                async with trio.open_nursery() as nursery:
                    try:
                        child = await nursery.start(run_child, spec, self.output, self._guard)
                    except OSError as exc:
                        # Kept out of the nursery, which would wrap it in an ExceptionGroup.
                        start_error = _describe_start_error(spec.argv[0], spec.cwd, exc)
                    except Exception as exc:  # what the checks in _spec missed (ValueError for a NUL...)
                        cause = sole_exception(exc)
                        start_error = f"cannot start {spec.argv[0]!r}: {type(cause).__name__}: {cause}"
                    else:
                        self.pid = child.pid
                        self.starts += 1
                        self.log.info("%s: started pid %d: %s", self.name, child.pid, " ".join(mask_argv(spec.argv)))
                        if spec.added_env:
                            self.log.debug(
                                "%s: environment added: %s",
                                self.name,
                                " ".join(f"{k}={v}" if v is not None else f"-{k}" for k, v in mask_environment(spec.added_env).items()),
                            )
                        readiness = trio.CancelScope()
                        nursery.start_soon(
                            self._become_ready, readiness, child.pid, started_at, not_ready, unhealthy
                        )
                        await child.wait()
                        readiness.cancel()
        finally:
            # Also when cancelled (a stop, failed health checks): by then trio has reaped the child.
            self._drop_client()
            if self.ready_since is not None:
                was_ready = True
                self._last_ready_for = trio.current_time() - self.ready_since
            if child is not None and child.returncode is not None:
                self.last_exit_code = child.returncode
            self.pid = None
            self.ready_since = None
        if start_error is not None:
            raise _StartFailed(start_error)
        assert child is not None and child.returncode is not None
        return child.returncode, was_ready, not_ready.cancelled_caught, unhealthy.reason

    async def _become_ready(
        self,
        scope: trio.CancelScope,
        pid: int,
        started_at: float,
        not_ready: trio.CancelScope,
        unhealthy: _Unhealthy,
    ) -> None:
        with scope:
            with trio.move_on_after(self.process.timeout):
                await wait_until_ready(self.backend, self.process.ready_check_path, self.prober)
                self.ready_since = trio.current_time()
            if self.state is not State.STARTING:
                # A stop came in the same moment as the answer (its cancellation is only seen
                # at our next checkpoint): the process is on its way out, never ready.
                self.ready_since = None
                return
            if self.ready_since is None:
                self.log.warning(
                    "%s: pid %d not ready within %g s (timeout); stopping it", self.name, pid, self.process.timeout
                )
                not_ready.cancel()  # stops the process, as jupyter-server-proxy does
                return
            self.last_activity = self.ready_since  # idle time counts from the start
            self.start_latency.record(self.ready_since - started_at)
            self.history.record(self.name, self.ready_since - started_at)
            self.client = BackendClient(self.backend, self.name, self.client_options)
            self._cycle_was_ready = True
            self._set_state(State.READY, f"pid {pid} on {self.backend.describe()}")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.client.maintain)
                if self.process.idle_timeout > 0:
                    nursery.start_soon(self._cull_when_idle)
                if self.health_check is not None:
                    nursery.start_soon(self._watch_health, pid, unhealthy)

    async def _watch_health(self, pid: int, unhealthy: _Unhealthy) -> None:
        """Check the ready process every interval; stop it once it fails enough in a row."""
        check = self.health_check
        assert check is not None
        streak = FailureStreak(check)
        while True:
            await trio.sleep(check.interval)
            failure = await probe(self.backend, check, self.prober)
            if failure is None:
                streak.passed()
                continue
            self.health_failures += 1
            self.last_health_failure = f"{check.what} {failure}"
            self.log.warning("%s: health check of pid %d failed: %s %s", self.name, pid, check.what, failure)
            reason = streak.failed(failure)
            if reason is not None:
                break
        self.unhealthy += 1
        unhealthy.reason = reason
        # Synchronously, as for an idle stop: requests from now on wait for the next process,
        # and the ones under way on this one end as it is stopped.
        self._set_state(State.STOPPING, f"unhealthy: {reason}; stopping pid {pid}")
        self._drop_client()
        unhealthy.scope.cancel()

    async def _cull_when_idle(self) -> None:
        timeout = self.process.idle_timeout
        while True:
            idle_for = trio.current_time() - self.last_activity
            if idle_for >= timeout and self.active == 0:
                break
            await trio.sleep(max(timeout - idle_for, 0.0) or timeout)
        # Synchronously, so that a request arriving now waits for a fresh start instead of
        # getting a backend about to go.
        self._set_state(State.STOPPING, f"idle for {timeout:g} s")
        self._drop_client()
        assert self._cycle_scope is not None
        self._cycle_scope.cancel()

    # -- reporting ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "name": self.name,
            "state": self.state.value,
            "reason": self.reason,
            "pid": self.pid,
            "port": None if self.address.unix_socket else (self.address.port or None),
            "unix_socket": self.address.unix_socket,
            "restarts": self.restarts,
            "uptime": (now - self.ready_since) if self.ready_since is not None else None,
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


class _Unhealthy:
    """How the health checks stop one process: its scope, and why they cancelled it."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.reason: str | None = None


def _expanded(option: str, expand: Callable[[Any, Mapping[str, Any]], _T], value: Any, variables: Mapping[str, Any]) -> _T:
    """``command`` or ``environment`` expanded; any failure of a user's callable or template
    fails this server's start alone, never the supervisor (and with it trioproxy)."""
    try:
        return expand(value, variables)
    except TemplateError as exc:
        raise _StartFailed(f"bad {option}: {exc}") from None
    except Exception as exc:
        raise _StartFailed(f"the {option} callable failed: {type(exc).__name__}: {exc}") from None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            import signal

            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _describe_start_error(command: str, cwd: str | None, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        if cwd and not os.path.isdir(cwd):
            return f"working directory not found: {cwd!r}"
        return f"command not found: {command!r}"
    if isinstance(exc, PermissionError):
        return f"command not executable: {command!r}"
    return f"cannot start {command!r}: {exc.strerror or exc}"


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class Supervisors(Mapping[str, ServerSupervisor]):
    """All servers' supervisors, started and stopped together."""

    def __init__(self, processes: Mapping[str, ServerProcess], *, base_url: str = "/", public_url: str = "") -> None:
        self._processes = dict(processes)
        self.base_url = base_url
        self.public_url = public_url
        self._supervisors: dict[str, ServerSupervisor] = {}
        self._scopes: dict[ServerSupervisor, trio.CancelScope] = {}
        self._waiting_for_idle: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._guard: OrphanGuard | None = None
        self.generation = 0  # bumped by every reload that changes the set of servers
        self.history = StartHistory()  # start-to-ready times by name, across reloads

    def __getitem__(self, name: str) -> ServerSupervisor:
        return self._supervisors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._supervisors)

    def __len__(self) -> int:
        return len(self._supervisors)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every supervisor until cancelled; then stop all servers concurrently."""
        async with open_orphan_guard() as guard:
            async with trio.open_nursery() as nursery:
                self._nursery, self._guard = nursery, guard
                try:
                    for name, process in self._processes.items():
                        self._supervisors[name] = await self._start_supervisor(process)
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    self._nursery = None

    # -- reconfiguration (see trioproxy.config.Reloader) ------------------------------------

    def spawn(self, action: Callable[[], Awaitable[object]]) -> None:
        """Run ``action`` (a reload) in the supervisors' nursery: it outlives the request that
        asked. Raises ServerUnavailable (503) once trioproxy is shutting down. An error in
        ``action`` is logged with its traceback; it ends no supervisor."""
        if self._nursery is None:
            raise ServerUnavailable("*", 503, "trioproxy is shutting down")
        self._nursery.start_soon(_logged, "a reconfiguration", action)

    def processes(self) -> dict[str, ServerProcess]:
        return {name: supervisor.process for name, supervisor in self._supervisors.items()}

    async def _start_supervisor(
        self, process: ServerProcess, predecessor_gone: trio.Event | None = None
    ) -> ServerSupervisor:
        if self._nursery is None:
            raise ServerUnavailable(process.name, 503, "trioproxy is shutting down")
        supervisor = ServerSupervisor(process, base_url=self.base_url, guard=self._guard, public_url=self.public_url)
        supervisor.predecessor_gone = predecessor_gone
        supervisor.history = self.history
        scope = self._scopes[supervisor] = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            started = False

            def report_started() -> None:
                nonlocal started
                started = True
                task_status.started()

            try:
                with scope:
                    await supervisor.run(task_status=cast("trio.TaskStatus[None]", _Started(report_started)))
            except Exception as exc:
                if not started:
                    raise  # to the caller of nursery.start: this add or replace failed
                # A bug in one supervisor ends that one (its process reaped), never the others
                # nor trioproxy; a stand-in answers for the server until a reload replaces it.
                log.exception("%s: supervisor failed; the server is out of service", supervisor.name)
                cause = sole_exception(exc)
                reason = f"trioproxy's supervisor failed: {type(cause).__name__}: {cause}; reload to start it again"
                ours = self._supervisors.get(supervisor.name) is supervisor
                if self._nursery is not None and ours and supervisor.process.config_error is None:
                    self._nursery.start_soon(_logged, "a stand-in supervisor", partial(self._stand_in, supervisor, reason))
            finally:
                self._scopes.pop(supervisor, None)

        await self._nursery.start(run)
        return supervisor

    async def _stand_in(self, crashed: ServerSupervisor, reason: str) -> None:
        if self._supervisors.get(crashed.name) is not crashed:
            return
        stand_in = await self._start_supervisor(failed_server(crashed.name, reason, like=crashed.process))
        if self._supervisors.get(crashed.name) is crashed:
            self._supervisors[crashed.name] = stand_in
            self.generation += 1
        else:  # a reload replaced it meanwhile
            await self._end(stand_in)

    async def _end(self, supervisor: ServerSupervisor) -> None:
        """Stop a supervisor's process (gracefully), then the supervisor itself (whatever
        the stop did: cancelling the supervisor reaps its process all the same)."""
        try:
            await supervisor.stop()
        finally:
            scope = self._scopes.get(supervisor)
            if scope is not None:
                scope.cancel()

    async def add(self, process: ServerProcess) -> None:
        self._cancel_waiting(process.name)
        self._supervisors[process.name] = await self._start_supervisor(process)
        self.generation += 1

    async def remove(self, name: str) -> None:
        """Stop the server and forget it: its URL is a 404 from now on."""
        self._cancel_waiting(name)
        supervisor = self._supervisors.pop(name)
        self.generation += 1
        await self._end(supervisor)

    async def replace(self, process: ServerProcess, *, when_idle: bool = False) -> None:
        """Put a supervisor for ``process`` in place of the one of the same name, restarting
        the server if it ran. ``when_idle``: once no request or WebSocket is under way, in the
        background (this returns at once)."""
        name = process.name
        self._cancel_waiting(name)
        if not when_idle:
            await self._replace(process)
            return
        assert self._nursery is not None
        scope = self._waiting_for_idle[name] = trio.CancelScope()

        async def when_no_one_uses_it() -> None:
            with scope:
                supervisor = self._supervisors.get(name)
                if supervisor is not None:
                    await supervisor.wait_until_unused()
                del self._waiting_for_idle[name]
                if name in self._supervisors:
                    await self._replace(process)

        self._nursery.start_soon(_logged, f"restarting {name!r} once idle", when_no_one_uses_it)

    def waiting_for_idle(self) -> list[str]:
        return sorted(self._waiting_for_idle)

    def _cancel_waiting(self, name: str) -> None:
        scope = self._waiting_for_idle.pop(name, None)
        if scope is not None:
            scope.cancel()

    async def _replace(self, process: ServerProcess) -> None:
        """If the new supervisor cannot be started, the old one stays, untouched; once it is,
        the old one is ended whatever happens next."""
        old = self._supervisors[process.name]
        was_running = old.has_command and old.state in (State.STARTING, State.READY, State.BACKOFF)
        old_gone = trio.Event()
        # The new one takes the requests from now on; the old one's finish, or end as it stops.
        new = await self._start_supervisor(process, predecessor_gone=old_gone)
        self._supervisors[process.name] = new
        self.generation += 1
        try:
            if was_running:
                await new.start(wait=False)
        finally:
            try:
                await self._end(old)
            finally:
                old_gone.set()


class _Started:
    """A task status that tells its owner when ``started`` was called."""

    def __init__(self, started: Callable[[], None]) -> None:
        self._started = started

    def started(self, value: object = None) -> None:
        self._started()


async def _logged(what: str, action: Callable[[], Awaitable[object]]) -> None:
    try:
        await action()
    except Exception:
        log.exception("%s failed", what)
