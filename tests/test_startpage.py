"""The start page without a browser: which requests get it, its redirects and ``next`` rule, the
page without JavaScript, its event stream, the failure page, and the start-time history.

Real trioproxy, real processes (``tests/backends/slow_start.py``). Until the start no longer
dies at ``timeout`` (issue 21's other half), these servers set ``timeout`` high.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
import trio

from trioproxy.start_history import KEEP, StartHistory
from trioproxy.startpage import continue_target, estimate_text, is_navigation, page_location
from trioproxy.supervisor import State

from .conftest import BACKENDS, PY, TOKEN, start_proxy, wait_for


@contextmanager
def logged(caplog: pytest.LogCaptureFixture, name: str, level: int = logging.DEBUG) -> Iterator[None]:
    """Records of logger ``name`` in ``caplog``, on the logger itself: once the command has
    configured logging in this process (another test), trioproxy's loggers no longer
    propagate to the root, where caplog listens."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(saved)


NAVIGATE = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8", "Sec-Fetch-Mode": "navigate"}


def slow(tmp_path: Path, seconds: float, *, fail: bool = False, **options: Any) -> dict[str, Any]:
    command = [PY, str(BACKENDS / "slow_start.py"), "{port}", str(seconds), str(tmp_path / "pids")]
    return {
        "command": command + (["fail"] if fail else []),
        "timeout": 60,  # until start_timeout lands, timeout still ends a start
        "launcher_entry": {"title": "Slow model"},
        **options,
    }


def pids(tmp_path: Path) -> list[str]:
    path = tmp_path / "pids"
    return path.read_text().split() if path.exists() else []


