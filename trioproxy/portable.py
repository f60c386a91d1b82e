"""Which platform-bound code paths trioproxy takes, and the switch that forces the portable ones.

Two paths rely on one platform. The tunnel pump (:mod:`trioproxy.relay.pump`) needs Linux
(epoll, libc by name) and CPython (it writes from an address inside a ``bytes`` object);
:func:`trioproxy.listener.client_gone` asks the kernel with ``POLLRDHUP``, which only Linux
has. Everywhere else trioproxy takes the portable paths: tunnels are copied on the event loop,
and a client's end of stream is seen by peeking at one byte.

``TRIOPROXY_PORTABLE=1`` in the environment (read once, at import) forces the portable paths
on Linux too, so that they are tested where the suite runs (``tests/test_portable_paths.py``).
"""

from __future__ import annotations

import os
import select
import sys

FORCED = os.environ.get("TRIOPROXY_PORTABLE", "").strip() not in ("", "0")

# The tunnel pump may run (its module is importable everywhere; it runs only where this holds).
PUMP = sys.implementation.name == "cpython" and sys.platform == "linux" and not FORCED

# select.POLLRDHUP where client_gone may use it; None: peek instead. Read at each call, so a
# test may set it.
POLLRDHUP: int | None = None if FORCED else getattr(select, "POLLRDHUP", None)
