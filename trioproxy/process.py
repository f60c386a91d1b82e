"""Running one child process: its own process group, its output drained, stopped with its family.

A child never outlives trioproxy, nor does anything it started. Its *family* is its process
group and every process that carries its mark in its environment (:data:`FAMILY_VARIABLE`,
inherited by whatever it starts): daemonizing programs (``vncserver`` starting its X server)
call ``setsid`` and fork, leaving the group and the session, but not their environment.
Stopping sends SIGTERM to the whole family and gives it ``stop_timeout`` in all before SIGKILL;
when the child exits on its own, what it leaves behind gets the same SIGTERM and grace. If
trioproxy itself is killed with SIGKILL it cannot do that, so an :class:`OrphanGuard` process
(started once) holds the other end of a pipe and, when the pipe closes, ends every registered
group and mark and removes the directories registered with it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

from ._orphan_guard import FAMILY_VARIABLE, family_members

MAX_LINE = 4096
DRAIN_AFTER_EXIT = 1.0  # seconds to read what is left in the pipe once the group is gone
FAMILY_POLL = 0.05  # how often a stopping family is looked at
_PROC = os.path.isdir("/proc")
_families = itertools.count(1)


class OutputLog:
    """The last lines a server printed, bounded in count and in length per line."""

    def __init__(self, max_lines: int = 1000) -> None:
        self._lines: deque[str] = deque(maxlen=max_lines)
        self.total = 0  # lines ever added, so followers can tell what they have not seen
        self._added = trio.Event()

    def add(self, line: str) -> None:
        self._lines.append(line)
        self.total += 1
        self._added.set()
        self._added = trio.Event()

    def tail(self, count: int | None = None) -> list[str]:
        lines = list(self._lines)
        return lines if count is None else lines[-count:]

    def since(self, seen: int) -> list[str]:
        """Lines added after the first ``seen`` (as many as are still kept)."""
        missing = min(self.total - seen, len(self._lines))
        return list(self._lines)[len(self._lines) - missing :] if missing > 0 else []

    async def wait_for_more(self, seen: int) -> None:
        if self.total == seen:
            await self._added.wait()


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None = None
    stop_timeout: float = 5.0
    # What the server's ``environment`` added to trioproxy's (None: unset), for the log.
    added_env: Mapping[str, str | None] = field(default_factory=dict)


def _signal_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Family:
    """A child's process group and the descendants that left it, as one thing to stop."""

    def __init__(self, name: str, stop_timeout: float) -> None:
        self.mark = f"{os.getpid()}-{next(_families)}"
        self.name = name
        self.stop_timeout = stop_timeout
        self.pgid: int | None = None
        self.deadline: float | None = None  # SIGKILL after this (trio time), once stopping

    def signal(self, signum: int) -> bool:
        """Send ``signum`` to every live member; whether any was there to get it."""
        reached = False
        signalled_group = None
        if self.pgid is not None and (signum != 0 or not _PROC):
            # Without /proc, the group is all there is to see (zombies included).
            if _signal_group(self.pgid, signum):
                reached = True
                # Once each: an app may take a second SIGTERM as "quit now", or get it after
                # its handler has run, as Python's shutdown restores the default.
                signalled_group = self.pgid
        for pid in family_members(self.mark, self.pgid, outside=signalled_group):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
                reached = True
        return reached

    def alive(self) -> bool:
        return self.signal(0)

    def terminate(self) -> None:
        """SIGTERM to all, once: the grace period starts now."""
        if self.deadline is None:
            self.deadline = trio.current_time() + self.stop_timeout
            self.signal(signal.SIGTERM)

    async def end(self) -> None:
        """Terminate what is left, wait for it within the grace, then kill the rest."""
        if not self.alive():
            return
        self.terminate()
        assert self.deadline is not None
        with trio.move_on_at(self.deadline):
            # Polled: processes that are not our children can only be looked at.
            while self.alive():  # noqa: ASYNC110
                await trio.sleep(FAMILY_POLL)
            return
        logging.getLogger("trioproxy.process").warning(
            "%s: processes ignored SIGTERM for %.1f s; sending SIGKILL", self.name, self.stop_timeout
        )
        self.signal(signal.SIGKILL)


async def _stop_family(family: Family, process: trio.Process) -> None:
    # trio calls this (shielded) when the task running the child is cancelled, then waits
    # for the child to exit; the rest of the family is waited for once it has.
    family.terminate()
    assert family.deadline is not None
    with trio.move_on_at(family.deadline):
        await process.wait()
        return
    logging.getLogger("trioproxy.process").warning(
        "process %d ignored SIGTERM for %.1f s; sending SIGKILL", process.pid, family.stop_timeout
    )
    family.signal(signal.SIGKILL)


