"""Real convenience packages from PyPI that register ``jupyter_serverproxy_servers``, unchanged.

- hello-jupyter-proxy 0.2: a server on a unix socket (``unix_socket: True``);
- jupyter-panel-proxy 0.2.0: ``panel serve`` from a callable command, ``absolute_url``, and
  Bokeh's WebSocket, which passes its session token as the second subprotocol;
- jupyter-datasette-proxy 1.1: its wheel lacks its module, so its entry point is broken: it is
  reported and skipped while the others work.

They are installed outside site-packages (.ci/run: ``pip install --no-deps --target
.venv/e2e-plugins …``) and reach only the trioproxy started here, through PYTHONPATH: in
site-packages, their entry points would add servers to every trioproxy the other tests start.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

from .e2e_helpers import (
    PLUGINS,
    VENV_BIN,
    Service,
    clean_env,
    free_port,
    new_marker,
    read_until,
    services_cleaned_up,
    start_service,
)

pytestmark = pytest.mark.e2e

TOKEN = "e2e-packages-token-0123456789"
INSTALL = (
    f"python -m pip install --no-deps --target {PLUGINS} "
    "hello-jupyter-proxy==0.2 jupyter-panel-proxy==0.2.0 jupyter-datasette-proxy==1.1"
)
PANEL_APP = """\
import panel as pn

pn.panel("Hello from a Panel app behind trioproxy").servable()
"""


@dataclass
class Proxy:
    url: str
    service: Service

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"token {TOKEN}"}, timeout=60)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    if not (PLUGINS / "panel_server").is_dir():
        message = f"the convenience packages are not installed; run: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("e2e-packages")
    # jupyter-panel-proxy serves the *.py and *.ipynb files of the working directory.
    (tmp / "app.py").write_text(PANEL_APP)
    marker = new_marker()
    port = free_port()
    env = clean_env(marker, PYTHONPATH=str(PLUGINS), JUPYTER_CONFIG_DIR=str(tmp / "jupyter"))
    with services_cleaned_up(marker) as services:
        service = start_service(
            "trioproxy", [str(VENV_BIN / "trioproxy"), "--port", str(port), "--token", TOKEN], env, tmp, tmp
        )
        services.append(service)
        read_until(service, "trioproxy is serving")
        yield Proxy(f"http://127.0.0.1:{port}/", service)


def test_packages_servers_are_listed_and_the_broken_one_reported(proxy: Proxy) -> None:
    with proxy.client() as client:
        info = client.get("server-proxy/servers-info").json()
    entries = {server["name"]: server for server in info["server_processes"]}
    assert set(entries) == {"hello", "panel"}
    assert entries["panel"]["launcher_entry"]["title"] == "Panel Launcher"
    assert entries["panel"]["launcher_entry"]["icon_url"] == "/server-proxy/icon/panel"
    log = proxy.service.log()
    assert (
        "skipping server 'datasette' from entry point 'datasette = jupyter_datasette_proxy:setup_datasette' "
        "of jupyter-datasette-proxy 1.1: ModuleNotFoundError: No module named 'jupyter_datasette_proxy'"
    ) in log
    with proxy.client() as client:
        icon = client.get("server-proxy/icon/panel")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"


def test_hello_on_a_unix_socket(proxy: Proxy) -> None:
    with proxy.client() as client:
        page = client.get("hello/some/path?x=1")
        assert page.status_code == 200, proxy.service.log()[-3000:]
        assert "<h1>Hello Jupyter-server-proxy</h1>" in page.text
        assert "Request path is <code>/some/path?x=1</code>" in page.text
        status = client.get("server-proxy/api/servers/hello").json()
    assert status["state"] == "ready" and status["port"] is None
    assert status["unix_socket"] and Path(status["unix_socket"]).is_socket()
    # The package's server prints the socket it listens on; trioproxy chose it.
    assert f"Unix server at {status['unix_socket']!r}" in proxy.service.log()


async def test_panel_app_and_bokeh_websocket(proxy: Proxy) -> None:
    async with httpx.AsyncClient(base_url=proxy.url, headers={"Authorization": f"token {TOKEN}"}, timeout=90) as client:
        page = await client.get("panel/app")
    assert page.status_code == 200, proxy.service.log()[-3000:]
    # Bokeh's session token, which its client sends back as the WebSocket's second subprotocol.
    session_token = re.search(r'"token":\s*"([^"]+)"', page.text)
    assert session_token, page.text[:2000]
    url = proxy.url.replace("http://", "ws://") + "panel/app/ws"
    headers = [(b"authorization", f"token {TOKEN}".encode())]
    with trio.fail_after(60):
        async with trio_websocket.open_websocket_url(
            url, subprotocols=["bokeh", session_token[1]], extra_headers=headers
        ) as ws:
            assert ws.subprotocol == "bokeh"
            header = json.loads(await ws.get_message())
            assert header["msgtype"] == "ACK"
            await ws.get_message(), await ws.get_message()  # metadata, content
            # Ask for the document: Bokeh's messages are a header, metadata and content.
            await ws.send_message(json.dumps({"msgid": "e2e-1", "msgtype": "PULL-DOC-REQ"}))
            await ws.send_message("{}")
            await ws.send_message("{}")
            reply = json.loads(await ws.get_message())
            await ws.get_message()
            content = await ws.get_message()
    assert reply["msgtype"] == "PULL-DOC-REPLY" and reply["reqid"] == "e2e-1"
    assert "Hello from a Panel app behind trioproxy" in content
