"""The backend client, tried as an attacker and as a user of real apps would.

Real sockets throughout: raw bytes to a real trioproxy (Hypercorn), backends that are real
processes or a real loopback server that logs exactly what reached it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
from typing import Any

import httpx
import pytest
import trio

from trioproxy.backend import ClientOptions

from .conftest import PY, TOKEN, Proxy, ProxyProcess, echo_command, launch_trioproxy, start_proxy
from .recording_backend import RecordingBackend
from .test_websocket import read_request_head

AUTH = f"Authorization: token {TOKEN}\r\n".encode()
SMUGGLED = b"GET /logged/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def logged_proxy(nursery: trio.Nursery, backend: RecordingBackend, **server: Any) -> Proxy:
    await nursery.start(backend.serve)
    return await start_proxy(nursery, {"logged": {"command": [], "port": backend.port, **server}})


def proxy_port(proxy: Proxy) -> int:
    return int(proxy.url.split(":")[2].split("/")[0])


async def raw_request(port: int, data: bytes, timeout: float = 5, source: str = "127.0.0.1") -> bytes:
    """Send raw bytes to trioproxy and read until it closes the connection."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    received = b""
    with trio.move_on_after(timeout):
        await stream.send_all(data)
        while True:
            try:
                part = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not part:
                break
            received += part
    await stream.aclose()
    return received


def statuses(response: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3})", response)]


# -- framing: smuggling shapes on raw sockets ------------------------------------------------

NOT_IMPLEMENTED = 501

