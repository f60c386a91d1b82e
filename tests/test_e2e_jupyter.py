"""trioproxy behind a real Jupyter Server with jupyter-server-proxy: both set-ups of README's
"Behind Jupyter Server".

One Jupyter Server (base URL /user/e2e/, as under a Hub) serves both:

- standalone: trioproxy started on its own port with Jupyter's token, reached as
  ``<jupyter>/proxy/<port>/``;
- named: trioproxy as jupyter-server-proxy's server "trioproxy", started on demand as
  ``jupyter trioproxy --port={port} --no-auth --config …``, reached as ``<jupyter>/trioproxy/``.

Behind both hops: the launcher's links, redirects, HTTP and WebSockets to servers behind trioproxy.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
import trio
import trio_websocket

from .conftest import BACKENDS, echo_command
from .e2e_helpers import (
    VENV_BIN,
    Service,
    answers,
    clean_env,
    free_port,
    new_marker,
    read_until,
    services_cleaned_up,
    start_service,
    wait_until,
)

pytestmark = pytest.mark.e2e

JUPYTER_BASE = "/user/e2e/"
SETUPS = ["standalone", "named"]
ICON = b"<svg xmlns='http://www.w3.org/2000/svg' width='8' height='8'/>"


@dataclass
class Stack:
    jupyter: str  # http://127.0.0.1:<port>, no trailing slash
    token: str
    standalone_port: int
    services: list[Service]
    tmp: Path

    def prefix(self, setup: str) -> str:
        """Where the browser sees trioproxy's root."""
        if setup == "standalone":
            return f"{JUPYTER_BASE}proxy/{self.standalone_port}/"
        return f"{JUPYTER_BASE}trioproxy/"

    def client(self) -> httpx.Client:
        """Authenticated with Jupyter's token (it is trioproxy's too in the standalone set-up)."""
        return httpx.Client(base_url=self.jupyter, headers={"Authorization": f"token {self.token}"}, timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- {service.name}:\n{service.log()[-3000:]}" for service in self.services)


def write_configs(tmp: Path) -> tuple[Path, Path]:
    """trioproxy's servers, and Jupyter's config registering trioproxy as a named server."""
    (tmp / "echo.svg").write_bytes(ICON)
    servers = {
        "echo": {
            "command": [sys.executable, str(BACKENDS / "echo.py"), "{port}"],
            "launcher_entry": {"title": "Echo", "icon_path": str(tmp / "echo.svg")},
        },
        "ws": {"command": [sys.executable, str(BACKENDS / "ws_echo.py"), "{port}"]},
        # Ready after 3 s, under the default timeout (5 s): the start page's case.
        "slow": {
            "command": [sys.executable, str(BACKENDS / "slow_start.py"), "{port}", "3", str(tmp / "slow-pids")],
            "launcher_entry": {"enabled": False},
        },
    }
    proxy_config = tmp / "trioproxy_config.py"
    proxy_config.write_text(f"c.ServerProxy.servers = {servers!r}\n")
    jupyter_config = tmp / "jupyter_config.py"
    # README "Behind Jupyter Server", set-up 2, with an explicit --config for trioproxy.
    jupyter_config.write_text(
        "c.ServerProxy.servers = {\n"
        "    'trioproxy': {\n"
        f"        'command': ['jupyter', 'trioproxy', '--port={{port}}', '--no-auth', '--config', {str(proxy_config)!r}],\n"
        "        'timeout': 60,\n"
        "        'launcher_entry': {'title': 'trioproxy'},\n"
        "    },\n"
        "}\n"
        # Not needed here, and slow to import.
        "c.ServerApp.jpserver_extensions = {'panel.io.jupyter_server_extension': False}\n"
    )
    return proxy_config, jupyter_config


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e-jupyter")
    marker = new_marker()
    token = secrets.token_hex(16)
    proxy_config, jupyter_config = write_configs(tmp)
    for name in ("config", "data", "runtime", "root"):
        (tmp / name).mkdir()
    env = clean_env(
        marker,
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
    )
    jupyter_port, standalone_port = free_port(), free_port()
    with services_cleaned_up(marker) as services:
        services.append(
            start_service(
                "trioproxy",
                # README set-up 1: on loopback, with the same token as Jupyter.
                [str(VENV_BIN / "trioproxy"), "--port", str(standalone_port), "--token", token, "--config", str(proxy_config)],
                env, tmp, tmp,
            )
        )
        services.append(
            start_service(
                "jupyter",
                [
                    str(VENV_BIN / "jupyter"), "server", "--allow-root",
                    f"--ServerApp.token={token}", "--ServerApp.open_browser=False",
                    f"--ServerApp.root_dir={tmp / 'root'}", "--ServerApp.ip=127.0.0.1",
                    f"--ServerApp.port={jupyter_port}", "--ServerApp.port_retries=0",
                    f"--ServerApp.base_url={JUPYTER_BASE}", f"--config={jupyter_config}",
                ],
                env, tmp, tmp,
            )
        )
        jupyter = f"http://127.0.0.1:{jupyter_port}"
        wait_until(answers(f"{jupyter}{JUPYTER_BASE}api"), timeout=60, what="Jupyter Server", services=tuple(services))
        wait_until(answers(f"http://127.0.0.1:{standalone_port}/login"), timeout=30, what="trioproxy", services=tuple(services))
        yield Stack(jupyter, token, standalone_port, services, tmp)


def test_jupyter_serves_both_setups(stack: Stack) -> None:
    # jupyter-server-proxy's own view: trioproxy is one of its servers.
    with stack.client() as client:
        info = client.get(f"{JUPYTER_BASE}server-proxy/servers-info")
    assert info.status_code == 200, stack.logs()
    assert [server["name"] for server in info.json()["server_processes"]] == ["trioproxy"]


class Links(HTMLParser):
    """Every href, src and form action of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src", "action") and value is not None:
                self.urls.append(value)


def links_of(page: str) -> list[str]:
    parser = Links()
    parser.feed(page)
    return parser.urls


@pytest.mark.parametrize("setup", SETUPS)
def test_launcher_links_stay_under_the_prefix(stack: Stack, setup: str) -> None:
    prefix = stack.prefix(setup)
    with stack.client() as client:
        page = client.get(prefix, headers={"Accept": "text/html"})
        assert page.status_code == 200, stack.logs()
        assert "data-server='echo'" in page.text and "data-server='ws'" in page.text
        urls = [urljoin(str(page.url), url) for url in links_of(page.text)]
        assert urls, page.text
        for url in urls:
            assert urlsplit(url).path.startswith(prefix), (url, page.text)
        assert f"{stack.jupyter}{prefix}echo/" in urls
        # Every link answers, through Jupyter and trioproxy (ws/ speaks only WebSocket: 400 to GET).
        for url in set(urls):
            expected = 400 if url.endswith(f"{prefix}ws/") else 200
            assert client.get(url).status_code == expected, url
        # Absolute URLs trioproxy builds carry the prefix Jupyter sends (X-Forwarded-Prefix).
        info = client.get(f"{prefix}server-proxy/servers-info").json()
        entries = {server["name"]: server["launcher_entry"] for server in info["server_processes"]}
        assert entries["echo"]["icon_url"] == f"{prefix}server-proxy/icon/echo"
        icon = client.get(entries["echo"]["icon_url"])
        assert icon.status_code == 200 and icon.content == ICON
        servers = client.get(f"{prefix}server-proxy/api/servers").json()["servers"]
        assert {server["name"]: server["url"] for server in servers} == {
            "echo": f"{prefix}echo/",
            "ws": f"{prefix}ws/",
            "slow": f"{prefix}slow/",
        }


@pytest.mark.parametrize("setup", SETUPS)
def test_redirects_stay_under_the_prefix(stack: Stack, setup: str) -> None:
    prefix = stack.prefix(setup)
    with stack.client() as client:
        # trioproxy's own: <name> -> <name>/, keeping the query.
        slash = client.get(f"{prefix}echo?x=1")
        assert slash.status_code == 302 and slash.headers["location"] == f"{prefix}echo/?x=1", stack.logs()
        # A backend's redirect to an absolute path: trioproxy keeps it under /echo, Jupyter under its prefix.
        backend = client.get(f"{prefix}echo/redirect", params={"to": "/elsewhere/page?q=1"})
        assert backend.status_code == 302 and backend.headers["location"] == f"{prefix}echo/elsewhere/page?q=1"
        # Followed, both land on the backend.
        landed = client.get(f"{prefix}echo?x=1", follow_redirects=True)
        assert landed.status_code == 200 and landed.json()["target"] == "/?x=1"
        landed = client.get(f"{prefix}echo/redirect", params={"to": "/target?q=2"}, follow_redirects=True)
        assert landed.url.path == f"{prefix}echo/target" and landed.json()["target"] == "/target?q=2"


@pytest.mark.parametrize("setup", SETUPS)
def test_a_browser_opening_a_slow_server_gets_the_start_page_and_lands_where_it_asked(stack: Stack, setup: str) -> None:
    # As a browser without JavaScript meets it (the Chromium tests drive the script behind an
    # outer trioproxy): the relative redirects stay under Jupyter's prefix at every step.
    prefix = stack.prefix(setup)
    pids = stack.tmp / "slow-pids"
    before = pids.read_text().split() if pids.exists() else []
    navigate = {"Accept": "text/html,*/*;q=0.8", "Sec-Fetch-Mode": "navigate", "User-Agent": "Mozilla/5.0"}
    with stack.client() as client:
        url = f"{stack.jupyter}{prefix}slow/deep/page?x=1"
        first = client.get(url, headers=navigate)
        assert first.status_code == 302, stack.logs()
        page_url = urljoin(url, first.headers["location"])
        assert page_url.startswith(f"{stack.jupyter}{prefix}server-proxy/start/slow?next="), page_url
        deadline = time.monotonic() + 60
        while (page := client.get(page_url, headers=navigate)).status_code == 200:
            assert "Slow" in page.text or "slow" in page.text
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.5)  # a browser waits the page's refresh
        assert page.status_code == 303, page.text
        landed = client.get(urljoin(page_url, page.headers["location"]), headers=navigate)
    assert landed.status_code == 200 and landed.url.path == f"{prefix}slow/deep/page", stack.logs()
    assert "/deep/page?x=1" in landed.text
    after = pids.read_text().split()
    assert len(after) == len(before) + 1  # started once


@pytest.mark.parametrize("setup", SETUPS)
def test_http_through_both_hops(stack: Stack, setup: str) -> None:
    prefix = stack.prefix(setup)
    body = secrets.token_bytes(3 * 1024 * 1024)
    with stack.client() as client:
        echo = client.get(f"{prefix}echo/some/path", params={"a": "1"})
        assert echo.status_code == 200, stack.logs()
        assert echo.json()["method"] == "GET" and echo.json()["target"] == "/some/path?a=1"
        upload = client.post(f"{prefix}echo/upload", content=body)
        assert upload.status_code == 200
        assert upload.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        download = client.get(f"{prefix}echo/bytes", params={"size": str(len(body)), "chunked": "1"})
        assert download.status_code == 200 and len(download.content) == len(body)
        missing = client.get(f"{prefix}echo/status/404")
        assert missing.status_code == 404


@pytest.mark.parametrize("setup", SETUPS)
async def test_websocket_through_both_hops(stack: Stack, setup: str) -> None:
    url = f"ws://127.0.0.1:{urlsplit(stack.jupyter).port}{stack.prefix(setup)}ws/info?choose=0"
    headers = [(b"authorization", f"token {stack.token}".encode()), (b"origin", stack.jupyter.encode())]
    with trio.fail_after(30):
        async with trio_websocket.open_websocket_url(
            url, subprotocols=["bokeh", "credential-0123"], extra_headers=headers
        ) as ws:
            # Both subprotocols reach the backend (Bokeh passes a credential as the second one).
            assert ws.subprotocol == "bokeh"
            info = json.loads(await ws.get_message())
            assert info["subprotocols"] == ["bokeh", "credential-0123"]
            assert info["path"] == "/info?choose=0"
            await ws.send_message("text through two proxies")
            assert await ws.get_message() == "text through two proxies"
            await ws.send_message(b"\x00\xffbinary")
            assert await ws.get_message() == b"\x00\xffbinary"
            big = secrets.token_bytes(512 * 1024)
            await ws.send_message(big)
            assert await ws.get_message() == big


@pytest.mark.parametrize("setup", SETUPS)
def test_jupyter_guards_both_setups(stack: Stack, setup: str) -> None:
    prefix = stack.prefix(setup)
    # Nobody without Jupyter's token gets through Jupyter: it sends them to its login page.
    anonymous = httpx.get(f"{stack.jupyter}{prefix}echo/x", timeout=30)
    assert anonymous.status_code == 302 and anonymous.headers["location"].startswith(f"{JUPYTER_BASE}login?")
    api = httpx.post(f"{stack.jupyter}{prefix}echo/x", timeout=30)
    assert api.status_code == 403
    with httpx.Client(base_url=stack.jupyter, timeout=30, headers={"Accept": "text/html"}) as browser:
        # A browser logged in to Jupyter only (its cookie, not trioproxy's).
        assert browser.get(f"{JUPYTER_BASE}api/status", params={"token": stack.token}).status_code == 200
        assert not any(cookie.name.startswith("trioproxy") for cookie in browser.cookies.jar)
        page = browser.get(f"{prefix}echo/x")
        if setup == "named":
            # --no-auth on loopback: Jupyter's login is the only one.
            assert page.status_code == 200 and page.json()["target"] == "/x"
            return
        # Standalone, trioproxy asks for its token too, on its login page under the prefix.
        assert page.status_code == 302 and page.headers["location"] == f"{prefix}login?next=/echo/x"
        login = browser.get(page.headers["location"])
        assert login.status_code == 200
        action = [url for url in links_of(login.text) if url.endswith("login")]
        assert action == [f"{prefix}login"]
        wrong = browser.post(action[0], data={"token": "wrong", "next": "/echo/x"})
        assert wrong.status_code == 403
        logged_in = browser.post(action[0], data={"token": stack.token, "next": "/echo/x"})
        assert logged_in.status_code == 302 and logged_in.headers["location"] == f"{prefix}echo/x"
        assert browser.get(logged_in.headers["location"]).json()["target"] == "/x"


# -- `jupyter trioproxy` and the Jupyter config path ---------------------------------------------


def test_jupyter_trioproxy_is_a_jupyter_subcommand(tmp_path: Path) -> None:
    env = clean_env(new_marker(), JUPYTER_CONFIG_DIR=str(tmp_path))
    result = subprocess.run(
        [str(VENV_BIN / "jupyter"), "trioproxy", "--help"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Start web services on demand" in result.stdout and "--config" in result.stdout
    # `jupyter help` finds it among the subcommands too.
    listed = subprocess.run(
        [str(VENV_BIN / "jupyter"), "--help"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert "trioproxy" in listed.stdout


def start_jupyter_trioproxy(name: str, args: list[str], env: dict[str, str], tmp: Path) -> tuple[Service, str]:
    port = free_port()
    service = start_service(name, [str(VENV_BIN / "jupyter"), "trioproxy", "--port", str(port), *args], env, tmp, tmp)
    read_until(service, "trioproxy is serving")
    return service, f"http://127.0.0.1:{port}/"


def test_reads_jupyter_server_config_from_the_jupyter_config_path(tmp_path: Path) -> None:
    config_dir = tmp_path / "jupyter-config"
    config_dir.mkdir()
    jupyter_config = config_dir / "jupyter_server_config.py"
    # A user's existing Jupyter config: Jupyter's own settings beside jupyter-server-proxy's.
    jupyter_config.write_text(
        "c.ServerApp.open_browser = False\n"
        f"c.ServerProxy.servers = {{'from-jupyter': {{'command': {echo_command()!r}}}}}\n"
    )
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"ServerProxy": {"servers": {"other": {"command": echo_command()}}}}))
    marker = new_marker()
    env = clean_env(marker, JUPYTER_CONFIG_DIR=str(config_dir))
    auth = {"Authorization": "token t"}
    with services_cleaned_up(marker) as services:
        # No --config: the file on the Jupyter config path is read, and the log says which.
        found, url = start_jupyter_trioproxy("found", ["--token", "t"], env, tmp_path)
        services.append(found)
        assert f"loaded config from {jupyter_config} (Jupyter config path)" in found.log()
        reply = httpx.get(url + "from-jupyter/x", headers=auth, timeout=30)
        assert reply.status_code == 200 and reply.json()["target"] == "/x"
        found.stop()
        # --config: only that file.
        explicit, url = start_jupyter_trioproxy("explicit", ["--token", "t", "--config", str(other)], env, tmp_path)
        services.append(explicit)
        assert "Jupyter config path" not in explicit.log()
        assert httpx.get(url + "from-jupyter/x", headers=auth, timeout=30).status_code == 404
        assert httpx.get(url + "other/x", headers=auth, timeout=30).status_code == 200
        explicit.stop()
        # A broken file is reported and skipped, as Jupyter does: trioproxy still starts.
        jupyter_config.write_text("raise RuntimeError('broken user config')\n")
        broken, url = start_jupyter_trioproxy("broken", ["--token", "t"], env, tmp_path)
        services.append(broken)
        assert "skipped a file on the Jupyter config path" in broken.log()
        assert "RuntimeError: broken user config" in broken.log()
        assert httpx.get(url + "server-proxy/api/servers", headers=auth, timeout=30).status_code == 200