def scope(method: str = "GET", **headers: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


# -- pure rules --------------------------------------------------------------------------------


def test_only_browser_navigations_get_the_start_page() -> None:
    html = "text/html,*/*"
    browser = "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0"
    # A browser that sends no Sec-Fetch-* headers (plain HTTP to another host): by its agent.
    assert is_navigation(scope(Accept=html, **{"User-Agent": browser}))
    assert not is_navigation(scope(Accept=html, **{"User-Agent": "python-httpx/0.28"}))
    assert not is_navigation(scope(Accept=html))
    assert is_navigation(scope(Accept=html, **{"Sec-Fetch-Mode": "navigate"}))
    assert not is_navigation(scope(Accept=html, **{"Sec-Fetch-Mode": "cors", "User-Agent": browser}))
    for mode in ("cors", "no-cors", "same-origin", "websocket"):
        assert not is_navigation(scope(Accept=html, **{"Sec-Fetch-Mode": mode})), mode
    assert not is_navigation(scope(Accept=html, **{"X-Requested-With": "XMLHttpRequest", "User-Agent": browser}))
    assert not is_navigation(scope(Accept="application/json"))
    assert not is_navigation(scope())
    for method in ("POST", "HEAD", "PUT"):
        assert not is_navigation(scope(method, Accept=html)), method
    assert not is_navigation({**scope(Accept=html), "type": "websocket"})


def test_the_redirect_is_relative_to_the_request_and_keeps_its_path_and_query() -> None:
    location = page_location(b"/lab/slow/some/page", b"x=1&y=a%20b", "/lab/", "slow")
    assert location.startswith("../../server-proxy/start/slow?next=")
    assert parse_qs(urlsplit(location).query)["next"] == ["slow/some/page?x=1&y=a%20b"]
    # Resolved behind another proxy's prefix, it keeps that prefix.
    assert urljoin("http://h/proxy/8888/lab/slow/some/page?x=1", location).startswith(
        "http://h/proxy/8888/lab/server-proxy/start/slow?"
    )
    assert page_location(b"/slow/", b"", "/", "slow").startswith("../server-proxy/start/slow?next=slow%2F")
    assert page_location(b"/page", b"", "/", "root").startswith("./server-proxy/start/root?")
    assert "a%2Fb" in page_location(b"/a%2Fb/", b"", "/", "a/b")


@pytest.mark.parametrize(
    "value",
    [
        "//evil.example/",
        "/slow/",
        "https://evil.example/",
        "\\\\evil.example/",
        "slow/\\..\\..\\x",
        "../evil",
        "slow/../../x",
        "slow/%2e%2e/%2E%2E/x",
        "slow/./x",
        "slow/\tx",
        "slow/ x",
        "slow/x#frag",
        "other/page",
        "server-proxy/api/servers",
        "proxy/8080/",
        "javascript:alert(1)",
        "slow",  # the add-slash redirect, not the server
        "",
    ],
)
def test_next_must_stay_under_the_server(value: str) -> None:
    assert continue_target(value, "slow", "/", {"slow", "other"}, None) is None


def test_next_under_the_server_is_kept_exactly() -> None:
    servers = {"slow", "other"}
    assert continue_target("slow/some/page?x=1&next=//evil", "slow", "/", servers, None) == (
        "../../slow/some/page?x=1&next=//evil"
    )
    assert continue_target("slow/", "slow", "/lab/", servers, None) == "../../slow/"
    # Under a root server, everything that is not trioproxy's own is that server's.
    assert continue_target("", "app", "/", servers, "app") == "../../"
    assert continue_target("some/page", "app", "/", servers, "app") == "../../some/page"
    assert continue_target("server-proxy/launcher", "app", "/", servers, "app") is None


def test_estimate_words() -> None:
    assert estimate_text(None, 0) == "first start: no estimate yet"
    assert estimate_text(11.2, 3) == "usually ready in ~12 s"
    assert estimate_text(0.2, 1) == "ready in ~1 s last time"


# -- start times -------------------------------------------------------------------------------


def test_the_estimate_is_the_median_of_the_last_starts(tmp_path: Path) -> None:
    history = StartHistory(tmp_path / "starts.json")
    assert history.estimate("slow") is None
    for seconds in (8.2, 9.9, 7.6):
        history.record("slow", seconds)
    estimate = history.estimate("slow")
    assert estimate is not None
    assert abs(estimate - statistics.median([8.2, 9.9, 7.6])) <= 0.2 * statistics.median([8.2, 9.9, 7.6])
    for seconds in range(10):
        history.record("slow", 100 + seconds)
    assert history.durations("slow") == [105.0, 106.0, 107.0, 108.0, 109.0][-KEEP:]
    history.record("slow", float("nan"))
    history.record("slow", -1)
    assert len(history.durations("slow")) == KEEP
    # Kept in the file, read by the next trioproxy; another's servers are kept beside.
    other = StartHistory(tmp_path / "starts.json")
    other.record("desktop", 3.0)
    again = StartHistory(tmp_path / "starts.json")
    assert again.estimate("slow") == 107.0
    assert again.durations("desktop") == [3.0]
    assert oct((tmp_path / "starts.json").stat().st_mode & 0o777) in ("0o644", "0o664", "0o600", "0o640")


def test_a_broken_or_unwritable_history_is_only_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with logged(caplog, "trioproxy.start_history", logging.WARNING):
        assert StartHistory(broken).estimate("slow") is None
    assert "ignoring the start times" in caplog.text
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"slow": [1, "x", True, -2, 3.5], "bad": "nope", "empty": []}))
    assert StartHistory(odd).durations("slow") == [1.0, 3.5]
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    history = StartHistory(blocked / "starts.json")
    caplog.clear()
    with logged(caplog, "trioproxy.start_history", logging.WARNING):
        history.record("slow", 2.0)
        history.record("slow", 3.0)
    # Logged once (one record, which may reach caplog twice: on the logger and by propagation).
    assert len({id(r) for r in caplog.records if "cannot write the start times" in r.getMessage()}) == 1
    assert history.estimate("slow") == 2.5  # in memory all the same