SHAPES = {
    # name: (raw head lines after the request line, body, what trioproxy must answer).
    # Hypercorn's parser (h11) answers some shapes itself: 501 for a coding it does not know.
    "CL.TE": (b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", chunk(SMUGGLED) + b"0\r\n\r\n", 400),
    "TE.CL": (b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", chunk(SMUGGLED) + b"0\r\n\r\n", 400),
    "TE.TE, second value": (
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\nContent-Length: 4\r\n",
        chunk(SMUGGLED) + b"0\r\n\r\n",
        NOT_IMPLEMENTED,
    ),
    "TE xchunked": (b"Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n", chunk(SMUGGLED) + b"0\r\n\r\n", NOT_IMPLEMENTED),
    "TE identity, chunked": (b"Transfer-Encoding: identity, chunked\r\n", chunk(SMUGGLED) + b"0\r\n\r\n", NOT_IMPLEMENTED),
    "TE not last": (b"Transfer-Encoding: chunked, gzip\r\n", chunk(SMUGGLED) + b"0\r\n\r\n", NOT_IMPLEMENTED),
    "space before colon": (
        b"Transfer-Encoding : chunked\r\nContent-Length: 4\r\n",
        chunk(SMUGGLED) + b"0\r\n\r\n",
        400,
    ),
    "duplicate CL": (b"Content-Length: 4\r\nContent-Length: 49\r\n", b"abcd" + SMUGGLED, 400),
    "CL list": (b"Content-Length: 4, 49\r\n", b"abcd" + SMUGGLED, 400),
    "CL sign": (b"Content-Length: +4\r\n", b"abcd", 400),
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_smuggling_shapes_never_reach_the_backend(nursery: trio.Nursery, shape: str) -> None:
    backend = RecordingBackend()
    proxy = await logged_proxy(nursery, backend)
    port = proxy_port(proxy)
    # A pooled backend connection first, where smuggled bytes would wait for the next request.
    assert statuses(await raw_request(port, b"GET /logged/warm HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close\r\n\r\n")) == [200]
    lines, body, expected = SHAPES[shape]
    head = b"POST /logged/attack HTTP/1.1\r\nHost: x\r\n" + AUTH + lines + b"\r\n"
    answer = await raw_request(port, head + body, timeout=2)
    assert statuses(answer)[:1] in ([400], [expected]), answer[:300]
    # The next client's request gets its own answer, and the backend saw nothing else.
    follow = await raw_request(port, b"GET /logged/next HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close\r\n\r\n")
    assert statuses(follow) == [200] and follow.endswith(b"ok 2"), follow
    assert backend.paths() == ["/warm", "/next"], backend.paths()
    assert not backend.errors


@pytest.mark.parametrize(
    "shape",
    [
        b"GET /logged/a HTTP/1.1\nHost: x\n" + AUTH.replace(b"\r\n", b"\n") + b"Connection: close\n\n",  # bare LF
        b"GET /logged/a HTTP/1.1\r\nHost: x\r\n" + AUTH + b"X-Note: one\r\n two\r\nConnection: close\r\n\r\n",  # obs-fold
        b"GET /logged/a HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close\r\n\r\n" + SMUGGLED,  # pipelined after close
    ],
    ids=["bare LF", "obs-fold", "bytes after Connection: close"],
)
async def test_odd_heads_give_at_most_one_clean_request(nursery: trio.Nursery, shape: bytes) -> None:
    backend = RecordingBackend()
    proxy = await logged_proxy(nursery, backend)
    answer = await raw_request(proxy_port(proxy), shape, timeout=2)
    assert statuses(answer)[:1] in ([200], [400]), answer[:300]
    # (Bytes after a Connection: close request make Hypercorn answer 400 itself while the
    # request is already being relayed; still, nothing but that one request reaches the backend.)
    assert statuses(answer).count(200) <= len(backend.requests) <= 1
    for request in backend.requests:
        assert request.target == "/a"
        assert request.header("x-forwarded-for") == "127.0.0.1"
        assert "\n" not in "".join(v for _, v in request.headers)
    assert "/smuggled" not in backend.paths()


async def test_backend_gets_framing_written_by_the_relay_and_always_a_host(nursery: trio.Nursery) -> None:
    backend = RecordingBackend()
    proxy = await logged_proxy(nursery, backend)
    port = proxy_port(proxy)
    chunked = (
        b"POST /logged/chunked HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunk(b"hello ") + chunk(b"world") + b"0\r\n\r\n"
    )
    assert statuses(await raw_request(port, chunked)) == [200]
    nohost = b"GET /logged/old HTTP/1.0\r\n" + AUTH + b"\r\n"
    assert statuses(await raw_request(port, nohost)) == [200]
    connection_host = b"GET /logged/conn HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close, host\r\n\r\n"
    assert statuses(await raw_request(port, connection_host)) == [200]
    sent, old, conn = backend.requests
    assert sent.body == b"hello world"
    framing = [(n.lower(), v) for n, v in sent.headers if n.lower() in ("content-length", "transfer-encoding")]
    assert framing in ([("content-length", "11")], [("transfer-encoding", "chunked")])
    assert old.header("host") == f"127.0.0.1:{backend.port}"
    assert conn.header("host") == "x"


# -- framing of responses --------------------------------------------------------------------


async def canned_backend(nursery: trio.Nursery, response: bytes) -> int:
    """A backend that answers every request with ``response`` and closes."""

    async def handle(stream: trio.SocketStream) -> None:
        if b"\r\n\r\n" not in await read_request_head(stream):
            return
        await stream.send_all(response)
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def test_responses_with_other_transfer_codings_or_two_framings_are_502(nursery: trio.Nursery) -> None:
    gzip_chunked = await canned_backend(
        nursery, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunk(b"\x1f\x8bxx") + b"0\r\n\r\n"
    )
    both = await canned_backend(
        nursery,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n" + chunk(b"hello") + b"0\r\n\r\n",
    )
    proxy = await start_proxy(nursery, {})
    async with proxy.client() as client:
        refused = await client.get(f"proxy/{gzip_chunked}/")
        assert refused.status_code == 502
        assert "unsupported transfer coding (gzip, chunked)" in refused.text
        # Both framings at once may be a response-splitting attempt (RFC 9112 §6.3): an error.
        ambiguous = await client.get(f"proxy/{both}/")
        assert ambiguous.status_code == 502
        assert "Content-Length can't be present with Transfer-Encoding" in ambiguous.text


# -- replays ------------------------------------------------------------------------------------


async def test_a_body_less_post_on_a_reused_connection_arrives_once(nursery: trio.Nursery) -> None:
    backend = RecordingBackend(mode="answer-once")
    proxy = await logged_proxy(nursery, backend)
    async with proxy.client() as client:
        assert (await client.get("logged/first")).status_code == 200  # its connection is pooled
        post = await client.post("logged/api/kernels/k/restart")
        assert post.status_code == 502
        assert backend.paths() == ["/first", "/api/kernels/k/restart"]  # once, never again
        assert (await client.get("logged/again")).status_code == 200
        # An idempotent request on a connection that breaks the same way is sent again afresh.
        get = await client.get("logged/read")
        assert get.status_code == 200
        assert backend.paths()[-2:] == ["/read", "/read"]


async def test_a_connection_the_backend_closed_while_idle_is_not_used(nursery: trio.Nursery) -> None:
    backend = RecordingBackend(mode="close-idle", idle_close=0.2)
    proxy = await logged_proxy(nursery, backend)
    async with proxy.client() as client:
        assert (await client.get("logged/one")).status_code == 200
        await trio.sleep(0.5)  # the backend has closed the pooled connection by now
        post = await client.post("logged/two", content=b"once")  # a POST is never retried
        assert post.status_code == 200
    assert backend.paths() == ["/one", "/two"]


# -- restarts -------------------------------------------------------------------------------------


async def pool_up(client: httpx.AsyncClient, path: str, count: int = 6) -> None:
    """Leave ``count`` idle keep-alive connections in trioproxy's pool to the backend."""
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(client.get, path)


async def all_succeed(client: httpx.AsyncClient, path: str, count: int = 8) -> list[int]:
    codes: list[int] = []

    async def one() -> None:
        codes.append((await client.get(path)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return codes


@pytest.mark.parametrize("how", ["SIGKILL", "API restart", "stop and start", "idle cull"])
async def test_no_request_fails_on_a_connection_to_the_old_process(nursery: trio.Nursery, how: str) -> None:
    server: dict[str, Any] = {"command": echo_command()}
    if how == "idle cull":
        server["idle_timeout"] = 1
    proxy = await start_proxy(nursery, {"echo": server})
    supervisor = proxy.supervisors["echo"]
    async with proxy.client(limits=httpx.Limits(max_connections=20)) as client:
        await pool_up(client, "echo/slow?delay=0.2")
        old_client = supervisor.client
        assert old_client is not None and old_client.idle_connections >= 4
        pid = supervisor.pid
        assert pid is not None
        if how == "SIGKILL":
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(10):
                while supervisor.pid in (None, pid) or supervisor.state.value != "ready":
                    await trio.sleep(0.01)
        elif how == "API restart":
            response = await client.post("server-proxy/api/servers/echo/restart")
            assert response.status_code == 200, response.text
        elif how == "stop and start":
            await supervisor.stop()
        else:
            with trio.fail_after(10):
                while supervisor.state.value != "stopped":
                    await trio.sleep(0.05)
        assert old_client.closed and old_client.idle_connections == 0
        assert await all_succeed(client, "echo/after") == [200] * 8
        assert supervisor.pid != pid


HTTP_SERVER = [PY, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]


# Twenty restarts through backoff take 20-30 s here and more on a slow machine: room beyond 120 s.
@pytest.mark.timeout(360)
@pytest.mark.parametrize("command", [echo_command(), HTTP_SERVER], ids=["echo", "http.server"])
async def test_twenty_kills_under_32_keep_alive_clients_fail_no_get(
    nursery: trio.Nursery, command: list[str], tmp_path: Any
) -> None:
    (tmp_path / "page.txt").write_text("hello")
    # Kills in quick succession look like a crash loop: the policy backs off (up to 1 s here)
    # and is told not to give up; requests wait through it all.
    server = {"command": command, "timeout": 30, "cwd": str(tmp_path), "max_failures": 100, "backoff_max": 1}
    proxy = await start_proxy(nursery, {"web": server})
    supervisor = proxy.supervisors["web"]
    await supervisor.ensure_ready()
    failures: list[str] = []
    done = 0
    stop = trio.Event()
    path = "web/page.txt" if command is HTTP_SERVER else "web/x"

    async def load(client: httpx.AsyncClient) -> None:
        nonlocal done
        while not stop.is_set():
            response = await client.get(path)
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:200]}")
            done += 1

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with proxy.client(limits=limits) as client, trio.open_nursery() as clients:
        for _ in range(32):
            clients.start_soon(load, client)
        for _ in range(20):
            before = done
            with trio.fail_after(30):
                while done < before + 40:
                    await trio.sleep(0.005)
            pid = supervisor.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            with trio.fail_after(30):
                while supervisor.pid in (None, pid):
                    await trio.sleep(0.005)
        stop.set()
    assert failures == []
    assert supervisor.restarts == 20


# -- timeouts -------------------------------------------------------------------------------------


async def test_connect_timeout(nursery: trio.Nursery) -> None:
    # A listener whose queue is full and that never accepts: the kernel drops further SYNs,
    # as a host that does not answer would.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    port = silent.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # the handshake completes in the background
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        proxy = await start_proxy(nursery, {}, proxy_client_options=ClientOptions(connect_timeout=0.5))
        async with proxy.client() as client:
            began = trio.current_time()
            response = await client.get(f"proxy/{port}/")
            waited = trio.current_time() - began
        assert response.status_code == 504
        assert "did not accept a connection within 0.5 s (connect_timeout)" in response.text
        assert 0.4 < waited < 3
    finally:
        for filler in fillers:
            filler.close()
        silent.close()


async def test_a_hung_backend_answers_504_naming_the_server_and_the_wait(nursery: trio.Nursery) -> None:
    backend = RecordingBackend(mode="hang")
    proxy = await logged_proxy(nursery, backend, response_timeout=0.5)
    async with proxy.client() as client:
        response = await client.get("logged/slow")
    assert response.status_code == 504
    assert "logged did not answer within 0.5 s (response_timeout)" in response.text
    with trio.fail_after(2):
        while backend.open:
            await trio.sleep(0.02)


async def test_a_server_that_never_gets_ready_is_stopped_after_start_timeout(nursery: trio.Nursery) -> None:
    # Was stopped after 'timeout' (0.5 s): since issue 21 'start_timeout' gives a process up.
    sleeper = [PY, "-c", "import time; time.sleep(60)"]
    proxy = await start_proxy(nursery, {"never": {"command": sleeper, "start_timeout": 0.5, "timeout": 30, "restart": "never"}})
    supervisor = proxy.supervisors["never"]
    async with proxy.client() as client:
        response = await client.get("never/")
    assert response.status_code == 503  # failed at 0.5 s, long before the 30 s timeout
    with trio.fail_after(5):
        while supervisor.state.value != "failed":
            await trio.sleep(0.02)
    assert supervisor.pid is None
    assert "not ready after 0.5 s (start_timeout)" in supervisor.reason and "restart: never" in supervisor.reason


async def test_a_start_that_times_out_counts_as_a_failure_and_is_retried(nursery: trio.Nursery) -> None:
    sleeper = [PY, "-c", "import time; time.sleep(60)"]
    proxy = await start_proxy(nursery, {"slow": {"command": sleeper, "start_timeout": 0.3, "timeout": 30, "max_failures": 2}})
    supervisor = proxy.supervisors["slow"]
    async with proxy.client() as client:
        assert (await client.get("slow/")).status_code == 503
    with trio.fail_after(10):
        while supervisor.state.value != "failed":
            await trio.sleep(0.02)
    assert supervisor.starts == 2
    assert "gave up after 2 failures" in supervisor.reason


async def test_clients_that_give_up_before_the_head_close_their_backend_connections(nursery: trio.Nursery) -> None:
    backend = RecordingBackend(mode="hang")
    proxy = await logged_proxy(nursery, backend)
    port = proxy_port(proxy)

    async def give_up(path: bytes, body: bytes) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /logged/" + path + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        # Gives up once its request is at the backend, waiting for the answer's head.
        with trio.fail_after(30):
            while not any(target.endswith("/" + path.decode()) for target in backend.paths()):
                await trio.sleep(0.01)
        await stream.aclose()

    async with trio.open_nursery() as clients:
        for number in range(50):
            clients.start_soon(give_up, b"%d" % number, b"" if number % 2 else b"some body")
    assert len(backend.requests) == 50
    # Closed within seconds: a leak would hold them for the backend's idle timeout (minutes).
    with trio.fail_after(20):
        while backend.open:
            await trio.sleep(0.01)


async def test_a_client_that_leaves_a_quiet_stream_closes_its_backend_connection(nursery: trio.Nursery) -> None:
    backend = RecordingBackend(mode="stall")
    proxy = await logged_proxy(nursery, backend)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy_port(proxy))
    await stream.send_all(b"GET /logged/events HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
    received = b""
    while b"first" not in received:
        received += await stream.receive_some(65536)
    assert backend.open == 1
    await stream.aclose()
    with trio.fail_after(20):
        while backend.open:
            await trio.sleep(0.02)


# -- the pool -------------------------------------------------------------------------------------


async def test_connections_per_backend_are_capped(nursery: trio.Nursery) -> None:
    backend = RecordingBackend(delay=0.1)
    proxy = await logged_proxy(nursery, backend, max_connections=2)
    async with proxy.client() as client:
        assert await all_succeed(client, "logged/x", count=10) == [200] * 10
    assert backend.most_open == 2


async def test_idle_connections_expire(nursery: trio.Nursery) -> None:
    backend = RecordingBackend()
    proxy = await logged_proxy(nursery, backend, pool_idle_timeout=0.3)
    async with proxy.client() as client:
        assert await all_succeed(client, "logged/x", count=4) == [200] * 4
    assert backend.open >= 1
    with trio.fail_after(3):
        while backend.open:
            await trio.sleep(0.05)


async def test_proxy_targets_are_bounded(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, {})
    dispatcher = proxy.app.extensions["trioproxy"]
    ports = []
    for _ in range(70):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    async with proxy.client() as client:
        for port in ports:
            assert (await client.get(f"proxy/{port}/")).status_code == 502
    assert len(dispatcher.proxy_targets) == dispatcher.proxy_targets.max_targets == 64


# -- forwarded headers ----------------------------------------------------------------------------


@pytest.mark.parametrize("source, trusted", [("127.0.0.1", True), ("127.0.0.2", False)])
async def test_forwarded_headers_are_trusted_only_from_allowed_addresses(
    nursery: trio.Nursery, source: str, trusted: bool
) -> None:
    backend = RecordingBackend()
    proxy = await logged_proxy(nursery, backend)
    head = (
        b"GET /logged/f HTTP/1.1\r\nHost: public.example\r\n" + AUTH + b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.example\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Prefix: /outer\r\n"
        b"Forwarded: for=203.0.113.9\r\nConnection: close\r\n\r\n"
    )
    assert statuses(await raw_request(proxy_port(proxy), head, source=source)) == [200]
    (request,) = backend.requests
    if trusted:
        assert request.header("x-forwarded-proto") == "https"
        assert request.header("x-forwarded-host") == "evil.example"
        assert request.header("x-forwarded-for") == "203.0.113.9, 127.0.0.1"
        assert request.header("x-forwarded-prefix") == "/outer/logged"
        assert request.header("forwarded") == "for=203.0.113.9"
    else:
        assert request.header("x-forwarded-proto") == "http"
        assert request.header("x-forwarded-host") == "public.example"
        assert request.header("x-forwarded-for") == "127.0.0.2"
        assert request.header("x-forwarded-prefix") == "/logged"
        assert request.header("forwarded") is None


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="relies on Linux loopback and listen-queue behaviour")


def test_forwarded_allow_ips_from_the_environment(tmp_path: Any, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "config.py"
    config.write_text(f"c.ServerProxy.servers = {{'echo': {{'command': {echo_command()!r}}}}}\n")
    proxy = launch_trioproxy(
        ["--config", str(config), "--port", "0", "--token", TOKEN], env={"FORWARDED_ALLOW_IPS": "127.0.0.0/8"}
    )
    proxy_processes.append(proxy)
    port = int(proxy.base.split(":")[2].split("/")[0])
    head = (
        b"GET /echo/ HTTP/1.1\r\nHost: h\r\n" + AUTH + b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
    )
    answer = trio.run(raw_request, port, head, 10, "127.0.0.2")
    assert statuses(answer) == [200]
    assert b'["x-forwarded-proto", "https"]' in answer
