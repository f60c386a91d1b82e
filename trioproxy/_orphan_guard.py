"""The orphan guard's own process: ``python -m trioproxy._orphan_guard``.

Reads ``+PGID`` and ``-PGID`` lines on stdin from trioproxy, ``*MARK`` and ``/MARK`` for the
family marks of its children (see :mod:`trioproxy.process`: descendants that left the group
carry the mark in their environment), and ``>PATH`` for a directory trioproxy made (for Unix
sockets). When stdin reaches its end, trioproxy is gone: every group and marked process still
registered gets SIGTERM, then SIGKILL shortly after, and the directories are removed.
"""

import contextlib
import os
import shutil
import signal
import sys
import time

GRACE = 0.5
# Set in each child's environment to a value unique to that child: how its descendants are
# found after they left its process group. (Here, not in trioproxy.process: this process
# imports nothing but the standard library.)
FAMILY_VARIABLE = "TRIOPROXY_FAMILY"


def family_members(mark: str, pgid: int | None = None, *, outside: int | None = None) -> list[int]:
    """Pids of the live processes (not zombies) whose environment carries ``mark`` as
    :data:`FAMILY_VARIABLE`, or that are in process group ``pgid``; none of process group
    ``outside`` (one signalled as a group already).

    Read from ``/proc`` (``environ`` is the environment a process was started with); where
    there is no ``/proc``, none are found.
    """
    needle = f"{FAMILY_VARIABLE}={mark}".encode()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z" or (outside is not None and int(fields[2]) == outside):
                continue
            if pgid is not None and int(fields[2]) == pgid:
                found.append(int(entry))
                continue
            with open(f"/proc/{entry}/environ", "rb") as environ:
                variables = environ.read().split(b"\0")
        except (OSError, IndexError, ValueError):  # gone meanwhile, or not ours to read
            continue
        if needle in variables:
            found.append(int(entry))
    return found


def _kill(groups: set[int], signum: int) -> set[int]:
    alive = set()
    for pgid in groups:
        with contextlib.suppress(OSError):  # gone already
            os.killpg(pgid, signum)
            alive.add(pgid)
    return alive


def _kill_marked(marks: set[str], signum: int) -> bool:
    reached = False
    for mark in marks:
        for pid in family_members(mark):
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
                reached = True
    return reached


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    groups: set[int] = set()
    marks: set[str] = set()
    directories: set[str] = set()
    for line in sys.stdin.buffer:
        if line.startswith(b">"):
            directories.add(os.fsdecode(line[1:].rstrip(b"\n")))
            continue
        if line[:1] in (b"*", b"/"):
            mark = line[1:].strip().decode("ascii", "replace")
            if line.startswith(b"*"):
                marks.add(mark)
            else:
                marks.discard(mark)
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
    marked = _kill_marked(marks, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while (groups or marked) and time.monotonic() < deadline:
        time.sleep(0.05)
        groups = _kill(groups, 0)
        marked = _kill_marked(marks, 0)
    _kill(groups, signal.SIGKILL)
    _kill_marked(marks, signal.SIGKILL)
    # Once the servers are gone, so nothing recreates a socket in them.
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
