"""The portable code paths (trioproxy.portable): what trioproxy does off CPython-on-Linux.

``client_gone`` is tested here both ways in this process (the module attribute it reads at
each call); the rest runs once more in a subprocess with ``TRIOPROXY_PORTABLE=1``, which
forces every portable path at import: the tunnel, fast-path, malformed-frame and client-gone
tests, and the checks below that only run forced (no pump, no POLLRDHUP, no pump thread in
the command).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trioproxy import portable
from trioproxy.listener import client_gone
from trioproxy.relay import pump

from .conftest import TOKEN, ProxyProcess, launch_trioproxy, start_proxy
from .test_tunnel_pump import thread_names
from .test_websocket import open_ws, start_echo_backend

ROOT = Path(__file__).resolve().parent.parent

# What runs again with the portable paths forced.
RERUN = [
    "tests/test_portable_paths.py",
    "tests/test_tunnel_frames.py",
    "tests/test_tunnel_pump.py",  # skipped there: its first check is that it is
    "tests/test_websocket_fastpath.py",
    "tests/test_websocket_keepalive.py",  # the keepalive on the event loop's copier
    "tests/test_backend_client.py::test_a_client_that_leaves_a_quiet_stream_closes_its_backend_connection",
    "tests/test_http_relay.py::test_client_disconnect_closes_the_backend_stream",
    # Builds a pump of its own and checks that it carries the tunnel: the pump's case only.
    "--deselect",
    "tests/test_websocket_fastpath.py::test_shutdown_closes_tunnels_with_1001_at_both_ends[pump-thread]",
]


@pytest.fixture(params=["POLLRDHUP", "peek"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "POLLRDHUP":
        if not hasattr(__import__("select"), "POLLRDHUP") or portable.FORCED:
            pytest.skip("no POLLRDHUP here")
        monkeypatch.setattr(portable, "POLLRDHUP", __import__("select").POLLRDHUP)
    else:
        monkeypatch.setattr(portable, "POLLRDHUP", None)
    yield request.param


async def _connection() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(the client's end, the server's end) of a loopback TCP connection."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
    server = await listener.accept()
    await listener.aclose()
    return client, server


async def _settle() -> None:
    await trio.sleep(0.05)  # a FIN or RST crosses loopback at once; let it arrive


async def test_an_open_connection_is_not_gone_and_its_bytes_stay_unread(strategy: str) -> None:
    client, server = await _connection()
    async with client, server:
        assert not client_gone(server.socket)
        await client.send_all(b"GET /next HTTP/1.1\r\n")  # a pipelined request: Hypercorn's
        await _settle()
        assert not client_gone(server.socket)
        assert not client_gone(server.socket)
        assert await server.receive_some(100) == b"GET /next HTTP/1.1\r\n"  # nothing consumed


@pytest.mark.parametrize("how", ["closed", "half-closed", "reset"])
async def test_a_client_that_left_is_gone(strategy: str, how: str) -> None:
    client, server = await _connection()
    async with server:
        if how == "half-closed":
            await client.send_eof()
        elif how == "reset":
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()
        else:
            await client.aclose()
        await _settle()
        assert client_gone(server.socket)
        assert client_gone(server.socket)
        server.socket.getsockname()  # its descriptor is still open (the peek's socket let go of it)
        await client.aclose()


async def test_a_connection_closed_on_our_side_is_gone(strategy: str) -> None:
    client, server = await _connection()
    async with client:
        await server.aclose()
        assert client_gone(server.socket)


def test_the_portable_paths_are_taken_when_forced_or_off_cpython_linux() -> None:
    cpython_linux = sys.implementation.name == "cpython" and sys.platform == "linux"
    assert pump.AVAILABLE == (cpython_linux and not portable.FORCED)
    if portable.FORCED:
        assert portable.POLLRDHUP is None


async def test_a_pump_that_cannot_run_declines_every_tunnel(nursery: trio.Nursery) -> None:
    if pump.AVAILABLE:
        pytest.skip("the pump runs here")
    tunnel_pump = pump.TunnelPump()
    await nursery.start(tunnel_pump.run)
    assert not tunnel_pump.running
    from .test_tunnel_frames import client_frame, open_tunnel, read_exactly

    with trio.fail_after(10):
        async with await open_tunnel(nursery, tunnel_pump) as ends:
            sent = client_frame(0x1, b"on the event loop")
            await ends.client.send_all(sent)
            assert await read_exactly(ends.backend, len(sent)) == sent
            assert tunnel_pump.carried == 0


async def test_forced_a_proxy_runs_its_tunnels_on_the_event_loop(nursery: trio.Nursery) -> None:
    if not portable.FORCED:
        pytest.skip("runs with TRIOPROXY_PORTABLE=1 (test_the_suite_holds_on_the_portable_paths)")
    backend = await start_echo_backend(nursery)
    proxy = await start_proxy(nursery)
    assert proxy.app.extensions["trioproxy"].tunnel_pump is None
    with trio.fail_after(10):
        async with open_ws(proxy.url, f"proxy/{backend.port}/echo") as ws:
            await ws.send_message("on the event loop")
            assert await ws.get_message() == "on the event loop"


async def test_forced_the_command_starts_no_pump_thread(nursery: trio.Nursery, proxy_processes: list[ProxyProcess]) -> None:
    if not portable.FORCED:
        pytest.skip("runs with TRIOPROXY_PORTABLE=1 (test_the_suite_holds_on_the_portable_paths)")
    backend = await start_echo_backend(nursery)
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN])  # inherits TRIOPROXY_PORTABLE
    proxy_processes.append(proxy)
    with trio.fail_after(10):
        async with open_ws(proxy.base, f"proxy/{backend.port}/echo") as ws:
            await ws.send_message("through the command")
            assert await ws.get_message() == "through the command"
    assert pump.THREAD_NAME not in thread_names(proxy.process.pid)


def test_the_suite_holds_on_the_portable_paths() -> None:
    if portable.FORCED:
        pytest.skip("this is the run it starts")
    env = {**os.environ, "TRIOPROXY_PORTABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rs", *RERUN],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    # What only runs forced ran, and the pump's own tests stepped aside.
    for forced in ("test_forced_a_proxy_runs_its_tunnels_on_the_event_loop", "test_forced_the_command_starts_no_pump_thread"):
        assert f"test_portable_paths.py::{forced} PASSED" in done.stdout, done.stdout
    assert "test_a_pump_that_cannot_run_declines_every_tunnel PASSED" in done.stdout
    assert "the tunnel pump runs on CPython on Linux only" in done.stdout
