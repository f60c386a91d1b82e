"""The remote desktop, as a user gets it: jupyter-remote-desktop-proxy 3.0.1 and TigerVNC, unchanged.

The package registers ``desktop-websockify`` (``vncserver`` on a unix socket, relayed as a raw
socket) and serves its page, ``<base>/desktop/`` (noVNC), from a Jupyter server extension,
which trioproxy runs in an extension host of its own (trioproxy.server_extensions). In Chromium:
the launcher's "Desktop" opens the page, noVNC connects, a keystroke typed into the xterm the
session runs reaches the X server and the framebuffer changes. Under ``--base-url /x/y/`` and
under a JupyterHub stand-in (tests/fakehub.py: the OAuth login, then the same). Then desktop
starts and stops in a row leave no Xtigervnc behind.

The package is installed outside site-packages (.ci/run: ``pip install --no-deps --target
.venv/desktop``), so that only the trioproxy started here sees it; TigerVNC and xterm come from
Debian. The session is ``xterm`` alone (``JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP``): the
package's default xstartup wants xfce4, which is large and shows nothing more to test.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from playwright.sync_api import Page, expect, sync_playwright

import trioproxy
from trioproxy.server_extensions import TOKEN_ENV

from .e2e_helpers import (
    Service,
    clean_env,
    free_port,
    marked_pids,
    new_marker,
    read_until,
    services_cleaned_up,
    start_service,
)
from .fakehub import FakeHub
from .test_hub import PREFIX, hub_environ
from .test_launcher_browser import CHROMIUM, launch

pytestmark = pytest.mark.e2e

DESKTOP = Path(sys.prefix) / "desktop"
INSTALL = (
    f"apt-get install -y --no-install-recommends tigervnc-standalone-server xterm && "
    f"python -m pip install --no-deps --target {DESKTOP} jupyter-remote-desktop-proxy==3.0.1"
)
TOKEN = "desktop-token-0123456789abcdef"
XSTARTUP = "#!/bin/sh\nexec xterm -geometry 80x24+0+0\n"
# A hash of the canvas' pixels, its size, and how many are near-white (xterm's background).
CANVAS_STATE = """() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || !canvas.width) return null;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let hash = 0, white = 0;
  for (let i = 0; i < data.length; i += 4) {
    hash = (Math.imul(hash, 31) + data[i] + data[i + 1] * 7 + data[i + 2] * 13) | 0;
    if (data[i] > 230 && data[i + 1] > 230 && data[i + 2] > 230) white++;
  }
  return {hash, white, width: canvas.width, height: canvas.height};
}"""


def _missing() -> list[str]:
    missing = [f"{program} (Debian)" for program in ("vncserver", "Xtigervnc", "xterm") if shutil.which(program) is None]
    if not (DESKTOP / "jupyter_remote_desktop_proxy").is_dir():
        missing.append(f"jupyter-remote-desktop-proxy in {DESKTOP}")
    if not os.path.exists(CHROMIUM):
        missing.append(f"Chromium at {CHROMIUM}")
    return missing


def _require() -> None:
    """Skip where something was never installed, except in CI (.ci/run installs it all)."""
    missing = _missing()
    if missing:
        message = f"the desktop test needs {', '.join(missing)}; install: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@dataclass
class Desktop:
    url: str  # the launcher's, with its base URL
    service: Service
    marker: str

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"token {TOKEN}"}
        return httpx.request(method, f"{self.url}server-proxy/api/{path}", headers=headers, timeout=90, **kwargs)


def _environment(tmp: Path, marker: str, **extra: str) -> dict[str, str]:
    home = tmp / "home"
    home.mkdir()
    xstartup = tmp / "xstartup"
    xstartup.write_text(XSTARTUP)
    xstartup.chmod(0o755)
    source = Path(trioproxy.__file__).resolve().parent.parent  # this checkout's trioproxy, then the package
    return clean_env(
        marker,
        PYTHONPATH=os.pathsep.join([str(source), str(DESKTOP)]),
        HOME=str(home),
        JUPYTER_CONFIG_DIR=str(tmp / "jupyter-config"),
        JUPYTER_DATA_DIR=str(tmp / "jupyter-data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "jupyter-runtime"),
        JUPYTER_REMOTE_DESKTOP_PROXY_XSTARTUP=str(xstartup),
        **extra,
    )


@pytest.fixture
def desktop(tmp_path: Path) -> Iterator[Desktop]:
    _require()
    marker = new_marker()
    port = free_port()
    with services_cleaned_up(marker) as services:
        service = start_service(
            "trioproxy",
            [sys.executable, "-m", "trioproxy", "--port", str(port), "--token", TOKEN, "--base-url", "/x/y/"],
            _environment(tmp_path, marker), tmp_path, tmp_path,
        )
        services.append(service)
        read_until(service, "trioproxy is serving", timeout=60)
        yield Desktop(f"http://127.0.0.1:{port}/x/y/", service, marker)


def _canvas(page: Page) -> dict[str, int] | None:
    state: dict[str, int] | None = page.evaluate(CANVAS_STATE)
    return state


def _settled(page: Page, timeout: float = 30) -> dict[str, int]:
    """The framebuffer once it shows the xterm and has not changed for a second."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        state = _canvas(page)
        if state and state["white"] > 5_000 and state == previous:
            return state
        previous = state
        page.wait_for_timeout(1_000)
    raise AssertionError(f"the desktop did not show a steady xterm within {timeout} s: {previous}")


