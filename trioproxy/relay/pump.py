"""The tunnel pump: one thread that copies the bytes of every WebSocket tunnel between plain sockets.

A tunnelled WebSocket's messages are small and latency-bound (a Panel or Bokeh page sends a
few hundred bytes per interaction). Driven by trio's scheduler, one hop of such a message
costs ~40 µs on the 2-core benchmark VM (a wake-up through the run loop for the read, plus
its checkpoints); an epoll loop of its own, with level-triggered registrations made once,
costs ~11 µs (``benchmarks/README.md``, "WebSocket tunnel: why a thread"). So the pump runs
that loop on a thread and carries a tunnel for as long as nothing but copying happens.

Anything else hands the tunnel back to its task, which finishes it on the event loop with
the same code as tunnels over TLS: an end of either side (EOF, an error), a message over the
size limit, a close of trioproxy's own (:meth:`TunnelPump.release`: a shutdown), or the task
being cancelled. Every one of those ends the tunnel, so a tunnel is carried at most once. (A
bug on the thread, an exception, is logged and marks the tunnel ``broken``: its connections
are closed, since where its frames stand is no longer known.)

Ownership: while carried, a tunnel's two sockets, frame cursors and unsent bytes belong to
the thread; the tunnel's task waits, and touches them again only once the thread has handed
the tunnel back (an event set through the trio token). Requests from the event loop (carry,
release, stop) go through a queue and a wake-up socket. The thread belongs to
:meth:`TunnelPump.run`, which does not return before the thread has ended.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import math
import os
import select
import socket
import sys
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .tunnel import Tunnel, _Direction

log = logging.getLogger("trioproxy.pump")

# The thread reads and writes with libc's read(2) and write(2) through ctypes.PyDLL, whose
# calls keep the GIL, instead of os.read/os.write, which give it up around each call. A thread
# that gives the GIL up while the event loop is busy waits up to the interpreter's switch
# interval to get it back, at every call: with small GETs flooding the event loop, 100 echoing
# WebSockets got ~2,300 round trips a second; keeping the GIL over these non-blocking calls,
# ~18,000 (benchmarks/README.md, "The pump and the GIL"). Only the wait in epoll gives the GIL
# up. The price is one more copy of what is read (~0.2 ms of CPU per MB).
#
# Linux only (epoll, and libc by name); elsewhere AVAILABLE is false and tunnels are copied on
# the event loop.
AVAILABLE = sys.platform == "linux"
if AVAILABLE:
    _libc = ctypes.PyDLL(None, use_errno=True)
    _libc_read = _libc["read"]
    _libc_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    _libc_read.restype = ctypes.c_ssize_t
    _libc_write = _libc["write"]  # all of a bytes object
    _libc_write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    _libc_write.restype = ctypes.c_ssize_t
    _libc_write_at = _libc["write"]  # the rest of one, from an address
    _libc_write_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    _libc_write_at.restype = ctypes.c_ssize_t

READ_SIZE = 1024 * 1024  # measured: 1 MiB reads gave 633 MB/s on 0.9 MB messages, 256 KiB 497
THREAD_NAME = "trioproxy-pump"  # as `top -H` and /proc/<pid>/task/*/comm show it
# Bytes the thread moves count as the server's activity at once after a quiet second, else at
# the next sweep (one a second): not a wake-up of the event loop per message.
ACTIVITY_INTERVAL = 1.0

_IN = getattr(select, "EPOLLIN", 0)
_OUT = getattr(select, "EPOLLOUT", 0)
_TROUBLE = getattr(select, "EPOLLERR", 0) | getattr(select, "EPOLLHUP", 0)

_CARRY, _RELEASE, _STOP = "carry", "release", "stop"


class TunnelPump:
    """Copies tunnels' bytes on a thread of its own while :meth:`run` runs."""

    def __init__(self) -> None:
        self._requests: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake: socket.socket | None = None
        self._running = False
        self._carried: dict[Tunnel, trio.Event] = {}

    @property
    def running(self) -> bool:
        return self._running

    @property
    def carried(self) -> int:
        """How many tunnels the thread holds now."""
        return len(self._carried)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the thread until cancelled; tunnels still carried then are handed back."""
        token = trio.lowlevel.current_trio_token()
        inbox, self._wake = socket.socketpair()
        inbox.setblocking(False)
        self._wake.setblocking(False)
        thread = _PumpThread(inbox, self._requests, token, self._thread_ended)
        with inbox, self._wake:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        trio.to_thread.run_sync,
                        thread.run,
                        abandon_on_cancel=False,
                        limiter=trio.CapacityLimiter(1),
                        thread_name=THREAD_NAME,
                    )
                )
                self._running = True
                task_status.started()
                try:
                    await self._report_activity()
                finally:
                    self._running = False
                    self._ask(_STOP, None)

    async def carry(self, tunnel: Tunnel) -> bool:
        """Copy ``tunnel``'s bytes on the thread until it is handed back; False if not taken.

        Cancelled, it asks for the tunnel back and waits for it (shielded: the thread answers
        within one turn of its loop) before letting the cancellation through.
        """
        ends = (tunnel.client_to_backend.source, tunnel.backend_to_client.source)
        if not self._running or not all(_non_blocking(end) for end in ends):
            return False
        handed_back = trio.Event()
        self._carried[tunnel] = handed_back
        self._ask(_CARRY, (tunnel, handed_back))
        try:
            await handed_back.wait()
        finally:
            if not handed_back.is_set():
                self._ask(_RELEASE, tunnel)
                with trio.CancelScope(shield=True):
                    await handed_back.wait()
            del self._carried[tunnel]
        return True

    def release(self, tunnel: Tunnel) -> None:
        """Ask for ``tunnel`` back (if carried): its task goes on with it on the event loop."""
        if tunnel in self._carried:
            self._ask(_RELEASE, tunnel)

    def _ask(self, what: str, argument: Any) -> None:
        self._requests.append((what, argument))
        if self._wake is not None:
            # BlockingIOError: wake-ups are queued already; closed: the thread has ended.
            with contextlib.suppress(OSError):
                self._wake.send(b"!")

    def _thread_ended(self) -> None:
        """On the event loop, once the thread has stopped: whatever it still carried is back."""
        self._running = False
        for handed_back in self._carried.values():
            handed_back.set()

    async def _report_activity(self) -> None:
        while True:
            await trio.sleep(ACTIVITY_INTERVAL)
            for tunnel in list(self._carried):
                tunnel.report_activity()


class _Carried:
    """A tunnel as the thread holds it: each socket's file descriptor and what it waits for."""

    __slots__ = ("tunnel", "handed_back", "directions", "interest", "reported_at", "written")

    def __init__(self, tunnel: Tunnel, handed_back: trio.Event) -> None:
        self.tunnel = tunnel
        self.handed_back = handed_back
        self.reported_at = -math.inf  # time.monotonic() of the last activity report it asked for
        up, down = tunnel.client_to_backend, tunnel.backend_to_client
        client, backend = _fileno(up.source), _fileno(down.source)
        # By file descriptor: the direction it is the source of, the one it is the sink of, and
        # the other socket's descriptor.
        self.directions: dict[int, tuple[_Direction, _Direction, int]] = {
            client: (up, down, backend),
            backend: (down, up, client),
        }
        self.interest = {client: 0, backend: 0}
        self.written: dict[_Direction, int] = {up: 0, down: 0}  # of each direction's unsent bytes


