"""The registry of servers: every server's supervisor, started, replaced and ended together.

:class:`Supervisors` owns one nursery in which each :class:`~trioproxy.supervisor.ServerSupervisor`
runs in its own cancel scope, so that a reload can add, remove or replace one alone. It is a
boundary: reload plans (:class:`trioproxy.config.Reloader`) and the when-idle swaps run in its
nursery with what escapes them logged, and a supervisor that fails after it started is
replaced by a stand-in that answers 503 with the reason; neither ends the others nor trioproxy.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, cast

import trio

from .config import ServerProcess, failed_server
from .errors import sole_exception
from .lifecycle import ServerUnavailable, State
from .process import OrphanGuard, open_orphan_guard
from .start_history import StartHistory

if TYPE_CHECKING:
    from .supervisor import ServerSupervisor

log = logging.getLogger("trioproxy.supervisor")


class Supervisors(Mapping[str, "ServerSupervisor"]):
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
        self._nursery.start_soon(run_logged, "a reconfiguration", action)

    def processes(self) -> dict[str, ServerProcess]:
        return {name: supervisor.process for name, supervisor in self._supervisors.items()}

    async def _start_supervisor(
        self, process: ServerProcess, predecessor_gone: trio.Event | None = None
    ) -> ServerSupervisor:
        from .supervisor import ServerSupervisor  # the supervisor module re-exports this one

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
                    self._nursery.start_soon(run_logged, "a stand-in supervisor", partial(self._stand_in, supervisor, reason))
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

        self._nursery.start_soon(run_logged, f"restarting {name!r} once idle", when_no_one_uses_it)

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


async def run_logged(what: str, action: Callable[[], Awaitable[object]]) -> None:
    """Run ``action`` as a boundary of its own: an error is logged with its traceback and ends
    only ``action``, never the nursery it runs in."""
    try:
        await action()
    except Exception:
        log.exception("%s failed", what)
