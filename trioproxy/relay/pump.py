"""The tunnel pump: one thread that copies the bytes of every WebSocket tunnel between plain sockets.

A tunnelled WebSocket's messages are small and latency-bound (a Panel or Bokeh page sends a
few hundred bytes per interaction). Driven by trio's scheduler, one hop of such a message
costs ~40 µs on the 2-core benchmark VM (a wake-up through the run loop for the read, plus
its checkpoints); an epoll loop of its own, with level-triggered registrations made once,
costs ~11 µs (``benchmarks/README.md``, "WebSocket tunnel: why a thread"). So the pump runs
that loop on a thread and carries a tunnel for as long as nothing but copying happens.

Anything else hands the tunnel back to its task, which finishes it on the event loop with
the same code as tunnels over TLS: an end of either side (EOF, an error), a frame the tunnel
will not pass (over the size limit, invalid), a close of trioproxy's own
(:meth:`TunnelPump.release`: a shutdown), a client silent after a keepalive ping (the thread
sends the pings itself: :mod:`trioproxy.relay.keepalive`), the pump stopping, or the task
being cancelled.
Every one of those ends the tunnel, so a tunnel is carried at most once.

Ownership: a carried tunnel's copying state, its two :class:`~trioproxy.relay.tunnel.Flow`
objects (cursor, unsent bytes and how much of them the sink took), goes to the thread whole
with the carry request and comes back whole in one :class:`~trioproxy.relay.tunnel.Handback`
(delivered through the trio token); the tunnel holds no reference to it meanwhile, and its
task does not touch the sockets. Every exit path hands back: the thread's own (an end, a
release, a stop), an unexpected error on one tunnel (logged; that tunnel ends, since where
its frames stand is unknown), and the thread's death (an exception anywhere in it, logged
with its traceback): once the thread has ended, the event loop takes what it still held and
hands each tunnel back ``failed`` with its state as the thread last left it whole (or none,
for the tunnel it was in the middle of), so that it ends (1011 where at a frame boundary,
else just closed) and never copies again with stale state. Tunnels carried after that run on
the event loop. The thread belongs to :meth:`TunnelPump.run`, which does not return before
the thread has ended.
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
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .. import portable
from .keepalive import Action
from .tunnel import Flow, Handback, Step

if TYPE_CHECKING:
    from .tunnel import Tunnel

log = logging.getLogger("trioproxy.pump")

# The thread reads and writes with libc's read(2) and send(2) through ctypes.PyDLL, whose
# calls keep the GIL, instead of os.read/os.write, which give it up around each call. A thread
# that gives the GIL up while the event loop is busy waits up to the interpreter's switch
# interval to get it back, at every call: with small GETs flooding the event loop, 100 echoing
# WebSockets got ~2,300 round trips a second; keeping the GIL over these non-blocking calls,
# ~18,000 (benchmarks/README.md, "The pump and the GIL"). Only the wait in epoll gives the GIL
# up. The price is one more copy of what is read (~0.2 ms of CPU per MB).
#
# send(2) with MSG_NOSIGNAL, not write(2): a peer that vanished makes it fail with EPIPE
# instead of raising SIGPIPE, which kills a process that does not ignore it (Python ignores
# it, an embedding program may not).
#
# Linux and CPython only (epoll, libc by name, a pointer into a bytes object): see
# trioproxy.portable. Elsewhere AVAILABLE is false and tunnels are copied on the event loop.
AVAILABLE = portable.PUMP
if AVAILABLE:
    _libc = ctypes.PyDLL(None, use_errno=True)
    _libc_read = _libc["read"]
    _libc_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    _libc_read.restype = ctypes.c_ssize_t
    _libc_send = _libc["send"]  # all of a bytes object
    _libc_send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    _libc_send.restype = ctypes.c_ssize_t
    _libc_send_at = _libc["send"]  # the rest of one, from an address
    _libc_send_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc_send_at.restype = ctypes.c_ssize_t
_NO_SIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)

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
    """Copies tunnels' bytes on a thread of its own while :meth:`run` runs.

    ``fault`` is a seam for tests: when set, the thread calls it at named points ("turn":
    after each wait, outside any tunnel; "hand back": as it lets a tunnel go; "keepalive": on a
    tunnel whose keepalive is due), and an
    exception it raises is one the thread did not expect.
    """

    def __init__(self) -> None:
        self._requests: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake: socket.socket | None = None
        self._running = False
        self._carried: dict[Tunnel, _Carriage] = {}
        self.fault: Callable[[str], None] | None = None

    @property
    def running(self) -> bool:
        return self._running

    @property
    def carried(self) -> int:
        """How many tunnels the thread holds now."""
        return len(self._carried)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the thread until cancelled; tunnels still carried then are handed back.

        Where the pump cannot run (not :data:`AVAILABLE`), no thread starts and every carry
        is declined: tunnels run on the event loop.
        """
        if not AVAILABLE:
            task_status.started()
            await trio.sleep_forever()
        token = trio.lowlevel.current_trio_token()
        inbox, self._wake = socket.socketpair()
        inbox.setblocking(False)
        self._wake.setblocking(False)
        thread = _PumpThread(inbox, self._requests, token, self._deliver, self)
        with inbox, self._wake:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_thread, thread)
                self._running = True
                task_status.started()
                try:
                    await self._report_activity()
                finally:
                    self._running = False
                    self._ask(_STOP, None)

    async def carry(self, tunnel: Tunnel, flows: tuple[Flow, Flow]) -> Handback | None:
        """Copy on the thread until it hands ``tunnel`` back; None if not taken.

        ``flows`` (client to backend, backend to client) belong to the thread until then; the
        handback returns them (or says they are lost). Cancelled, it asks for the tunnel back
        and waits for it (shielded: the thread answers within one turn of its loop, and a
        thread that ended has handed back everything) before letting the cancellation through.
        """
        ends = (tunnel.client_to_backend.source, tunnel.backend_to_client.source)
        if not self._running or not all(_non_blocking(end) for end in ends):
            return None
        carriage = _Carriage(tunnel, _fileno(ends[0]), _fileno(ends[1]), flows)
        keepalive = carriage.keepalive
        if keepalive is not None:  # into the thread's clock, and back with the handback
            keepalive.shift(time.monotonic() - trio.current_time())
        self._carried[tunnel] = carriage
        self._ask(_CARRY, carriage)
        try:
            await carriage.returned.wait()
        finally:
            if not carriage.returned.is_set():
                self._ask(_RELEASE, tunnel)
                with trio.CancelScope(shield=True):
                    await carriage.returned.wait()
            del self._carried[tunnel]
            if keepalive is not None:
                keepalive.shift(trio.current_time() - time.monotonic())
        return carriage.handback

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

    def _deliver(self, carriage: _Carriage, handback: Handback) -> None:
        """On the event loop: the first handback of a carriage is its answer."""
        if carriage.handback is None:
            carriage.handback = handback
            carriage.returned.set()

    async def _run_thread(self, thread: _PumpThread) -> None:
        try:
            await trio.to_thread.run_sync(
                thread.run, abandon_on_cancel=False, limiter=trio.CapacityLimiter(1), thread_name=THREAD_NAME
            )
        except Exception:  # the thread could not start, or trio failed to run it
            log.exception("the WebSocket tunnel pump could not run; tunnels are copied on the event loop")
        finally:
            self._thread_ended(thread)

    def _thread_ended(self, thread: _PumpThread) -> None:
        """Once the thread has ended (stopped or died): what it still held comes back.

        Its handbacks came first (the trio token runs callbacks in order). Tunnels it never
        took go on unchanged; those it held end, with their state as it last left it whole,
        or without (the one it was in the middle of). Nothing of a dead thread's resumes.
        """
        self._running = False
        while self._requests:
            what, argument = self._requests.popleft()
            if what == _CARRY:
                self._deliver(argument, Handback(argument.flows, failed=False))
        held = list(thread.by_tunnel.values())
        if held:
            log.error("the WebSocket tunnel pump ended while carrying %d tunnel(s); they end now", len(held))
        for carriage in held:
            known = carriage is not thread.in_progress
            self._deliver(carriage, Handback(carriage.flows if known else None, failed=True))
        for carriage in list(self._carried.values()):
            self._deliver(carriage, Handback(None, failed=True))  # lost between two records

    async def _report_activity(self) -> None:
        while True:
            await trio.sleep(ACTIVITY_INTERVAL)
            for tunnel in list(self._carried):
                tunnel.report_activity()