def _fileno(stream: Any) -> int:
    return int(stream.socket.fileno())


def _non_blocking(stream: Any) -> bool:
    # The thread's reads and writes keep the GIL: one that blocked would stop every thread.
    return not os.get_blocking(_fileno(stream))


class _PumpThread:
    """The loop on the pump's thread: a level-triggered epoll over every carried socket."""

    def __init__(self, inbox: socket.socket, requests: collections.deque[tuple[str, Any]], token: Any, ended: Any) -> None:
        self.inbox = inbox
        self.requests = requests
        self.token = token
        self.ended = ended
        self.poller = select.epoll()
        self.buffer = ctypes.create_string_buffer(READ_SIZE)
        self.by_fd: dict[int, _Carried] = {}
        self.by_tunnel: dict[Tunnel, _Carried] = {}

    def run(self) -> None:
        try:
            self.poller.register(self.inbox.fileno(), _IN)
            self._loop()
        except Exception:
            log.exception("the WebSocket tunnel pump stopped; tunnels are copied on the event loop from now on")
        finally:
            self.poller.close()
            self.token.run_sync_soon(self.ended)

    def _loop(self) -> None:
        inbox = self.inbox.fileno()
        while True:
            for fd, events in self.poller.poll():
                if fd == inbox:
                    if not self._take_requests():
                        return
                    continue
                carried = self.by_fd.get(fd)
                if carried is None:
                    continue  # handed back earlier in this batch
                try:
                    self._serve(carried, fd, events)
                except Exception:
                    # Where its frames stand is unknown now: the tunnel can only end.
                    log.exception("WebSocket tunnel pump: ending a tunnel after an unexpected error")
                    carried.tunnel.broken = True
                    self._hand_back(carried)

    def _take_requests(self) -> bool:
        """Carry, release; False once asked to stop."""
        with contextlib.suppress(BlockingIOError):
            while self.inbox.recv(4096):
                continue
        while self.requests:
            what, argument = self.requests.popleft()
            if what == _CARRY:
                self._carry(*argument)
            elif what == _RELEASE:
                carried = self.by_tunnel.get(argument)
                if carried is not None:
                    self._hand_back(carried)
            else:
                return False
        return True

    def _carry(self, tunnel: Tunnel, handed_back: trio.Event) -> None:
        carried = _Carried(tunnel, handed_back)
        self.by_tunnel[tunnel] = carried
        for fd in carried.directions:
            self.by_fd[fd] = carried
            self.poller.register(fd, 0)
        self._update_interest(carried)

    def _serve(self, carried: _Carried, fd: int, events: int) -> None:
        source_of, sink_of, peer = carried.directions[fd]
        if events & _OUT and sink_of.unsent:
            if not self._flush(carried, sink_of, fd):
                return
        if events & (_IN | _TROUBLE) and not source_of.unsent:
            if not self._read(carried, source_of, fd, peer):
                return
        elif events & _TROUBLE:
            # Its peer is gone while it cannot be read (its bytes wait for the other side):
            # the end is near; the event loop finishes it rather than this loop spinning.
            self._hand_back(carried)
            return
        self._update_interest(carried)

    def _read(self, carried: _Carried, way: _Direction, fd: int, sink: int) -> bool:
        """One read from ``way``'s source ``fd``, passed on to ``sink``; False if handed back."""
        count = _libc_read(fd, self.buffer, READ_SIZE)
        if count < 0:
            if _would_block():
                return True
            count = 0  # reset: the event loop reads the end again and finishes
        data = ctypes.string_at(self.buffer, count)
        if not data:
            self._hand_back(carried)
            return False
        carried.tunnel.moved = True
        now = time.monotonic()
        if now - carried.reported_at >= ACTIVITY_INTERVAL:
            # The first bytes after a quiet second count at once; later ones at the next sweep.
            carried.reported_at = now
            self.token.run_sync_soon(carried.tunnel.report_activity)
        cursor = way.cursor
        out = cursor.advance(data)
        if cursor.close_passed:
            way.closed = True
        if out:
            way.unsent = out
            if not self._flush(carried, way, sink):
                return False
        if cursor.too_big:
            self._hand_back(carried)
            return False
        return True

    def _flush(self, carried: _Carried, way: _Direction, fd: int) -> bool:
        """Write what ``way`` holds as far as the sink takes it; False if handed back."""
        unsent = way.unsent
        done = carried.written[way]
        if done:
            address = ctypes.cast(ctypes.c_char_p(unsent), ctypes.c_void_p).value or 0
            sent = _libc_write_at(fd, address + done, len(unsent) - done)
        else:
            sent = _libc_write(fd, unsent, len(unsent))
        if sent < 0:
            if _would_block():
                return True
            self._hand_back(carried)  # the sink's side is gone: the event loop finds out again
            return False
        done += sent
        if done == len(unsent):
            way.unsent, done = b"", 0
        carried.written[way] = done
        return True

    def _update_interest(self, carried: _Carried) -> None:
        for fd, (source_of, sink_of, _) in carried.directions.items():
            interest = (0 if source_of.unsent else _IN) | (_OUT if sink_of.unsent else 0)
            if interest != carried.interest[fd]:
                self.poller.modify(fd, interest)
                carried.interest[fd] = interest

    def _hand_back(self, carried: _Carried) -> None:
        for way, done in carried.written.items():
            if done:
                way.unsent = way.unsent[done:]
        for fd in carried.directions:
            self.by_fd.pop(fd, None)
            self.poller.unregister(fd)
        del self.by_tunnel[carried.tunnel]
        self.token.run_sync_soon(carried.handed_back.set)


def _would_block() -> bool:
    return ctypes.get_errno() in (errno.EAGAIN, errno.EWOULDBLOCK)
