"""Running one child process: its own process group, its output drained, stopped with its group.

A child never outlives trioproxy: stopping sends SIGTERM to the child's process group and SIGKILL
after a grace period, and whatever the group leader leaves behind when it exits is killed with
it. If trioproxy itself is killed with SIGKILL it cannot do that, so an :class:`OrphanGuard`
process (started once) holds the other end of a pipe and kills every registered group when the
pipe closes, and removes the directories registered with it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

MAX_LINE = 4096
DRAIN_AFTER_EXIT = 1.0  # seconds to read what is left in the pipe once the group is gone


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


def _signal_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def _stop_group(stop_timeout: float, process: trio.Process) -> None:
    # trio calls this (shielded) when the task running the child is cancelled, then waits
    # for the child to exit.
    _signal_group(process.pid, signal.SIGTERM)
    with trio.move_on_after(stop_timeout):
        await process.wait()
        return
    logging.getLogger("trioproxy.process").warning(
        "process %d ignored SIGTERM for %.1f s; sending SIGKILL", process.pid, stop_timeout
    )
    _signal_group(process.pid, signal.SIGKILL)


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
                    env=dict(spec.env),
                    cwd=spec.cwd,
                    deliver_cancel=partial(_stop_group, spec.stop_timeout),
                )
            )
        except OSError as exc:
            # Raised here, not from inside the nursery, it stays a plain OSError.
            start_error = exc
        else:
            if guard is not None:
                guard.watch(process.pid)
            assert process.stdout is not None
            # Shielded: a child stopped with SIGTERM often prints as it shuts down, and would
            # get a broken pipe (or block) if its output stopped being read. Once the whole
            # group is gone the drain gets a short deadline, in case something outside the
            # group still holds the pipe.
            draining = trio.CancelScope(shield=True)
            nursery.start_soon(_drain_within, draining, process.stdout, output, logger)
            nursery.start_soon(_clear_group_after_exit, process, guard, draining)
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


async def _clear_group_after_exit(
    process: trio.Process, guard: OrphanGuard | None, draining: trio.CancelScope
) -> None:
    # Shielded: on cancellation trio.run_process stops the leader and waits for it; only then
    # is the rest of the group killed. Whatever is left would hold the port or the output pipe
    # (and so the drain) open.
    with trio.CancelScope(shield=True):
        await process.wait()
    _signal_group(process.pid, signal.SIGKILL)
    if guard is not None:
        guard.unwatch(process.pid)
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

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unwatch(self, pgid: int) -> None:
        self._send(f"-{pgid}")

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
