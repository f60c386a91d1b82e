"""Logging set-up for the command: masked lines written to stderr by a thread of their own.

The event loop never writes to stderr itself: a stalled reader of stderr (a full pipe, a slow
container log driver) would block the write, and with it every relay and supervisor. Records
are formatted (and their secrets masked) on the loop, and the text is handed to a
:class:`LineWriter` thread through a queue; :meth:`LineWriter.close` writes what is left on a
clean exit.

The access log has a line per request; handed over one by one, those lines cost a tenth of a
small relayed request's CPU time. They are handed over together a few times a second instead.
Their tokens and secret-named query parameters were already taken out when the line was made
(:func:`~trioproxy.auth.query_for_log`), so only the known secrets (trioproxy's own) and the
learned ones (values from servers' command lines and environments) are masked there, not every
pattern.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from typing import IO, Any

import trio

from .auth import MaskingFormatter, mask_known

FLUSH_INTERVAL = 0.2
# Pieces of text (lines, or batches of access log lines) waiting for a stalled stderr; past
# that many, new ones are dropped and counted rather than let memory grow without bound.
MAX_PENDING = 100_000
CLOSE_TIMEOUT = 10.0  # seconds a clean exit waits for stderr to take the last lines


class LineWriter:
    """Writes text to a stream from its own thread, so that writing never blocks the caller."""

    def __init__(self, stream: IO[str] | None = None, max_pending: int = MAX_PENDING) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._queue: queue.Queue[str | None] = queue.Queue(max_pending)
        self._dropped = 0
        self._thread = threading.Thread(target=self._write_all, name="trioproxy-log-writer", daemon=True)
        self._thread.start()

    def write(self, text: str) -> None:
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self._dropped += 1

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what is queued, then stop the thread (waiting at most ``timeout`` seconds)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _write_all(self) -> None:
        while True:
            text = self._queue.get()
            if text is None:
                return
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                text = f"[trioproxy: {dropped} log line(s) dropped while stderr was not read]\n{text}"
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr is gone or closed: nothing left to tell


class WriterHandler(logging.Handler):
    """Formats each record on the caller's thread and hands the line to a :class:`LineWriter`."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class KnownSecretsFormatter(logging.Formatter):
    def __init__(self, fmt: str, datefmt: str, known: list[str]) -> None:
        super().__init__(fmt, datefmt=datefmt)
        self.known = known  # shared with the masking formatter, filled once auth is known

    def format(self, record: logging.LogRecord) -> str:
        return mask_known(super().format(record), self.known)


class BatchedHandler(logging.Handler):
    """Keeps formatted lines until :meth:`run` hands them to the writer, every FLUSH_INTERVAL."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            self.writer.write("\n".join(lines) + "\n")

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await trio.sleep(FLUSH_INTERVAL)
                self.flush()
        finally:
            self.flush()


def setup_logging(level: int | str, fmt: str) -> tuple[MaskingFormatter, BatchedHandler, LineWriter]:
    """Log to stderr through a formatter that masks secrets; add known ones to its ``known``.

    Returns that formatter, the access log's handler, whose :meth:`run` must be started, and
    the writer, to :meth:`~LineWriter.close` before exiting.
    """
    writer = LineWriter()
    handler = WriterHandler(writer)
    formatter = MaskingFormatter(fmt, datefmt="%H:%M:%S")
    handler.setFormatter(formatter)
    root = logging.getLogger("trioproxy")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False

    access = BatchedHandler(writer)
    access.setFormatter(KnownSecretsFormatter(fmt, "%H:%M:%S", formatter.known))
    access_logger = logging.getLogger("trioproxy.access")
    access_logger.handlers[:] = [access]
    access_logger.propagate = False
    return formatter, access, writer