async def test_the_supervisor_records_each_start(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"slow": slow(tmp_path, 0.3)})
    supervisor = proxy.supervisors["slow"]
    for _ in range(3):
        await supervisor.start(wait=True)
        await supervisor.stop()
    durations = supervisor.history.durations("slow")
    assert len(durations) == 3
    estimate = supervisor.history.estimate("slow")
    assert estimate is not None and abs(estimate - statistics.median(durations)) <= 0.2 * statistics.median(durations)
    assert min(durations) >= 0.3  # the process printed for that long before it listened
    async with proxy.client() as client:
        info = (await client.get("server-proxy/api/servers/slow")).json()
    assert info["estimate"] == estimate and info["estimate_from"] == 3
    assert info["starting_for"] is None  # stopped
    assert info["last_line"] == "model loaded; listening"


# -- through trioproxy -------------------------------------------------------------------------


async def test_a_navigation_gets_the_start_page_at_once_and_other_requests_wait(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, {"slow": slow(tmp_path, 2)})
    supervisor = proxy.supervisors["slow"]
    async with proxy.client() as client:
        answer = await client.get("slow/some/page?x=1", headers=NAVIGATE)
        assert answer.status_code == 302
        assert supervisor.state is State.STARTING  # answered before it was ready
        assert answer.headers["cache-control"] == "no-store"
        location = answer.headers["location"]
        assert location == "../../server-proxy/start/slow?next=slow%2Fsome%2Fpage%3Fx%3D1"

        async def waits(headers: dict[str, str], method: str = "GET") -> None:
            response = await client.request(method, "slow/some/page?x=1", headers=headers)
            assert response.status_code == 200, (headers, method, response.text)
            assert method == "HEAD" or "/some/page?x=1" in response.text

        # Everything that is not a navigation waits, as before, and is answered by the server.
        async with trio.open_nursery() as waiting:
            waiting.start_soon(waits, {})
            waiting.start_soon(waits, {"Accept": "application/json"})
            waiting.start_soon(waits, {"Accept": "text/html"})  # a script's (not a browser's agent)
            waiting.start_soon(waits, {**NAVIGATE, "Sec-Fetch-Mode": "cors"})
            waiting.start_soon(waits, {**NAVIGATE, "Sec-Fetch-Mode": "no-cors"})
            waiting.start_soon(waits, {"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"})
            waiting.start_soon(waits, NAVIGATE, "POST")
            waiting.start_soon(waits, NAVIGATE, "HEAD")
        # Ready: a navigation goes straight through.
        answer = await client.get("slow/some/page?x=1", headers=NAVIGATE)
        assert answer.status_code == 200 and "/some/page?x=1" in answer.text
    assert len(pids(tmp_path)) == 1


async def test_without_javascript_the_page_refreshes_until_it_continues(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"slow": slow(tmp_path, 2)}, base_url="/lab/")
    async with proxy.client(headers=NAVIGATE) as client:
        url = proxy.url + "slow/some/page?x=1&y=%C3%A9"
        answer = await client.get(url)
        assert answer.status_code == 302
        url = urljoin(url, answer.headers["location"])
        assert url.startswith(proxy.url + "server-proxy/start/slow?next=")
        pages = 0
        with trio.fail_after(30):
            while True:
                page = await client.get(url)
                if page.status_code != 200:
                    break
                pages += 1
                text = page.text
                assert "<title>Slow model · starting</title>" in text
                assert re.search(r"<noscript><meta http-equiv='refresh' content='2'></noscript>", text)
                assert page.headers["content-security-policy"].startswith("default-src 'none'")
                assert "usually ready" not in text and "first start" in text
                await trio.sleep(0.5)  # a browser waits the refresh's 2 s
        assert pages >= 1
        assert page.status_code == 303
        assert page.headers["location"] == "../../slow/some/page?x=1&y=%C3%A9"
        landed = await client.get(urljoin(url, page.headers["location"]))
    assert landed.status_code == 200
    assert "/some/page?x=1&amp;y=%C3%A9" in landed.text
    assert len(pids(tmp_path)) == 1


