"""The process-cycle driver: runs one server's process, restarts it, and reports what happens.

A cycle is one task of the supervisor's nursery, in its own cancel scope (a stop cancels it):
it starts the process, races its readiness against the start deadlines, keeps the ready
process's client, health checks and idle culler running, and turns every observation into an
event of :mod:`trioproxy.lifecycle`, fed through the supervisor. What follows an exit (restart
at once, back off, stop, give up) is the table's decision, never this module's; this module
only does the waiting and the I/O. Each process runs inside a *halt* scope, cancelled when
the table says to stop the process for cause (unhealthy, not ready in time): ``run_child`` then
stops its family (SIGTERM, SIGKILL after ``stop_timeout``) and the exit goes to the table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .auth import learn_secrets, mask_argv, mask_environment, secret_values
from .backend import BackendClient
from .errors import sole_exception
from .health import FailureStreak, probe, wait_until_ready
from .identity import secret_environment
from .lifecycle import (
    BackoffOver,
    Exited,
    Idle,
    PortTaken,
    PredecessorGone,
    ProcessStarted,
    QuietDeadline,
    Ready,
    StartDeadline,
    StartFailed,
    State,
    Unhealthy,
)
from .options import OptionError, check_argv, check_environment, check_unix_socket
from .process import ChildSpec, OutputLog, run_child
from .templating import TemplateError, expand_environment, expand_list
from .urls import child_environment

if TYPE_CHECKING:
    from .supervisor import ServerSupervisor

MAX_PORT_RETRIES = 3

_T = TypeVar("_T")


class StartError(Exception):
    """The command could not be started at all (not found, not executable, bad template).

    Trying again would not help, so the server is failed at once.
    """


class ProcessCycle:
    """Drives the processes of one supervisor, one cycle at a time (see the module)."""

    def __init__(self, supervisor: ServerSupervisor) -> None:
        self.supervisor = supervisor
        self._halt: trio.CancelScope | None = None  # the running process's

    def halt(self) -> None:
        """Stop the running process for cause (Effect.HALT_PROCESS)."""
        if self._halt is not None:
            self._halt.cancel()

    async def run(self) -> None:
        """Run the process, restarting it as the table says, until it stops for good."""
        sv = self.supervisor
        if sv.lifecycle.predecessor_pending and sv.predecessor_gone is not None:
            await sv.predecessor_gone.wait()
            sv.feed(PredecessorGone())
        port_retries = 0
        while True:
            try:
                code = await self._run_once()
            except StartError as exc:
                sv.log.error("%s: cannot start: %s", sv.name, exc)
                sv.output.add(f"trioproxy: cannot start {sv.name}: {exc}")
                sv.feed(StartFailed(str(exc), trio.current_time()))
                return
            never_ready = sv.state is State.STARTING and sv.lifecycle.halt is None
            if never_ready and code != 0 and sv.address.taken(sv.output.tail(10)):
                port_retries += 1
                if port_retries <= MAX_PORT_RETRIES:
                    port = sv.address.port
                    sv.log.warning("%s: port %d was taken; trying another", sv.name, port)
                    sv.address.choose_another_port()
                    sv.feed(PortTaken(port))
                    continue
            port_retries = 0
            step = sv.feed(Exited(code, trio.current_time()))
            if step.state is State.BACKOFF:
                await trio.sleep(step.delay)
                sv.feed(BackoffOver())
            elif step.state is not State.STARTING:
                return

    async def _run_once(self) -> int:
        """Start the process once; its exit code once it has exited and been reaped."""
        sv = self.supervisor
        spec = self.spec()
        started_at = sv.start_began = trio.current_time()
        start_error: str | None = None
        child: trio.Process | None = None
        halt = self._halt = trio.CancelScope()
        try:
            with halt:
                async with trio.open_nursery() as nursery:
                    try:
                        child = await nursery.start(run_child, spec, sv.output, sv.guard)
                    except OSError as exc:
                        # Kept out of the nursery, which would wrap it in an ExceptionGroup.
                        start_error = _describe_start_error(spec.argv[0], spec.cwd, exc)
                    except Exception as exc:  # what the checks in spec missed (ValueError for a NUL...)
                        cause = sole_exception(exc)
                        start_error = f"cannot start {spec.argv[0]!r}: {type(cause).__name__}: {cause}"
                    else:
                        sv.pid = child.pid
                        sv.starts += 1
                        sv.log.info("%s: started pid %d: %s", sv.name, child.pid, " ".join(mask_argv(spec.argv)))
                        if spec.added_env:
                            sv.log.debug(
                                "%s: environment added: %s",
                                sv.name,
                                " ".join(f"{k}={v}" if v is not None else f"-{k}" for k, v in mask_environment(spec.added_env).items()),
                            )
                        sv.feed(ProcessStarted(child.pid, started_at))
                        readiness = trio.CancelScope()
                        nursery.start_soon(self._become_ready, readiness, child.pid, started_at)
                        await child.wait()
                        readiness.cancel()
        finally:
            # Also when cancelled (a stop): by then trio has reaped the child.
            self._halt = None
            sv.drop_client()
            if child is not None and child.returncode is not None:
                sv.last_exit_code = child.returncode
            sv.pid = None
        if start_error is not None:
            raise StartError(start_error)
        assert child is not None and child.returncode is not None
        return child.returncode

    async def _become_ready(self, scope: trio.CancelScope, pid: int, started_at: float) -> None:
        sv = self.supervisor
        with scope:
            deadline = await self._ready_or_deadline(pid)
            if sv.state is not State.STARTING:
                # A stop came in the same moment as the answer (its cancellation is only seen
                # at our next checkpoint): the process is on its way out, never ready.
                return
            if deadline is not None:
                sv.log.warning("%s: pid %d %s; stopping it", sv.name, pid, describe_deadline(deadline))
                sv.feed(deadline)
                return
            now = trio.current_time()
            sv.last_activity = now  # idle time counts from the start
            sv.start_latency.record(now - started_at)
            sv.history.record(sv.name, now - started_at)
            sv.client = BackendClient(sv.backend, sv.name, sv.client_options)
            sv.feed(Ready(pid, now, sv.backend.describe()))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sv.client.maintain)
                if sv.process.idle_timeout > 0:
                    nursery.start_soon(self.cull_when_idle)
                if sv.health_check is not None:
                    nursery.start_soon(self._watch_health, pid)

    async def _ready_or_deadline(self, pid: int) -> StartDeadline | QuietDeadline | None:
        """Wait until the process is ready (None) or a start deadline passes (that event).

        The request's ``timeout`` plays no part: a request that gives up leaves the start
        running, so that the next one finds it further on.
        """
        sv = self.supervisor
        outcome: list[StartDeadline | QuietDeadline | None] = []
        async with trio.open_nursery() as nursery:

            async def ready() -> None:
                await wait_until_ready(sv.backend, sv.process.ready_check_path, sv.prober)
                outcome.append(None)
                nursery.cancel_scope.cancel()

            async def deadline() -> None:
                process = sv.process
                outcome.append(await start_deadline(sv.output, pid, process.start_timeout, process.start_quiet_timeout))
                nursery.cancel_scope.cancel()

            nursery.start_soon(ready)
            nursery.start_soon(deadline)
        return outcome[0]

    async def _watch_health(self, pid: int) -> None:
        """Check the ready process every interval; stop it once it fails enough in a row."""
        sv = self.supervisor
        check = sv.health_check
        assert check is not None
        streak = FailureStreak(check)
        while True:
            await trio.sleep(check.interval)
            failure = await probe(sv.backend, check, sv.prober)
            if failure is None:
                streak.passed()
                continue
            sv.health_failures += 1
            sv.last_health_failure = f"{check.what} {failure}"
            sv.log.warning("%s: health check of pid %d failed: %s %s", sv.name, pid, check.what, failure)
            reason = streak.failed(failure)
            if reason is not None:
                break
        if sv.state is State.READY:
            sv.unhealthy += 1
            # Synchronously, as for an idle stop: requests from now on wait for the next
            # process, and the ones under way on this one end as it is stopped.
            sv.feed(Unhealthy(pid, reason))

    async def cull_when_idle(self) -> None:
        sv = self.supervisor
        timeout = sv.process.idle_timeout
        while True:
            idle_for = trio.current_time() - sv.last_activity
            if idle_for >= timeout and sv.active == 0:
                break
            await trio.sleep(max(timeout - idle_for, 0.0) or timeout)
        if sv.state is State.READY:
            # Synchronously, so that a request arriving now waits for a fresh start instead of
            # getting a backend about to go.
            sv.feed(Idle(timeout))

    def spec(self) -> ChildSpec:
        """What to start, every value checked: callables and templates are evaluated now,
        and a value that cannot work fails this server's start (with the option named),
        never the supervisor."""
        sv = self.supervisor
        process = sv.process
        if process.config_error is not None:
            raise StartError(process.config_error)
        try:
            if sv.address.unix_socket and not sv.address.owned_dir:
                check_unix_socket(sv.address.unix_socket)  # a directory may have appeared since
            sv.address.prepare()
        except OptionError as exc:
            raise StartError(str(exc)) from None
        except OSError as exc:
            why = exc.strerror or str(exc)
            if sv.address.unix_socket:
                raise StartError(f"option 'unix_socket': cannot clear {sv.address.unix_socket!r}: {why}") from None
            raise StartError(f"cannot pick a port: {why}") from None
        variables = sv.template_variables()
        argv = _expanded("command", expand_list, process.command, variables)
        extra_env = _expanded("environment", expand_environment, process.environment, variables)
        extra_env = {**extra_env, **secret_environment(process)}  # forward_user's secret wins
        if not argv:
            raise StartError("the command is empty")
        # Before the checks, whose messages may quote a value: masked there too.
        learn_secrets(secret_values(argv, extra_env))
        try:
            check_argv(argv)
            check_environment(extra_env)
        except OptionError as exc:
            raise StartError(str(exc)) from None
        env = {**os.environ, **child_environment(sv.base_url, sv.public_url, process), **extra_env}
        return ChildSpec(
            name=sv.name,
            argv=argv,
            # None: leave the variable unset (also one trioproxy itself has).
            env={name: value for name, value in env.items() if value is not None},
            cwd=process.cwd,
            stop_timeout=process.stop_timeout,
            added_env=extra_env,
        )


async def start_deadline(
    output: OutputLog, pid: int, start_timeout: float, quiet_timeout: float = 0.0
) -> StartDeadline | QuietDeadline:
    """Return when a start has taken ``start_timeout`` seconds, or (``quiet_timeout`` > 0)
    when ``output`` got no line for ``quiet_timeout`` seconds: the event to feed then. Lines
    there before the call do not count. No end otherwise: the caller cancels it at readiness.
    """
    deadline = trio.current_time() + start_timeout
    seen = output.total
    quiet_until = trio.current_time() + quiet_timeout
    while True:
        wake = min(deadline, quiet_until) if quiet_timeout > 0 else deadline
        with trio.move_on_at(wake):
            await output.wait_for_more(seen)
        now = trio.current_time()
        if output.total != seen:
            seen = output.total
            quiet_until = now + quiet_timeout
        if now >= deadline:
            return StartDeadline(pid, start_timeout, f"not ready after {start_timeout:g} s (start_timeout)")
        if quiet_timeout > 0 and now >= quiet_until:
            return QuietDeadline(pid, quiet_timeout)


def describe_deadline(event: StartDeadline | QuietDeadline) -> str:
    if isinstance(event, StartDeadline):
        return event.why
    return f"printed nothing for {event.seconds:g} s (start_quiet_timeout)"


def _expanded(option: str, expand: Callable[[Any, Mapping[str, Any]], _T], value: Any, variables: Mapping[str, Any]) -> _T:
    """``command`` or ``environment`` expanded; any failure of a user's callable or template
    fails this server's start alone, never the supervisor (and with it trioproxy)."""
    try:
        return expand(value, variables)
    except TemplateError as exc:
        raise StartError(f"bad {option}: {exc}") from None
    except Exception as exc:
        raise StartError(f"the {option} callable failed: {type(exc).__name__}: {exc}") from None


def _describe_start_error(command: str, cwd: str | None, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        if cwd and not os.path.isdir(cwd):
            return f"working directory not found: {cwd!r}"
        return f"command not found: {command!r}"
    if isinstance(exc, PermissionError):
        return f"command not executable: {command!r}"
    return f"cannot start {command!r}: {exc.strerror or exc}"