def type_into_the_desktop(page: Page) -> None:
    """noVNC connects, the xterm shows, a keystroke changes the framebuffer."""
    expect(page).to_have_title("Jupyter Remote Desktop Proxy")
    expect(page.locator("#status")).to_have_text("Connected", timeout=60_000)
    _settled(page)
    # No window manager: X focus follows the pointer, so the click puts it on the xterm (whose
    # cursor is then drawn filled: the framebuffer is compared from after that).
    page.locator("#screen canvas").click(position={"x": 60, "y": 40})
    before = _settled(page)
    page.keyboard.type("echo typed-through-trioproxy")
    page.keyboard.press("Enter")
    deadline = time.monotonic() + 30
    after = _canvas(page)
    while after is not None and after["hash"] == before["hash"] and time.monotonic() < deadline:
        page.wait_for_timeout(200)
        after = _canvas(page)
    assert after is not None and after["hash"] != before["hash"], f"the framebuffer did not change: {before} {after}"
    assert (after["width"], after["height"]) == (before["width"], before["height"])


def open_desktop_from_the_launcher(url: str, hub_home: str | None = None) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(url)
            expect(page).to_have_title("trioproxy")
            entry = page.locator("li.server[data-server='desktop-websockify']")
            expect(entry.locator(".title")).to_have_text("Desktop")
            with page.context.expect_page() as opened:
                entry.get_by_role("link", name="Open").click()
            type_into_the_desktop(opened.value)
            hub_link = opened.value.get_by_role("link", name="Hub Control Panel")
            if hub_home is None:
                expect(hub_link).to_have_count(0)
            else:
                expect(hub_link).to_have_attribute("href", hub_home)
        finally:
            browser.close()


def host_header(desktop: Desktop) -> dict[str, str]:
    """What trioproxy adds to each request it relays to the extension host (read from its
    process, as another local user could not: /proc/<pid>/environ is the owner's alone)."""
    pid = desktop.api("GET", "servers/desktop").json()["pid"]
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    return {"Authorization": f"token {environ[TOKEN_ENV]}"}


