"""The orphan guard's own process: ``python -m trioproxy._orphan_guard``.

Reads ``+PGID`` and ``-PGID`` lines on stdin from trioproxy, and ``>PATH`` for a directory
trioproxy made (for Unix sockets). When stdin reaches its end, trioproxy is gone: every group
still registered gets SIGTERM, then SIGKILL shortly after, and the directories are removed.
"""

import contextlib
import os
import shutil
import signal
import sys
import time

GRACE = 0.5


def _kill(groups: set[int], signum: int) -> set[int]:
    alive = set()
    for pgid in groups:
        with contextlib.suppress(OSError):  # gone already
            os.killpg(pgid, signum)
            alive.add(pgid)
    return alive


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    groups: set[int] = set()
    directories: set[str] = set()
    for line in sys.stdin.buffer:
        if line.startswith(b">"):
            directories.add(os.fsdecode(line[1:].rstrip(b"\n")))
            continue
        text = line.strip()
        try:
            pgid = int(text[1:])
        except ValueError:
            continue
        if text.startswith(b"+"):
            groups.add(pgid)
        elif text.startswith(b"-"):
            groups.discard(pgid)
    groups = _kill(groups, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while groups and time.monotonic() < deadline:
        time.sleep(0.05)
        groups = _kill(groups, 0)
    _kill(groups, signal.SIGKILL)
    # Once the servers are gone, so nothing recreates a socket in them.
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
