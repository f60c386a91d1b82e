"""A server that leaves processes behind, as daemonizing apps do; each notes its signals.

    python family.py PORT LOGDIR MODE

MODE ``group``: a child in the server's own process group that needs 1 s to finish after
SIGTERM. MODE ``daemon``: a grandchild that called setsid (a session and group of its own,
re-parented away from the server), likewise. Each writes ``<pid> started``, ``<pid> SIGTERM``
and ``<pid> finished`` to LOGDIR/<pid>; the server itself exits at once on SIGTERM.
"""

import http.server
import os
import signal
import sys
import time

port, logdir, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def note(text: str) -> None:
    with open(os.path.join(logdir, str(os.getpid())), "a") as log:
        log.write(f"{os.getpid()} {text}\n")


def lingering() -> None:
    """Needs a second after SIGTERM to finish (as an X server writing its state would)."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    note("started")
    while not stopping:
        time.sleep(0.02)
    note("SIGTERM")
    time.sleep(1.0)
    note("finished")
    os._exit(0)


if os.fork() == 0:
    if mode == "daemon":
        os.setsid()
        if os.fork() != 0:
            os._exit(0)  # the intermediate parent: the grandchild is re-parented
    lingering()

signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler).serve_forever()