class _Carriage:
    """A tunnel as the pump holds it: its flows, each socket's descriptor and what it waits for.

    From the carry request until its handback, ``flows``, ``directions`` and ``interest`` are
    the thread's; ``returned`` and ``handback`` are the event loop's.
    """

    __slots__ = (
        "tunnel", "flows", "directions", "interest", "reported_at", "returned", "handback", "client", "keepalive",
    )  # fmt: skip

    def __init__(self, tunnel: Tunnel, client: int, backend: int, flows: tuple[Flow, Flow]) -> None:
        self.tunnel = tunnel
        self.flows = flows
        up, down = flows
        self.client = client
        self.keepalive = down.keepalive  # travels with the flows
        # By file descriptor: the flow it is the source of, the one it is the sink of, and the
        # other socket's descriptor.
        self.directions: dict[int, tuple[Flow, Flow, int]] = {client: (up, down, backend), backend: (down, up, client)}
        self.interest = {client: 0, backend: 0}
        self.reported_at = -math.inf  # time.monotonic() of the last activity report it asked for
        self.returned = trio.Event()
        self.handback: Handback | None = None


def _fileno(stream: Any) -> int:
    return int(stream.socket.fileno())


def _non_blocking(stream: Any) -> bool:
    # The thread's reads and writes keep the GIL: one that blocked would stop every thread.
    return not os.get_blocking(_fileno(stream))


