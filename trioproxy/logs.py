"""Logging set-up for the command: masked lines on stderr, the access log written in batches.

The access log has a line per request; written and flushed one by one, those lines cost a
tenth of a small relayed request's CPU time. They are written together a few times a
second instead. Their tokens were already taken out of the query when the line was made,
so only the known secrets are masked there, not every pattern.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import trio

from .auth import MASK, MIN_KNOWN_SECRET, MaskingFormatter

FLUSH_INTERVAL = 0.2


class KnownSecretsFormatter(logging.Formatter):
    def __init__(self, fmt: str, datefmt: str, known: list[str]) -> None:
        super().__init__(fmt, datefmt=datefmt)
        self.known = known  # shared with the masking formatter, filled once auth is known

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.known:
            if len(secret) >= MIN_KNOWN_SECRET and secret in text:
                text = text.replace(secret, MASK)
        return text


class BatchedStreamHandler(logging.Handler):
    """Keeps formatted lines until :meth:`run` writes them out, every FLUSH_INTERVAL."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await trio.sleep(FLUSH_INTERVAL)
                self.flush()
        finally:
            self.flush()


def setup_logging(level: int | str, fmt: str) -> tuple[MaskingFormatter, BatchedStreamHandler]:
    """Log to stderr through a formatter that masks secrets; add known ones to its ``known``.

    Returns that formatter and the access log's handler, whose :meth:`run` must be started.
    """
    handler = logging.StreamHandler()
    formatter = MaskingFormatter(fmt, datefmt="%H:%M:%S")
    handler.setFormatter(formatter)
    root = logging.getLogger("trioproxy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False

    access = BatchedStreamHandler()
    access.setFormatter(KnownSecretsFormatter(fmt, "%H:%M:%S", formatter.known))
    access_logger = logging.getLogger("trioproxy.access")
    access_logger.handlers[:] = [access]
    access_logger.propagate = False
    return formatter, access
