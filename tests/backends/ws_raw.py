"""A raw stream backend for raw_socket_proxy tests: python ws_raw.py PORT | --unix PATH.

Echoes every byte it gets back, upper-cased. On ``bye`` it closes the connection itself; when
the other side closes, it prints ``eof``.
"""

from __future__ import annotations

import sys

import trio
from ws_echo import unix_listener


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                print("eof", flush=True)
                return
            if data.strip() == b"bye":
                return
            await stream.send_all(data.upper())


async def main() -> None:
    if sys.argv[1] == "--unix":
        listeners = [await unix_listener(sys.argv[2])]
    else:
        listeners = await trio.open_tcp_listeners(int(sys.argv[1]), host="127.0.0.1")
    print("ws_raw listening", flush=True)
    await trio.serve_listeners(echo, listeners)


if __name__ == "__main__":
    trio.run(main)
