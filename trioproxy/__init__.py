"""trioproxy: start web services on demand and relay HTTP and WebSocket traffic to them.

The public API is small and imported lazily, so that ``python -m trioproxy._orphan_guard``
(started with every trioproxy) stays quick to start.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_app": "trioproxy.app",
    "Settings": "trioproxy.app",
    "run_app": "trioproxy.server",
    "ServerSupervisor": "trioproxy.supervisor",
    "Supervisors": "trioproxy.supervisor",
    "ServerUnavailable": "trioproxy.supervisor",
    "State": "trioproxy.supervisor",
    "ServerProxy": "trioproxy.config",
    "ServerProcess": "trioproxy.config",
    "LauncherEntry": "trioproxy.config",
    "ConfigError": "trioproxy.config",
    "TokenAuth": "trioproxy.auth",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trioproxy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
