"""Running the app: supervisors and Hypercorn in one nursery, torn down together."""

from __future__ import annotations

from functools import partial
from typing import Any

import trio


async def run_app(
    app: Any, hypercorn_config: Any, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``app`` (from :func:`trioproxy.app.create_app`) until cancelled.

    Reports Hypercorn's bound addresses once it listens. On cancellation Hypercorn stops,
    every server is stopped concurrently, and pooled backend connections are closed.
    """
    import hypercorn.trio

    dispatcher = app.extensions["trioproxy"]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.supervisors.run)
            for service in dispatcher.services:
                await nursery.start(service)
            binds = await nursery.start(
                partial(hypercorn.trio.serve, app, hypercorn_config, shutdown_trigger=trio.sleep_forever)
            )
            task_status.started(binds)
    finally:
        dispatcher.proxy_targets.close()
