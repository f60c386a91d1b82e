"""A real WebSocket backend for tests: python ws_echo.py PORT | --unix PATH.

Tests also import it and serve it in their own trio run (see ``serve``). What a connection does
is chosen by the last segment of its path, so every proxy route form reaches the same
behaviour; ``?choose=N`` accepts the N-th proposed subprotocol (none by default).

  .../echo                  echo every message
  .../info                  first send a JSON text message {path, host, headers, subprotocols},
                            then echo; ``&cookie=1`` also sets a cookie in the handshake
  .../reject?status=N       refuse the upgrade with HTTP N and a short body
  .../close?code=N          after the first message, close with code N, reason "backend says bye"
  .../crash                 after the first message, the whole process exits at once
  .../ping                  ping the client; send "pong received" once it answers, then echo
  .../big?size=N            send one binary message of N bytes, then echo
  .../flood?size=N          send N-byte binary messages numbered 0, 1, ... (first 8 bytes, big
                            endian) as fast as they are taken, recording ``flooded`` for each

Every closure is recorded as a line ``closed PATH CODE REASON`` (printed when run as a script).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
import trio_websocket

MAX_MESSAGE = 64 * 1024 * 1024


def _printed(line: str) -> None:
    print(line, flush=True)


async def handle(request: trio_websocket.WebSocketRequest, record: Callable[[str], None]) -> None:
    url = urlsplit(request.path)
    command = url.path.rstrip("/").rsplit("/", 1)[-1]
    query = {key: values[0] for key, values in parse_qs(url.query).items()}
    if command == "reject":
        await request.reject(int(query.get("status", "403")), body=b"refused by the backend")
        return
    proposed = request.proposed_subprotocols
    choose = query.get("choose")
    subprotocol = proposed[int(choose)] if choose is not None else None
    cookies = [(b"set-cookie", b"backend=1; Path=/")] if query.get("cookie") else []
    ws = await request.accept(subprotocol=subprotocol, extra_headers=cookies)
    try:
        await _converse(ws, command, query, request, proposed, record)
    except trio_websocket.ConnectionClosed as closed:
        reason = closed.reason
        record(f"closed {url.path} {reason.code if reason else None} {reason.reason if reason else ''}")


async def _converse(
    ws: trio_websocket.WebSocketConnection,
    command: str,
    query: dict[str, str],
    request: trio_websocket.WebSocketRequest,
    proposed: tuple[str, ...],
    record: Callable[[str], None],
) -> None:
    if command == "info":
        info = {
            "path": request.path,
            "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in request.headers],
            "subprotocols": list(proposed),
        }
        await ws.send_message(json.dumps(info))
    elif command == "ping":
        await ws.ping(b"backend-ping")
        await ws.send_message("pong received")
    elif command == "big":
        await ws.send_message(b"b" * int(query["size"]))
    elif command == "flood":
        padding = bytes(int(query["size"]) - 8)
        for number in itertools.count():
            await ws.send_message(number.to_bytes(8, "big") + padding)
            record("flooded")
    while True:
        message = await ws.get_message()
        if command == "close":
            await ws.aclose(int(query.get("code", "1000")), "backend says bye")
        elif command == "crash":
            os._exit(3)
        await ws.send_message(message)


async def serve(
    listeners: list[trio.SocketListener],
    record: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    # trio-websocket's own server only knows TCP listeners; this one serves unix sockets too.
    async def connection(stream: trio.SocketStream) -> None:
        async with stream, trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(
                nursery, stream, max_message_size=MAX_MESSAGE, receive_buffer_size=None
            )
            await handle(request, record)
            nursery.cancel_scope.cancel()

    await trio.serve_listeners(connection, listeners, task_status=task_status)


async def unix_listener(path: str) -> trio.SocketListener:
    await trio.Path(path).unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    return trio.SocketListener(sock)


async def main() -> None:
    if sys.argv[1] == "--unix":
        listeners = [await unix_listener(sys.argv[2])]
    else:
        listeners = await trio.open_tcp_listeners(int(sys.argv[1]), host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, listeners, _printed)
        _printed("ws_echo listening")


if __name__ == "__main__":
    trio.run(main)