async def test_the_start_page_of_a_server_at_a_path_of_its_own(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"slow": {**slow(tmp_path, 1), "path": "tools/model"}}, base_url="/lab/")
    async with proxy.client(headers=NAVIGATE) as client:
        url = proxy.url + "tools/model/some/page?x=1"
        answer = await client.get(url)
        assert answer.status_code == 302
        url = urljoin(url, answer.headers["location"])
        assert url.startswith(proxy.url + "server-proxy/start/slow?next=tools%2Fmodel%2Fsome")
        # Its name is no way to it: next must be under its path.
        assert (await client.get("server-proxy/start/slow", params={"next": "slow/x"})).status_code == 400
        with trio.fail_after(30):
            while (page := await client.get(url)).status_code == 200:
                await trio.sleep(0.3)
        assert page.status_code == 303
        assert page.headers["location"] == "../../tools/model/some/page?x=1"
        # Without next, the page goes on to the server's own path.
        plain = await client.get("server-proxy/start/slow")
        assert plain.status_code == 303 and plain.headers["location"] == "../../tools/model/"
        landed = await client.get(urljoin(url, page.headers["location"]))
    assert landed.status_code == 200
    assert len(pids(tmp_path)) == 1


async def test_open_redirects_through_next_are_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"slow": slow(tmp_path, 0.2), "other": slow(tmp_path, 0.2)})
    async with proxy.client(headers=NAVIGATE) as client:
        for value in ("//evil.example/", "https://evil.example/", "/\\evil.example", "other/", "slow/../other/", "%2e%2e/x"):
            page = await client.get("server-proxy/start/slow", params={"next": value})
            assert page.status_code == 400, value
            assert "next must be a path to &#x27;slow&#x27;" in page.text
            assert "location" not in page.headers
        assert pids(tmp_path) == []  # a refused page starts nothing
        missing = await client.get("server-proxy/start/nothing")
        assert missing.status_code == 404
        bare = await client.get("server-proxy/start/slow")  # no next: the server's root
        assert bare.status_code in (200, 303)


