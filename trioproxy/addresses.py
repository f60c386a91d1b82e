"""Where one server's processes listen: a port or a unix socket, chosen, kept and cleaned up.

A server with ``port: 0`` gets a free port at its first start and keeps it across restarts
(bookmarks and open pages stay valid); if its process reports the port taken, another is chosen.
``unix_socket: True`` makes a private directory for the socket, removed when trioproxy stops
(and by the orphan guard if trioproxy is killed).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable

from .backend import Backend
from .backend_tls import BackendTLS

PORT_IN_USE = re.compile(r"address already in use|EADDRINUSE|errno 98\b", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerAddress:
    """The address of one configured server (``port`` and ``unix_socket`` options)."""

    def __init__(self, port: int, unix_socket: bool | str, tls: BackendTLS | None = None) -> None:
        self.configured_port = port
        self.tls = tls  # backend_tls: connections to it speak TLS
        self.port = port
        self.owned_dir: str | None = None  # made by us, removed by :meth:`close`
        self.unix_socket: str | None = None
        if unix_socket is True:
            self.owned_dir = tempfile.mkdtemp(prefix="trioproxy-")
            self.unix_socket = os.path.join(self.owned_dir, "socket")
        elif isinstance(unix_socket, str) and unix_socket:
            self.unix_socket = unix_socket

    @property
    def backend(self) -> Backend:
        if self.unix_socket:
            return Backend(unix_socket=self.unix_socket, tls=self.tls)
        return Backend(port=self.port, tls=self.tls)

    def prepare(self) -> None:
        """Before a start: pick a port if none yet; remove a stale socket (it would look ready)."""
        if self.unix_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_socket)
        elif self.port == 0:
            self.port = free_port()

    def taken(self, output: Iterable[str]) -> bool:
        """Whether a process that failed to start says its (chosen, not configured) port was taken."""
        if self.configured_port != 0 or self.unix_socket:
            return False
        return any(PORT_IN_USE.search(line) for line in output)

    def choose_another_port(self) -> None:
        self.port = 0

    def close(self) -> None:
        if self.owned_dir:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