class _PumpThread:
    """The loop on the pump's thread: a level-triggered epoll over every carried socket."""

    def __init__(
        self,
        inbox: socket.socket,
        requests: collections.deque[tuple[str, Any]],
        token: Any,
        deliver: Callable[[_Carriage, Handback], None],
        seam: TunnelPump,
    ) -> None:
        self.inbox = inbox
        self.requests = requests
        self.token = token
        self.deliver = deliver
        self.seam = seam  # for its ``fault`` only
        self.poller = select.epoll()
        self.buffer = ctypes.create_string_buffer(READ_SIZE)
        self.by_fd: dict[int, _Carriage] = {}
        self.by_tunnel: dict[Tunnel, _Carriage] = {}
        self.in_progress: _Carriage | None = None  # the tunnel whose bytes it is handling
        # Tunnels with keepalive on, and when the next of them has something due (monotonic).
        self.keepalives: set[_Carriage] = set()
        self.keepalive_at = math.inf

    def run(self) -> None:
        """Never raises: whatever ends it, the event loop takes over what it held."""
        try:
            self.poller.register(self.inbox.fileno(), _IN)
            self._loop()
        except BaseException:
            log.exception("the WebSocket tunnel pump failed; tunnels are copied on the event loop from now on")
        finally:
            self.poller.close()

    def _loop(self) -> None:
        inbox = self.inbox.fileno()
        seam = self.seam
        while True:
            at = self.keepalive_at
            ready = self.poller.poll(-1 if at == math.inf else max(0.0, at - time.monotonic()))
            if seam.fault is not None:
                seam.fault("turn")
            for fd, events in ready:
                if fd == inbox:
                    if not self._take_requests():
                        return
                    continue
                carried = self.by_fd.get(fd)
                if carried is None:
                    continue  # handed back earlier in this batch
                self.in_progress = carried
                try:
                    self._serve(carried, fd, events)
                except Exception:
                    # Where its frames stand is unknown now: the tunnel can only end.
                    log.exception("WebSocket tunnel pump: ending a tunnel after an unexpected error")
                    self._hand_back(carried, Handback(None, failed=True))
                self.in_progress = None
            if self.keepalive_at != math.inf:
                now = time.monotonic()
                if now >= self.keepalive_at:
                    self._keep_alive(now)

    def _keep_alive(self, now: float) -> None:
        """Each tunnel's keepalive that is due: a ping to its client (at a message boundary
        with nothing unsent, else soon again), or, unanswered, the tunnel back to its task,
        which closes it."""
        at = math.inf
        step = math.inf  # the shortest retry: sweeps of every such tunnel come at most this often
        for carried in list(self.keepalives):
            keepalive = carried.keepalive
            assert keepalive is not None
            step = min(step, keepalive.retry)
            self.in_progress = carried
            try:
                if self.seam.fault is not None:
                    self.seam.fault("keepalive")
                action = keepalive.check(now)
                if action is Action.EXPIRED:
                    self._hand_back(carried, Handback(carried.flows, failed=False))
                    continue
                if action is Action.PING:
                    down = carried.flows[1]
                    if down.may_ping and not down.closed:
                        down.unsent, down.written = keepalive.frame, 0
                        keepalive.pinged(now)
                        if not self._flush(carried, down, carried.client):
                            continue  # handed back
                        self._update_interest(carried)
                at = min(at, keepalive.next_check(now))
            except Exception:
                log.exception("WebSocket tunnel pump: ending a tunnel after an unexpected error")
                self._hand_back(carried, Handback(None, failed=True))
        self.in_progress = None
        # Busy tunnels move their deadlines on without a sweep: looking again at the earliest
        # one found could sweep them all at every message; a ping is late by a retry at most.
        self.keepalive_at = max(at, now + step)

    def _take_requests(self) -> bool:
        """Carry, release; False once asked to stop (everything handed back)."""
        with contextlib.suppress(BlockingIOError):
            while self.inbox.recv(4096):
                continue
        while self.requests:
            what, argument = self.requests.popleft()
            if what == _CARRY:
                self.in_progress = argument
                self._carry(argument)
            elif what == _RELEASE:
                carried = self.by_tunnel.get(argument)
                if carried is not None:
                    self.in_progress = carried
                    self._hand_back(carried, Handback(carried.flows, failed=False))
            else:
                for carried in list(self.by_tunnel.values()):
                    self.in_progress = carried
                    self._hand_back(carried, Handback(carried.flows, failed=False))
                self.in_progress = None
                return False
            self.in_progress = None
        return True

    def _carry(self, carried: _Carriage) -> None:
        self.by_tunnel[carried.tunnel] = carried
        try:
            for fd in carried.directions:
                self.poller.register(fd, 0)
                self.by_fd[fd] = carried
            self._update_interest(carried)
            if carried.keepalive is not None:
                self.keepalives.add(carried)
                self.keepalive_at = min(self.keepalive_at, carried.keepalive.next_check(time.monotonic()))
        except Exception:
            # Its bytes are untouched; it ends all the same, as after any unexpected error.
            log.exception("WebSocket tunnel pump: cannot carry a tunnel")
            self._hand_back(carried, Handback(carried.flows, failed=True))

    def _serve(self, carried: _Carriage, fd: int, events: int) -> None:
        source_of, sink_of, peer = carried.directions[fd]
        if events & _OUT and sink_of.pending:
            if not self._flush(carried, sink_of, fd):
                return
        if events & (_IN | _TROUBLE) and not source_of.pending:
            if not self._read(carried, source_of, fd, peer):
                return
        elif events & _TROUBLE:
            # Its peer is gone while it cannot be read (its bytes wait for the other side):
            # the end is near; the event loop finishes it rather than this loop spinning.
            self._hand_back(carried, Handback(carried.flows, failed=False))
            return
        self._update_interest(carried)

    def _read(self, carried: _Carriage, flow: Flow, fd: int, sink: int) -> bool:
        """One read from ``flow``'s source ``fd``, passed on to ``sink``; False if handed back."""
        count = _libc_read(fd, self.buffer, READ_SIZE)
        if count < 0:
            if _try_again():
                return True
            count = 0  # reset: the event loop reads the end again and finishes
        data = ctypes.string_at(self.buffer, count)
        if not data:
            self._hand_back(carried, Handback(carried.flows, failed=False))
            return False
        now = time.monotonic()
        step = flow.pass_on(data)
        keepalive = carried.keepalive
        if keepalive is not None:
            if flow is carried.flows[1]:
                keepalive.last_to_client = now
            else:
                keepalive.last_from_client = now
        if flow.unsent or keepalive is None:  # (a read of our own pong alone is no activity)
            carried.tunnel.moved = True
            if now - carried.reported_at >= ACTIVITY_INTERVAL:
                # The first bytes after a quiet second count at once; later ones at the next sweep.
                carried.reported_at = now
                self.token.run_sync_soon(carried.tunnel.report_activity)
        if flow.pending and not self._flush(carried, flow, sink):
            return False
        if step is not Step.COPY:  # a frame it will not pass: the event loop closes both ends
            self._hand_back(carried, Handback(carried.flows, failed=False))
            return False
        return True

    def _flush(self, carried: _Carriage, flow: Flow, fd: int) -> bool:
        """Write what ``flow`` holds as far as the sink takes it; False if handed back."""
        unsent = flow.unsent
        done = flow.written
        if done:
            address = ctypes.cast(ctypes.c_char_p(unsent), ctypes.c_void_p).value or 0
            sent = _libc_send_at(fd, address + done, len(unsent) - done, _NO_SIGNAL)
        else:
            sent = _libc_send(fd, unsent, len(unsent), _NO_SIGNAL)
        if sent < 0:
            if _try_again():
                return True
            # The sink's side is gone (EPIPE, ECONNRESET): the event loop finds out again.
            self._hand_back(carried, Handback(carried.flows, failed=False))
            return False
        done += sent
        if done == len(unsent):
            flow.unsent, flow.written = b"", 0
        else:
            flow.written = done
        return True

    def _update_interest(self, carried: _Carriage) -> None:
        for fd, (source_of, sink_of, _) in carried.directions.items():
            interest = (0 if source_of.pending else _IN) | (_OUT if sink_of.pending else 0)
            if interest != carried.interest[fd]:
                self.poller.modify(fd, interest)
                carried.interest[fd] = interest

    def _hand_back(self, carried: _Carriage, handback: Handback) -> None:
        """Let ``carried`` go: out of every record and of epoll, then to the event loop."""
        if self.seam.fault is not None:
            self.seam.fault("hand back")
        self.by_tunnel.pop(carried.tunnel, None)
        self.keepalives.discard(carried)
        for fd in carried.directions:
            if self.by_fd.pop(fd, None) is not None:
                self.poller.unregister(fd)
        self.token.run_sync_soon(self.deliver, carried, handback)


def _try_again() -> bool:
    # EINTR: a signal reached this thread; level-triggered epoll reports the socket again.
    return ctypes.get_errno() in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
