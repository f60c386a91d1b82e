"""WebSocket keepalive: trioproxy's own pings to a client whose WebSocket has gone quiet.

Load balancers and reverse proxies in front of trioproxy cut a WebSocket that carried nothing
for a while (nginx's ``proxy_read_timeout`` and AWS ALB's idle timeout: 60 s by default). The
one that is cut is the quiet one *toward the client*: nginx times the reads from its upstream,
which is trioproxy, and a load balancer that counts both directions is satisfied by bytes in
either. So a tunnel that sent nothing to its client for ``websocket_keepalive`` seconds gets a
ping from trioproxy, whatever the client sent meanwhile.

The ping's payload is trioproxy's own (:attr:`Keepalive.payload`, random per WebSocket), so its
pong is recognised: it is dropped, never relayed to the backend (other pongs pass as before),
and it counts as no activity. A client that answers neither with that pong nor with any other
byte within ``websocket_keepalive`` seconds after the ping is gone (a laptop closed, a network
dropped without a FIN): it is closed with 1011 and its backend connection ends. Bytes from the
client count as an answer too: a client sending a long frame cannot put the pong before its
end.

:class:`Keepalive` is the rule, pure: times are passed in, in the clock of whoever holds it
(trio's on the event loop, ``time.monotonic`` on the pump's thread; :meth:`Keepalive.shift`
moves between them). The fast path's copiers (:mod:`trioproxy.relay.tunnel`,
:mod:`trioproxy.relay.pump`) and the ASGI relay (:mod:`trioproxy.relay.websocket`) apply it.
"""

from __future__ import annotations

import enum
import os
from typing import Any

OP_PING = 0x9
OP_PONG = 0xA
# For raw_socket_proxy servers (noVNC, …), which are what the reports were about.
RAW_SOCKET_DEFAULT = 30.0
# The shortest interval allowed: shorter ones would flood a client with pings.
SHORTEST = 0.1
# How often a ping that cannot go yet (not at a message boundary) is tried again, at most.
RETRY = 1.0

INTERNAL_ERROR = 1011
GOING_AWAY = 1001
CLIENT_REASON = "no answer to the proxy's keepalive ping"
BACKEND_REASON = "the client did not answer the proxy's keepalive ping"


def interval_for(process: Any) -> float | None:
    """The keepalive interval of a server's WebSockets (a ``ServerProcess``), or None (off).

    ``websocket_keepalive`` unset (None): on (:data:`RAW_SOCKET_DEFAULT`) for
    ``raw_socket_proxy`` servers, off for the others; 0: off.
    """
    if process is None:
        return None
    value = getattr(process, "websocket_keepalive", None)
    if value is None:
        value = RAW_SOCKET_DEFAULT if process.raw_socket_proxy else 0.0
    return float(value) or None


class Action(enum.Enum):
    PING = "ping"  # send a ping now (if at a message boundary)
    EXPIRED = "expired"  # the client did not answer: close it with 1011


class Keepalive:
    """One WebSocket's keepalive state; see the module docstring.

    Times are in one clock (the holder's). ``last_to_client``/``last_from_client``: the last
    bytes each way (the holder notes them); ``ping_sent_at``: when the ping that waits for its
    answer went, or None.
    """

    __slots__ = ("interval", "payload", "frame", "last_to_client", "last_from_client", "ping_sent_at", "expired", "pings")

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.payload = b"trioproxy-keepalive-" + os.urandom(8).hex().encode()
        self.frame = bytes([0x80 | OP_PING, len(self.payload)]) + self.payload  # from a server: unmasked
        self.last_to_client = now
        self.last_from_client = now
        self.ping_sent_at: float | None = None
        self.expired = False
        self.pings = 0

    @property
    def retry(self) -> float:
        return min(RETRY, self.interval / 10)

    def deadline(self) -> float:
        """When :meth:`check` may next have something to do."""
        if self.ping_sent_at is not None:
            return max(self.ping_sent_at, self.last_from_client) + self.interval
        return self.last_to_client + self.interval

    def check(self, now: float) -> Action | None:
        if self.ping_sent_at is not None:
            if now >= max(self.ping_sent_at, self.last_from_client) + self.interval:
                self.expired = True
                return Action.EXPIRED
            return None
        if now >= self.last_to_client + self.interval:
            return Action.PING
        return None

    def next_check(self, now: float) -> float:
        """When to look again after :meth:`check` at ``now`` (a ping that could not go: soon)."""
        return max(self.deadline(), now + self.retry) if self.deadline() <= now else self.deadline()

    def pinged(self, now: float) -> None:
        self.ping_sent_at = now
        self.last_to_client = now
        self.pings += 1

    def answered(self) -> None:
        """Our pong came back."""
        self.ping_sent_at = None

    def shift(self, delta: float) -> None:
        """Move every time by ``delta`` (into another clock)."""
        self.last_to_client += delta
        self.last_from_client += delta
        if self.ping_sent_at is not None:
            self.ping_sent_at += delta

    def is_ours(self, frame: bytes, header_size: int) -> bool:
        """Whether a complete pong ``frame`` (client to server: maybe masked) carries our payload."""
        payload = frame[header_size:]
        if frame[1] & 0x80:
            key = frame[header_size - 4 : header_size]
            payload = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
        return payload == self.payload