async def test_the_start_page_needs_a_login(nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await start_proxy(nursery, {"slow": slow(tmp_path, 0.2)})
    async with httpx.AsyncClient(base_url=proxy.url, headers=NAVIGATE) as client:
        assert (await client.get("slow/page")).headers["location"].startswith("/login?next=")
        assert (await client.get("server-proxy/start/slow?next=slow/")).headers["location"].startswith("/login")
        events = await client.get("server-proxy/api/servers/slow/events", headers={"Accept": "text/event-stream"})
        assert events.status_code == 403
        # A token in the deep link logs in: the redirect carries the cookie.
        answer = await client.get(f"slow/page?token={TOKEN}")
        assert answer.status_code == 302 and "set-cookie" in answer.headers
        page = await client.get(urljoin(proxy.url + "slow/page", answer.headers["location"]))
        assert page.status_code in (200, 303)
    assert proxy.supervisors["slow"].starts <= 1


async def read_events(proxy: Any, path: str, until: Any) -> list[tuple[str, Any]]:
    """The events of ``path`` (under the proxy's URL) until ``until(events)`` or the stream's end.

    Over a plain socket, to read the stream as it comes: each event is one chunk, so its lines
    arrive whole between the chunks' framing lines, which are skipped.
    """
    host, port = proxy.url.split("/")[2].split(":")
    target = urlsplit(proxy.url).path + path
    got: list[tuple[str, Any]] = []
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        head = (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
            f"Authorization: token {TOKEN}\r\n\r\n"
        )
        await stream.send_all(head.encode())
        buffer = b""
        event = ""
        while True:
            data = await stream.receive_some()
            if not data:
                return got
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.rstrip(b"\r").decode()
                if line.startswith("HTTP/1.1 "):
                    assert line.startswith("HTTP/1.1 200"), line
                elif line.lower().startswith("content-type:"):
                    assert "text/event-stream" in line
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    got.append((event, json.loads(line[6:])))
                    if until(got):
                        return got
                elif line == "0":  # the last chunk: the stream ended
                    return got


async def test_the_event_stream_brings_state_and_masked_output(nursery: trio.Nursery, tmp_path: Path) -> None:
    secret = "s3cr3t-value-42"
    command = [PY, "-c", f"import time; [print('step', i, 'key={secret}', flush=True) or time.sleep(0.2) for i in range(8)]; time.sleep(30)"]
    servers = {
        "slow": slow(tmp_path, 1.5),
        "chatty": {"command": command, "timeout": 60, "environment": {"API_KEY": secret}},
    }
    proxy = await start_proxy(nursery, servers)
    async with proxy.client() as client:
        await client.post("server-proxy/api/servers/chatty/start?wait=0")
        events = await read_events(
            proxy,
            "server-proxy/api/servers/chatty/events",
            lambda got: sum(len(d) for e, d in got if e == "output") >= 5,
        )
        kinds = [kind for kind, _ in events]
        assert kinds[0] == "status" and events[0][1]["state"] == "starting"
        assert events[0][1]["starting_for"] is not None and events[0][1]["managed"] is True
        lines = [line for kind, data in events if kind == "output" for line in data]
        assert lines[:2] == ["step 0 key=[secret]", "step 1 key=[secret]"]
        assert not any(secret in line for line in lines)
        assert kinds.count("output") >= 2  # as they came, not all at the end
        # Resumed where a reconnecting EventSource left off.
        again = await read_events(
            proxy,
            "server-proxy/api/servers/chatty/events?since=3",
            lambda got: any(e == "output" for e, _ in got),
        )
        resumed = next(data for kind, data in again if kind == "output")
        assert resumed[0] == "step 3 key=[secret]"
        bad = await client.get("server-proxy/api/servers/chatty/events?since=x")
        assert bad.status_code == 400
        # The stream of a server that becomes ready ends with its ready status.
        await client.post("server-proxy/api/servers/slow/start?wait=0")
        with trio.fail_after(30):
            events = await read_events(proxy, "server-proxy/api/servers/slow/events", lambda got: False)
        assert events[-1][0] == "status" and events[-1][1]["state"] == "ready"
        assert any("loading model" in line for kind, data in events if kind == "output" for line in data)


async def test_a_failed_start_shows_its_reason_and_a_restart(nursery: trio.Nursery, tmp_path: Path) -> None:
    servers = {"broken": slow(tmp_path, 0.3, fail=True, max_failures=1)}
    proxy = await start_proxy(nursery, servers)
    supervisor = proxy.supervisors["broken"]
    async with proxy.client(headers=NAVIGATE) as client:
        answer = await client.get("broken/app?x=1")
        assert answer.status_code == 302
        await supervisor.wait_for_state(State.FAILED)
        page = await client.get(urljoin(proxy.url + "broken/app", answer.headers["location"]))
        assert page.status_code == 503
        text = page.text
        assert "model.bin: checksum mismatch" in text
        assert "exited before it was ready (exit code 3)" in text
        assert '<button type="button" id="restart">Restart</button>' in text  # not hidden
        assert "http-equiv='refresh'" not in text  # a failure does not restart itself
        starts = supervisor.starts
        await client.get(urljoin(proxy.url + "broken/app", answer.headers["location"]))
        assert supervisor.starts == starts
        # The page's button calls the API's restart (its permission rule, its origin check).
        restart = await client.post(
            "server-proxy/api/servers/broken/restart?wait=0", headers={"Origin": "http://evil.example"}
        )
        assert restart.status_code == 403
        restart = await client.post("server-proxy/api/servers/broken/restart?wait=0")
        assert restart.status_code == 202
        await wait_for(lambda: supervisor.starts == starts + 1, timeout=20)


async def test_unmanaged_and_ready_servers_go_straight_through(nursery: trio.Nursery, tmp_path: Path) -> None:
    from .conftest import echo_command, free_port

    port = free_port()
    backend = await trio.lowlevel.open_process([*echo_command()[:2], str(port)])
    try:
        proxy = await start_proxy(nursery, {"outside": {"port": port}})
        async with proxy.client(headers=NAVIGATE) as client:
            with trio.fail_after(20):
                while True:
                    answer = await client.get("outside/page")
                    if answer.status_code != 502:
                        break
                    await trio.sleep(0.1)
            assert answer.status_code == 200  # never a start page: trioproxy does not start it
            page = await client.get("server-proxy/start/outside?next=outside/page")
            assert page.status_code == 303 and page.headers["location"] == "../../outside/page"
    finally:
        backend.kill()
        await backend.wait()



async def test_an_event_stream_whose_client_left_ends(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(nursery, {"slow": slow(tmp_path, 30)})
    host, port = proxy.url.split("/")[2].split(":")
    async with proxy.client() as client:
        await client.post("server-proxy/api/servers/slow/start?wait=0")
    with logged(caplog, "trioproxy.startpage"):
        stream = await trio.open_tcp_stream(host, int(port))
        head = f"GET /server-proxy/api/servers/slow/events HTTP/1.1\r\nHost: x\r\nAuthorization: token {TOKEN}\r\n\r\n"
        await stream.send_all(head.encode())
        received = b""
        with trio.fail_after(10):
            while b"event: status" not in received:
                received += await stream.receive_some()
        await stream.aclose()
        # Hypercorn tells the app nothing, or a disconnect: the stream ends either way, by its
        # own look at the socket (within a tick) or cancelled.
        await wait_for(lambda: "slow: an event stream ended" in caplog.text, timeout=10)
    assert proxy.supervisors["slow"].state is State.STARTING  # the start goes on


async def test_the_start_page_of_a_server_at_the_root(nursery: trio.Nursery, tmp_path: Path) -> None:
    # trioproxy -- <command>: the server owns the base URL's root.
    proxy = await start_proxy(nursery, {"app": slow(tmp_path, 1)}, base_url="/lab/", root_server="app")
    async with proxy.client(headers=NAVIGATE) as client:
        url = proxy.url + "some/page?x=1"
        answer = await client.get(url)
        assert answer.status_code == 302
        assert answer.headers["location"] == "../server-proxy/start/app?next=some%2Fpage%3Fx%3D1"
        page_url = urljoin(url, answer.headers["location"])
        assert page_url.startswith(proxy.url + "server-proxy/start/app?")
        with trio.fail_after(30):
            while (page := await client.get(page_url)).status_code == 200:  # noqa: ASYNC110 (polling a page over HTTP)
                await trio.sleep(0.2)
        assert page.status_code == 303 and page.headers["location"] == "../../some/page?x=1"
        landed = await client.get(urljoin(page_url, page.headers["location"]))
        assert landed.status_code == 200 and "/some/page?x=1" in landed.text
        refused = await client.get(proxy.url + "server-proxy/start/app", params={"next": "server-proxy/api/servers"})
        assert refused.status_code == 400


def test_the_command_keeps_start_times_in_the_runtime_dir(tmp_path: Path, proxy_processes: list[Any]) -> None:
    from trioproxy.start_history import FILE_NAME

    from .conftest import launch_trioproxy

    config = tmp_path / "config.py"
    config.write_text(f"c.ServerProxy.servers = {{'slow': {slow(tmp_path, 0.3)!r}}}\n")
    runtime = tmp_path / "runtime"
    args = ["--port", "0", "--token", TOKEN, "--config", str(config)]
    env = {"JUPYTER_RUNTIME_DIR": str(runtime)}
    auth = {"Authorization": f"token {TOKEN}"}
    first = launch_trioproxy(args, env=env)
    proxy_processes.append(first)
    api = first.base + "server-proxy/api/servers/slow"
    assert httpx.post(api + "/start", headers=auth, timeout=30).status_code == 200
    kept = json.loads((runtime / FILE_NAME).read_text())
    assert len(kept["slow"]) == 1 and kept["slow"][0] >= 0.3
    assert first.stop() == 0
    second = launch_trioproxy(args, env=env)
    proxy_processes.append(second)
    info = httpx.get(second.base + "server-proxy/api/servers/slow", headers=auth, timeout=30).json()
    assert info["state"] == "stopped" and info["estimate"] == kept["slow"][0] and info["estimate_from"] == 1
