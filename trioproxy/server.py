"""Running the app: supervisors and the listener (Hypercorn, plus the WebSocket fast path) in
one nursery, torn down together."""

from __future__ import annotations

from functools import partial
from typing import Any

import trio


async def run_app(
    app: Any, hypercorn_config: Any, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``app`` (from :func:`trioproxy.app.create_app`) until cancelled.

    Reports the bound addresses once it listens. Connections are served by Hypercorn, except
    those that open with a WebSocket upgrade to a relayed route (:mod:`trioproxy.fastpath`). On cancellation Hypercorn stops,
    every server is stopped concurrently, and pooled backend connections are closed.
    """
    from .fastpath import WebSocketFastPath
    from .listener import serve

    dispatcher = app.extensions["trioproxy"]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.supervisors.run)
            for service in dispatcher.services:
                await nursery.start(service)
            binds = await nursery.start(
                partial(
                    serve,
                    app,
                    hypercorn_config,
                    upgrade_handler=WebSocketFastPath(dispatcher),
                    shutdown_trigger=trio.sleep_forever,
                )
            )
            task_status.started(binds)
    finally:
        dispatcher.pool.close()
