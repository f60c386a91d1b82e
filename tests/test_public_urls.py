"""Servers at a path of their own and apps that know their public URL, with real processes:
a real trioproxy (in this trio run, or as a command) and real backends.

Routing at ``path`` and ``aliases``, over HTTP, both WebSocket paths and raw requests that try
to get around them; absolute_url, mappath, rewrite_response and Location rewriting under a
path; clashes at start-up and reload; the launcher, servers-info and the API; the variables
every child gets, ``{public_prefix}`` and ``GET server-proxy/api/url?port=``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .conftest import (
    BACKENDS,
    PY,
    TOKEN,
    ProxyProcess,
    echo_command,
    free_port,
    launch_trioproxy,
    start_proxy,
    wait_for,
)
from .test_security import get, port_of, raw_request, ws_refusal, ws_url
from .test_websocket import open_ws, ws_echo_command

pytestmark = pytest.mark.timeout(90)

ARGV_ENV = [PY, str(BACKENDS / "argv_env.py"), "{port}"]
VARIABLES = "TRIOPROXY_PUBLIC_PREFIX,TRIOPROXY_PUBLIC_URL,TRIOPROXY_URL,TRIOPROXY_RUNTIME_FILE,MARK"
JSON_ACCEPT = {"Accept": "application/json"}


def echoed_header(echoed: dict[str, Any], name: str) -> str:
    return next(value for key, value in echoed["headers"] if key.lower() == name.lower())


def header_rewrite(response: Any, path: str) -> None:
    response.headers["X-Seen-Path"] = path


SERVERS: dict[str, dict[str, Any]] = {
    "refine": {"command": echo_command(), "path": "tools/refine", "aliases": ["refine", "old/place"]},
    "abs": {"command": echo_command(), "path": "tools/abs", "absolute_url": True},
    "mapped": {"command": echo_command(), "path": "m/x", "mappath": {"/": "/mapped"}},
    "rewritten": {"command": echo_command(), "path": "r/w", "rewrite_response": header_rewrite},
    "ws": {"command": ws_echo_command("{port}"), "path": "live/ws", "aliases": ["ws-old"]},
    "plain": {"command": echo_command()},
}


async def test_a_server_answers_at_its_path_only(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, SERVERS, base_url="/u/")
    async with proxy.client() as client:
        echoed = (await client.get("tools/refine/x/y?q=1")).json()
        assert echoed["target"] == "/x/y?q=1"
        assert echoed_header(echoed, "X-Forwarded-Context") == "/u/tools/refine"
        slash = await client.get("tools/refine")
        assert (slash.status_code, slash.headers["location"]) == (302, "/u/tools/refine/")
        # Its name is no URL of it any more, nor is part of its path.
        assert (await client.get("refine/x")).status_code == 307  # an alias: below
        assert (await client.get("tools/x")).status_code == 404
        assert (await client.get("plain/p")).json()["target"] == "/p"  # servers without a path: as before


async def test_absolute_url_mappath_rewrite_response_and_location_follow_the_path(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, SERVERS, base_url="/u/")
    async with proxy.client() as client:
        assert (await client.get("tools/abs/x?q=1")).json()["target"] == "/u/tools/abs/x?q=1"
        assert (await client.get("m/x/")).json()["target"] == "/mapped"
        assert (await client.get("m/x/other")).json()["target"] == "/other"
        rewritten = await client.get("r/w/some/where")
        assert rewritten.headers["x-seen-path"] == "/some/where"
        moved = await client.get("tools/refine/redirect", params={"to": "/elsewhere"})
        assert (moved.status_code, moved.headers["location"]) == (302, "/u/tools/refine/elsewhere")


async def test_aliases_redirect_with_the_rest_and_the_query(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, SERVERS, base_url="/u/")
    async with proxy.client() as client:
        for method in ("GET", "POST", "PUT"):
            moved = await client.request(method, "old/place/a%20b/c?x=1&y=%2F", content=b"body")
            assert (moved.status_code, moved.headers["location"]) == (307, "/u/tools/refine/a%20b/c?x=1&y=%2F")
        assert (await client.get("refine")).headers["location"] == "/u/tools/refine/"
        followed = await client.post("refine/upload", content=b"12345", follow_redirects=True)
        assert followed.json()["length"] == 5  # 307: the method and the body go along
        # Strangers learn nothing: an alias is refused like any path before it is told.
        async with httpx.AsyncClient(base_url=proxy.url) as anonymous:
            stranger = await anonymous.get("refine/x", headers=JSON_ACCEPT)
        assert stranger.status_code == 403 and "location" not in stranger.headers
    assert proxy.supervisors["refine"].state.value == "ready"


async def test_websockets_reach_a_path_on_both_transports(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, SERVERS)
    async with open_ws(proxy.url, "live/ws/a/info") as ws:  # the first request: the fast path
        info = json.loads(await ws.get_message())
        assert info["path"] == "/a/info"
        await ws.send_message("hi")
        assert await ws.get_message() == "hi"
    # After a request on the same connection, the upgrade goes through Hypercorn.
    port = port_of(proxy.url)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    upgrade = (
        f"GET /live/ws/b/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token {TOKEN}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(get("/plain/").replace(b"Connection: close", b"Connection: keep-alive"))
            received = b""
            while b'"method"' not in received or not received.rstrip().endswith(b"}"):
                received += await stream.receive_some(65536)
            await stream.send_all(upgrade)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    # An alias cannot redirect a WebSocket: refused, with where to go.
    assert await ws_refusal(ws_url(proxy, "ws-old/echo"), [(b"authorization", f"token {TOKEN}".encode())]) == 404


@pytest.mark.parametrize(
    "target, status",
    [
        ("/tools%2Frefine/x", 404),  # one segment, no path
        ("/tools/./refine/x", 404),
        ("/tools//refine/x", 404),
        ("//tools/refine/x", 404),
        ("/Tools/refine/x", 404),
        ("/tools/refine%2F/x", 404),
        ("/%73erver-proxy/api/servers", 200),  # trioproxy's own, as always: not shadowed
    ],
)
async def test_raw_spellings_around_a_path(nursery: trio.Nursery, target: str, status: int) -> None:
    proxy = await start_proxy(nursery, SERVERS)
    response = await raw_request(port_of(proxy.url), get(target, JSON_ACCEPT))
    assert response.status == status, (target, response.body)
    assert proxy.supervisors["refine"].state.value == "stopped"  # nothing reached it


async def test_traversal_below_a_path_stays_with_its_server(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, SERVERS)
    port = port_of(proxy.url)
    response = await raw_request(port, get("/tools/refine/../../server-proxy/api/servers", JSON_ACCEPT))
    assert response.status == 200 and "servers" not in response.json()  # the echo's answer
    assert response.json()["target"] == "/../../server-proxy/api/servers"
    escaped = await raw_request(port, get("/tools/%72efine/a%2Fb", JSON_ACCEPT))  # %72 is "r"
    assert escaped.json()["target"] == "/a%2Fb"


async def test_the_api_launcher_and_servers_info_follow_the_path(nursery: trio.Nursery) -> None:
    proxy = await start_proxy(nursery, SERVERS, base_url="/u/")
    async with proxy.client() as client:
        status = (await client.get("server-proxy/api/servers/refine")).json()
        assert status["url"] == "/u/tools/refine/"
        assert status["aliases"] == ["/u/refine/", "/u/old/place/"]
        assert (await client.get("server-proxy/api/servers/plain")).json()["url"] == "/u/plain/"
        info = {s["name"]: s for s in (await client.get("server-proxy/servers-info")).json()["server_processes"]}
        assert info["refine"]["launcher_entry"]["path_info"] == "tools/refine/"
        page = (await client.get("", headers={"Accept": "text/html"})).text
        assert "href='./tools/refine/'" in page
        assert "href='./refine/'" not in page


# -- clashes, with trioproxy as a command ---------------------------------------------------------


def write(config: Path, servers: dict[str, Any], extra: str = "") -> None:
    config.write_text(f"c.ServerProxy.servers = {servers!r}\n{extra}")


def api(proxy: ProxyProcess) -> httpx.Client:
    return httpx.Client(base_url=proxy.base, headers={"Authorization": f"token {TOKEN}"}, timeout=30)


def wait_until(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_clash_refuses_one_server_not_trioproxy_and_a_reload_mends_it(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    config = tmp_path / "config.py"
    write(config, {"a": {"command": echo_command(), "path": "tools"}, "b": {"command": echo_command(), "path": "tools/b"}})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config)])
    proxy_processes.append(proxy)
    with api(proxy) as client:
        assert client.get("tools/x").json()["target"] == "/x"
        b = client.get("server-proxy/api/servers/b").json()
        assert b["state"] == "failed" and b["url"] is None
        assert "its path 'tools/b' overlaps the path 'tools' of server 'a'" in b["reason"]
        assert client.get("tools/b/x").json()["target"] == "/b/x"  # a's, which b does not shadow
        names = [s["name"] for s in client.get("server-proxy/servers-info").json()["server_processes"]]
        assert names == ["a"]
        assert "data-server='b'" not in client.get("", headers={"Accept": "text/html"}).text
        write(config, {"a": {"command": echo_command(), "path": "tools"}, "b": {"command": echo_command(), "path": "other/b"}})
        reloaded = client.post("server-proxy/api/reload").json()
        assert reloaded["changed"] == ["b"]
        assert client.get("other/b/y").json()["target"] == "/y"
    assert "server 'b' in config file" in proxy.output()
    assert "this server gets no URL, the others are served" in proxy.output()


def test_a_reload_that_would_clash_keeps_the_running_server(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "config.py"
    write(config, {"a": {"command": echo_command(), "path": "one"}, "b": {"command": echo_command(), "path": "two"}})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config)])
    proxy_processes.append(proxy)
    with api(proxy) as client:
        assert client.get("two/").status_code == 200
        write(config, {"a": {"command": echo_command(), "path": "one"}, "b": {"command": echo_command(), "path": "one/b"}})
        reloaded = client.post("server-proxy/api/reload").json()
        assert "overlaps the path 'one' of server 'a'" in reloaded["invalid"]["b"]
        assert "(its running settings are kept)" in reloaded["invalid"]["b"]
        assert client.get("two/z").json()["target"] == "/z"
        # Now a takes b's running path: b's kept settings would clash, so b is refused.
        write(config, {"a": {"command": echo_command(), "path": "two"}, "b": {"command": echo_command(), "path": "two"}})
        reloaded = client.post("server-proxy/api/reload").json()
        assert "kept" not in reloaded["invalid"]["b"]
        assert client.get("two/z").status_code == 200
        wait_until(lambda: client.get("server-proxy/api/servers/b").json()["url"] is None)
        assert client.get("server-proxy/api/servers/a").json()["url"] == "/two/"


def test_strict_config_refuses_a_clash_at_start(tmp_path: Path) -> None:
    config = tmp_path / "config.py"
    write(config, {"a": {"command": echo_command()}, "b": {"command": echo_command(), "aliases": ["a"]}})
    done = _run(["--port", "0", "--token", TOKEN, "--config", str(config), "--strict-config"])
    assert done.returncode != 0
    assert "its alias 'a' is the same as the path 'a' of server 'a'" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def _run(args: list[str], env: dict[str, str] | None = None) -> Any:
    import subprocess

    return subprocess.run(
        [PY, "-m", "trioproxy", *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


# -- what a child knows of its URL --------------------------------------------------------------


def test_children_know_their_public_prefix_and_url(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "config.py"
    header_echo = {"X-Prefix": "{public_prefix}"}
    write(
        config,
        {
            "refine": {
                "command": [*ARGV_ENV, "--prefix={public_prefix}"],
                "path": "tools/refine",
                "environment": {"MARK": "at {public_prefix}"},
            },
            "named": {"command": ARGV_ENV, "environment": {"TRIOPROXY_URL": "mine"}},
            "headers": {"command": echo_command(), "request_headers_override": header_echo},
        },
    )
    proxy = launch_trioproxy(
        ["--port", "0", "--token", TOKEN, "--config", str(config), "--base-url", "/user/alice/",
         "--public-url", "https://hub.example.org/user/alice/"],
        env={"TRIOPROXY_PUBLIC_PREFIX": "/from/a/parent/"},  # a trioproxy started by another one
    )  # fmt: skip
    proxy_processes.append(proxy)
    with api(proxy) as client:
        seen = client.get("tools/refine/", params={"names": VARIABLES}).json()
        assert seen["argv"] == ["--prefix=/user/alice/tools/refine/"]
        assert seen["env"]["TRIOPROXY_PUBLIC_PREFIX"] == "/user/alice/tools/refine/"
        assert seen["env"]["TRIOPROXY_PUBLIC_URL"] == "https://hub.example.org/user/alice/tools/refine/"
        assert seen["env"]["TRIOPROXY_URL"] == "https://hub.example.org/user/alice/"
        assert seen["env"]["MARK"] == "at /user/alice/tools/refine/"
        runtime = Path(seen["env"]["TRIOPROXY_RUNTIME_FILE"])
        assert runtime.name == f"trioproxy-{proxy.process.pid}.json"
        assert json.loads(runtime.read_text())["token"] == TOKEN
        named = client.get("named/", params={"names": VARIABLES}).json()["env"]
        assert named["TRIOPROXY_PUBLIC_PREFIX"] == "/user/alice/named/"
        assert named["TRIOPROXY_URL"] == "mine"  # the server's own environment wins
        assert echoed_header(client.get("headers/").json(), "X-Prefix") == "/user/alice/headers/"


def test_without_a_public_url_the_urls_are_paths(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "config.py"
    write(config, {"refine": {"command": ARGV_ENV, "path": "tools/refine"}})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config), "--base-url", "/b/"])
    proxy_processes.append(proxy)
    with api(proxy) as client:
        env = client.get("tools/refine/", params={"names": VARIABLES}).json()["env"]
    assert (env["TRIOPROXY_PUBLIC_PREFIX"], env["TRIOPROXY_PUBLIC_URL"], env["TRIOPROXY_URL"]) == (
        "/b/tools/refine/", "/b/tools/refine/", "/b/"
    )


def test_a_standalone_servers_prefix_is_the_base_url(proxy_processes: list[ProxyProcess]) -> None:
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--base-url", "/s/", "--", *ARGV_ENV])
    proxy_processes.append(proxy)
    with api(proxy) as client:
        env = client.get("", params={"names": VARIABLES}).json()["env"]
    assert env["TRIOPROXY_PUBLIC_PREFIX"] == "/s/"


@pytest.mark.parametrize("url", ["example.org", "ftp://example.org/", "https://", "https://a@example.org/", "https://e.org/?x=1"])
def test_a_bad_public_url_is_a_config_error(url: str) -> None:
    done = _run(["--port", "0", "--token", TOKEN, "--public-url", url])
    assert done.returncode != 0
    assert "option 'public_url'" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_template_that_names_no_variable_is_refused_at_load() -> None:
    from trioproxy.config import ServerOptionError, make_server_process

    assert make_server_process("x", {"command": ["a", "{public_prefix}"]}).command == ["a", "{public_prefix}"]
    with pytest.raises(ServerOptionError, match=r"known: \{base_url\}, \{port\}, \{public_prefix\}, \{unix_socket\}"):
        make_server_process("x", {"command": ["a", "{public_url}"]})


# -- the port API --------------------------------------------------------------------------------


async def test_a_port_maps_to_its_public_url(nursery: trio.Nursery) -> None:
    fixed = free_port()
    servers = {
        "dash": {"command": ARGV_ENV, "port": fixed, "path": "apps/dash"},
        "chosen": {"command": echo_command()},
    }
    proxy = await start_proxy(nursery, servers, base_url="/user/alice/")
    async with proxy.client() as client:
        answer = (await client.get("server-proxy/api/url", params={"port": fixed})).json()
        assert answer == {"port": fixed, "server": "dash", "url": "/user/alice/apps/dash/", "public_url": "/user/alice/apps/dash/"}
        assert (await client.get("chosen/")).status_code == 200
        port = proxy.supervisors["chosen"].port
        assert (await client.get("server-proxy/api/url", params={"port": port})).json()["server"] == "chosen"
        other = free_port()
        answer = (await client.get("server-proxy/api/url", params={"port": other})).json()
        assert answer == {"port": other, "server": None, "url": f"/user/alice/proxy/{other}/", "public_url": f"/user/alice/proxy/{other}/"}
        for bad in ("", "abc", "0", "65536", "-1", "8050.0", "\uff18"):
            refused = await client.get("server-proxy/api/url", params={"port": bad})
            assert refused.status_code == 400, bad
            assert "port must be a number from 1 to 65535" in refused.json()["message"]
        assert (await client.get("server-proxy/api/url")).status_code == 400
    async with httpx.AsyncClient(base_url=proxy.url) as anonymous:
        stranger = await anonymous.get("server-proxy/api/url", params={"port": fixed}, headers=JSON_ACCEPT)
    assert stranger.status_code == 403


async def test_without_proxy_to_localhost_only_servers_ports_map(nursery: trio.Nursery) -> None:
    fixed = free_port()
    proxy = await start_proxy(nursery, {"dash": {"command": ARGV_ENV, "port": fixed}}, host_allowlist=["127.0.0.1"])
    async with proxy.client() as client:
        assert (await client.get("server-proxy/api/url", params={"port": fixed})).json()["url"] == "/dash/"
        refused = await client.get("server-proxy/api/url", params={"port": free_port()})
        assert refused.status_code == 404
        assert "host_allowlist" in refused.json()["message"]


def test_a_child_asks_where_its_port_is(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "config.py"
    write(config, {"kernel": {"command": [PY, str(BACKENDS / "asks_url.py"), "{port}"], "path": "k/1"}})
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--config", str(config), "--base-url", "/b/"])
    proxy_processes.append(proxy)
    with api(proxy) as client:
        seen = client.get("k/1/").json()
    assert (seen["answer"]["server"], seen["answer"]["url"], seen["prefix"]) == ("kernel", "/b/k/1/", "/b/k/1/")


def test_under_jupyterhub_the_hubs_public_url_is_trioproxys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trioproxy.cli import build

    from .fakehub import FakeHub
    from .test_hub import configured_app, hub_environ, use_environ

    environ = hub_environ(FakeHub(url="http://127.0.0.1:9"), 4567)
    use_environ(monkeypatch, {**environ, "JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/user/alice/"})
    _, supervisors, _ = build(configured_app(tmp_path))
    assert supervisors.public_url == "https://hub.example.org/user/alice/"
    _, supervisors, _ = build(configured_app(tmp_path, ["--public-url", "https://mine.example.org/a/"]))
    assert supervisors.public_url == "https://mine.example.org/a/"  # the option wins
    use_environ(monkeypatch, environ)
    _, supervisors, _ = build(configured_app(tmp_path))
    assert supervisors.public_url == ""  # unknown: the variables hold paths


async def test_a_server_with_a_bad_option_answers_503_at_its_path(nursery: trio.Nursery) -> None:
    from trioproxy.config import load_server
    from trioproxy.supervisor import Supervisors

    servers = {
        "slow": load_server("slow", {"command": echo_command(), "path": "tools/slow", "aliases": ["old"], "timeout": -1}),
        "badpath": load_server("badpath", {"command": echo_command(), "path": "a//b", "timeout": -1}),
    }
    assert servers["slow"].path == "tools/slow" and servers["badpath"].path == ""
    proxy = await start_proxy(nursery)
    async with proxy.client() as client:
        supervisors: Supervisors = proxy.supervisors
        for process in servers.values():
            await supervisors.add(process)
        answer = await client.get("tools/slow/", headers=JSON_ACCEPT)
        assert answer.status_code == 503 and "option 'timeout'" in answer.json()["message"]
        assert (await client.get("old/x")).headers["location"] == "/tools/slow/x"
        assert (await client.get("badpath/", headers=JSON_ACCEPT)).status_code == 503  # at its name


async def test_a_crashed_supervisors_stand_in_keeps_the_path(nursery: trio.Nursery) -> None:
    from trioproxy.health import HealthCheck

    proxy = await start_proxy(nursery, {"web": {"command": echo_command(), "path": "tools/web", "aliases": ["w"]}})
    crashing = proxy.supervisors["web"]
    # As in test_reload_boundary: a check httpx cannot build a URL for makes the supervisor raise.
    crashing.health_check = HealthCheck(path="/\x00", interval=0.05)
    async with proxy.client() as client:
        assert (await client.get("tools/web/")).status_code == 200
        await wait_for(lambda: proxy.supervisors["web"] is not crashing, timeout=20)
        response = await client.get("tools/web/", headers=JSON_ACCEPT)
        assert response.status_code == 503 and "supervisor failed" in response.json()["message"]
        assert (await client.get("w/")).headers["location"] == "/tools/web/"
        assert (await client.get("web/", headers=JSON_ACCEPT)).status_code == 404


def environment_of(public_prefix: str) -> dict[str, str]:
    return {"MARK": "callable " + public_prefix}


async def test_callables_may_ask_for_the_public_prefix(nursery: trio.Nursery) -> None:
    servers = {"env": {"command": ARGV_ENV, "path": "e/v", "environment": environment_of}}
    proxy = await start_proxy(nursery, servers, base_url="/u/")
    async with proxy.client() as client:
        env = (await client.get("e/v/", params={"names": VARIABLES})).json()["env"]
    assert env["MARK"] == "callable /u/e/v/"
    assert (env["TRIOPROXY_PUBLIC_PREFIX"], env["TRIOPROXY_URL"]) == ("/u/e/v/", "/u/")