def _xservers(marker: str) -> list[int]:
    return [pid for pid in marked_pids(marker) if _comm(pid) == "Xtigervnc"]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def test_desktop_from_the_launcher_under_a_base_url(desktop: Desktop) -> None:
    expect.set_options(timeout=30_000)
    with trio.fail_after(150):
        await trio.to_thread.run_sync(open_desktop_from_the_launcher, f"{desktop.url}?token={TOKEN}")
    servers = {server["name"]: server for server in desktop.api("GET", "servers").json()["servers"]}
    assert servers["desktop-websockify"]["state"] == "ready"
    assert servers["desktop"]["state"] == "ready"  # the package's page, its extension host
    assert len(_xservers(desktop.marker)) == 1
    assert "extension_host" in desktop.service.log()


def test_desktop_starts_and_stops_leave_no_x_server(desktop: Desktop) -> None:
    for _ in range(3):
        started = desktop.api("POST", "servers/desktop-websockify/start")
        assert started.status_code == 200, started.text
        assert len(_xservers(desktop.marker)) == 1, desktop.service.log()[-3000:]
        assert desktop.api("DELETE", "servers/desktop-websockify").status_code == 200
        assert _xservers(desktop.marker) == [], desktop.service.log()[-3000:]
    # The extension host trusts trioproxy's header only: reached directly, with trioproxy's own
    # token in any form, it refuses.
    host = desktop.api("POST", "servers/desktop/start").json()
    assert host["state"] == "ready", host
    direct = f"http://127.0.0.1:{host['port']}/x/y/desktop/"
    for attempt in ({}, {"params": {"token": TOKEN}}, {"headers": {"Authorization": f"token {TOKEN}"}}):
        refused = httpx.get(direct, timeout=30, **attempt)  # type: ignore[arg-type]
        assert refused.status_code in (302, 403) and "viewer.js" not in refused.text, (attempt, refused.status_code)
    # ... and serves it to trioproxy's header, which trioproxy never shows.
    header = host_header(desktop)
    assert "viewer.js" in httpx.get(direct, timeout=30, headers=header).text
    secret = header["Authorization"].split()[1]
    for shown in (desktop.api("GET", "servers").text, desktop.api("GET", "servers/desktop/logs").text, desktop.service.log()):
        assert secret not in shown
    # The page for a browser that is not logged in: trioproxy's login, not Jupyter's.
    page = httpx.get(f"{desktop.url}desktop/", headers={"Accept": "text/html"}, timeout=30)
    assert page.status_code in (302, 303) and "login" in page.headers["location"]
    # trioproxy killed outright: its orphan guard ends the X server and the extension host too.
    assert desktop.api("POST", "servers/desktop-websockify/start").status_code == 200
    assert len(_xservers(desktop.marker)) == 1
    desktop.service.process.kill()
    deadline = time.monotonic() + 30
    while marked_pids(desktop.marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [_comm(pid) for pid in marked_pids(desktop.marker)] == []


async def test_desktop_under_jupyterhub(nursery: trio.Nursery, tmp_path: Path) -> None:
    _require()
    expect.set_options(timeout=30_000)
    hub = FakeHub()
    await nursery.start(hub.serve)
    port = free_port()
    environ = hub_environ(hub, port)
    hub.redirect_uri = environ["JUPYTERHUB_OAUTH_CALLBACK_URL"]
    marker = new_marker()
    env = _environment(tmp_path, marker, **environ)
    with services_cleaned_up(marker) as services:
        service = start_service("trioproxy", [sys.executable, "-m", "trioproxy"], env, tmp_path, tmp_path)
        services.append(service)
        await trio.to_thread.run_sync(lambda: read_until(service, "trioproxy is serving", timeout=60))
        with trio.fail_after(150):
            # The browser logs in through the Hub's OAuth, lands on the launcher, opens Desktop.
            await trio.to_thread.run_sync(open_desktop_from_the_launcher, f"http://127.0.0.1:{port}{PREFIX}", f"{hub.url}/hub/home")
        assert hub.token_requests, "the browser did not log in through the Hub"