async def _drain(stream: trio.abc.ReceiveStream, output: OutputLog, logger: logging.Logger) -> None:
    """Read the child's output to the end so it never blocks on a full pipe."""
    pending = b""
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.ClosedResourceError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:
                lines.append(pending)
                pending = b""
            for raw in lines:
                line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
                output.add(line)
                logger.info("%s", line)
    if pending:
        line = pending[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        output.add(line)
        logger.info("%s", line)


async def run_child(
    spec: ChildSpec,
    output: OutputLog,
    guard: OrphanGuard | None,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run the child until it exits; return its exit code (negative: killed by that signal).

    Reports the started :class:`trio.Process` through ``task_status``. Returns only once the
    child has exited, the rest of its process group is gone and its output is read to the end.
    Raises OSError if the command cannot be started.
    """
    logger = logging.getLogger(f"trioproxy.server.{spec.name}")
    start_error: OSError | None = None
    family = Family(spec.name, spec.stop_timeout)
    async with trio.open_nursery() as nursery:
        try:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    list(spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    check=False,
                    start_new_session=True,
                    env={**spec.env, FAMILY_VARIABLE: family.mark},
                    cwd=spec.cwd,
                    deliver_cancel=partial(_stop_family, family),
                )
            )
        except OSError as exc:
            # Raised here, not from inside the nursery, it stays a plain OSError.
            start_error = exc
        else:
            family.pgid = process.pid
            if guard is not None:
                guard.watch(process.pid, family.mark)
            assert process.stdout is not None
            # Shielded: a child stopped with SIGTERM often prints as it shuts down, and would
            # get a broken pipe (or block) if its output stopped being read. Once the whole
            # group is gone the drain gets a short deadline, in case something outside the
            # group still holds the pipe.
            draining = trio.CancelScope(shield=True)
            nursery.start_soon(_drain_within, draining, process.stdout, output, logger)
            nursery.start_soon(_end_family_after_exit, process, family, guard, draining)
            task_status.started(process)
    if start_error is not None:
        raise start_error
    assert process.returncode is not None
    return process.returncode


async def _drain_within(
    scope: trio.CancelScope, stream: trio.abc.ReceiveStream, output: OutputLog, logger: logging.Logger
) -> None:
    with scope:
        await _drain(stream, output, logger)


async def _end_family_after_exit(
    process: trio.Process, family: Family, guard: OrphanGuard | None, draining: trio.CancelScope
) -> None:
    # Shielded: on cancellation trio.run_process stops the leader and waits for it; only then
    # is the rest of the family ended, within what is left of the same grace. Whatever is left
    # would hold the port or the output pipe (and so the drain) open.
    with trio.CancelScope(shield=True):
        await process.wait()
        await family.end()
    if guard is not None:
        guard.unwatch(process.pid, family.mark)
    draining.deadline = trio.current_time() + DRAIN_AFTER_EXIT


class OrphanGuard:
    """A small watchdog process that kills registered process groups if trioproxy dies.

    Linux's parent-death signal cannot be used directly: it fires when the *thread* that
    forked the child exits, and trio forks from worker threads that come and go.
    """

    def __init__(self, write_fd: int) -> None:
        self._fd: int | None = write_fd
        self._log = logging.getLogger("trioproxy.process")

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, line.encode() + b"\n")
        except OSError as exc:
            self._log.warning("orphan guard unreachable (%s); children may outlive a crash", exc)
            os.close(self._fd)
            self._fd = None

    def watch(self, pgid: int, mark: str | None = None) -> None:
        self._send(f"+{pgid}")
        if mark is not None:
            self._send(f"*{mark}")

    def unwatch(self, pgid: int, mark: str | None = None) -> None:
        self._send(f"-{pgid}")
        if mark is not None:
            self._send(f"/{mark}")

    def remove_on_exit(self, directory: str) -> None:
        """Have the guard remove ``directory`` (and what is in it) once trioproxy has gone,
        should trioproxy not get to do it itself."""
        if "\n" in directory:
            raise ValueError(f"cannot register a path with a newline: {directory!r}")
        self._send(f">{directory}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@asynccontextmanager
async def open_orphan_guard() -> AsyncIterator[OrphanGuard]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trioproxy._orphan_guard"],
            stdin=read_fd,
            start_new_session=True,  # out of reach of the terminal's Ctrl-C
        )
    finally:
        os.close(read_fd)
    guard = OrphanGuard(write_fd)
    try:
        yield guard
    finally:
        guard.close()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await process.wait()
