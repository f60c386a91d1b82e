"""The launcher page in a real headless Chromium (Debian's, driven by Playwright).

A person's path through it: open the page with the token, start a server by clicking, see it
turn ready, open it, stop it, see why a broken one failed; and the same page reached through
another proxy's prefix. Playwright's synchronous API runs in a worker thread while trioproxy
serves in the test's own trio run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from playwright.sync_api import Page, expect, sync_playwright

from trioproxy.supervisor import State

from .conftest import PY, TOKEN, echo_command, panel_server, start_proxy

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Set to a path to keep the screenshot (docs/launcher.png is made this way).
SCREENSHOT_ENV = "TRIOPROXY_LAUNCHER_SCREENSHOT"
FORM_SCREENSHOT_ENV = "TRIOPROXY_LAUNCHER_FORM_SCREENSHOT"  # the same for a template's form

# Skipped on a machine without Chromium, never in CI (CI=true), where .ci/run installs it.
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason=f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium), as .ci/run does",
)

ICON = (
    "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 32 32'><rect width='32' height='32' rx='6' "
    "fill='#e8590c'/><path d='M9 16h14M16 9v14' stroke='#fff' stroke-width='4' stroke-linecap='round'/></svg>"
)
BROKEN = [PY, "-c", "import sys; print('loading settings.toml', flush=True); sys.exit('settings.toml: no such file')"]


def launcher_servers(tmp_path: Path) -> dict[str, dict[str, Any]]:
    (tmp_path / "echo.svg").write_text(ICON)
    return {
        "echo": {
            "command": echo_command(),
            "timeout": 20,
            "launcher_entry": {"title": "Echo service", "icon_path": str(tmp_path / "echo.svg")},
        },
        "files": {
            "command": [PY, "-m", "http.server", "--bind", "127.0.0.1", "{port}"],
            "cwd": str(tmp_path),
            "autostart": True,
            "launcher_entry": {"title": "Files", "category": "Tools"},
        },
        "broken": {
            "command": BROKEN,
            "max_failures": 1,
            "launcher_entry": {"title": "Broken app", "category": "Tools"},
        },
        "hidden": {"command": echo_command(), "launcher_entry": {"enabled": False}},
    }


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def start_open_stop(page: Page) -> None:
    """Start Echo by clicking, see it ready, open it in its new tab, stop it."""
    echo = page.locator("li.server[data-server='echo']")
    expect(echo.locator(".state")).to_have_text("stopped")
    expect(echo.get_by_role("button", name="Stop", exact=True)).to_be_disabled()
    echo.get_by_role("button", name="Start", exact=True).click()
    expect(echo).to_have_attribute("data-state", "ready")
    expect(echo.locator(".state")).to_have_text("ready")
    expect(echo.locator(".detail")).to_contain_text("pid ")
    expect(echo.get_by_role("button", name="Start", exact=True)).to_be_disabled()

    with page.context.expect_page() as opened:
        echo.get_by_role("link", name="Open").click()
    tab = opened.value
    tab.wait_for_load_state()
    assert '"target": "/"' in tab.content()  # the echo backend's answer, through the proxy
    tab.close()

    echo.get_by_role("button", name="Stop", exact=True).click()
    expect(echo).to_have_attribute("data-state", "stopped")
    expect(echo.get_by_role("button", name="Start", exact=True)).to_be_enabled()


def drive_launcher(url: str, screenshot: Path) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 620})
            page.goto(url)
            expect(page).to_have_title("trioproxy")
            titles = page.locator("li.server .title")
            expect(titles).to_have_text(["Echo service", "Files", "Broken app"])
            expect(page.locator("li.server[data-server='echo'] img.icon")).to_be_visible()
            expect(page.locator("li.server[data-server='files']")).to_have_attribute("data-state", "ready")

            start_open_stop(page)

            broken = page.locator("li.server[data-server='broken']")
            broken.get_by_role("button", name="Start", exact=True).click()
            expect(broken).to_have_attribute("data-state", "failed")
            expect(broken.locator(".log")).to_be_visible()
            expect(broken.locator(".log")).to_contain_text("loading settings.toml")
            expect(broken.locator(".detail")).to_contain_text("gave up")
            expect(page.locator("#status")).to_contain_text("Updated")

            page.locator("li.server[data-server='echo']").get_by_role("button", name="Start", exact=True).click()
            expect(page.locator("li.server[data-server='echo']")).to_have_attribute("data-state", "ready")
            page.screenshot(path=str(screenshot), full_page=True, animations="disabled")
        finally:
            browser.close()


def drive_behind_prefix(url: str) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.goto(url)
            start_open_stop(page)
        finally:
            browser.close()


async def test_launcher_starts_opens_and_stops_a_server(nursery: trio.Nursery, tmp_path: Path) -> None:
    expect.set_options(timeout=15_000)
    proxy = await start_proxy(nursery, launcher_servers(tmp_path), base_url="/lab/")
    screenshot = tmp_path / "launcher.png"
    with trio.fail_after(90):
        await trio.to_thread.run_sync(drive_launcher, f"{proxy.url}?token={TOKEN}", screenshot)
    assert screenshot.stat().st_size > 10_000
    assert proxy.supervisors["echo"].state is State.READY
    assert proxy.supervisors["broken"].state is State.FAILED
    assert proxy.supervisors["hidden"].state is State.STOPPED
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(screenshot, os.environ[SCREENSHOT_ENV])


async def test_launcher_works_behind_another_proxys_prefix(nursery: trio.Nursery, tmp_path: Path) -> None:
    # An inner trioproxy reached through an outer one's proxy/<port>/, as under Jupyter.
    expect.set_options(timeout=15_000)
    inner = await start_proxy(nursery, launcher_servers(tmp_path), token=None)
    inner_port = int(inner.url.split(":")[2].split("/")[0])
    outer = await start_proxy(nursery, {})
    with trio.fail_after(90):
        await trio.to_thread.run_sync(drive_behind_prefix, f"{outer.url}proxy/{inner_port}/?token={TOKEN}")
    assert inner.supervisors["echo"].state is State.STOPPED
    assert inner.supervisors["echo"].starts == 1


PANEL_APP = """\
import panel as pn

count = pn.widgets.IntInput(name="count", value=0)
button = pn.widgets.Button(name="Add one")
button.on_click(lambda event: setattr(count, "value", count.value + 1))
pn.Column("Hello from Panel in Chromium", button, pn.bind(lambda n: f"Clicked {n} times", count)).servable()
"""


def drive_panel(url: str) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.goto(url)
            # The document arrives over Bokeh's WebSocket; a click goes back over it, and
            # the server's answer comes back over it again.
            expect(page.get_by_text("Hello from Panel in Chromium")).to_be_visible()
            page.get_by_role("button", name="Add one").click()
            expect(page.get_by_text("Clicked 1 times")).to_be_visible()
        finally:
            browser.close()


@pytest.mark.e2e
async def test_chromium_drives_a_panel_app_through_the_websocket_fast_path(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    expect.set_options(timeout=30_000)
    proxy = await start_proxy(nursery, panel_server(tmp_path, PANEL_APP))
    with trio.fail_after(90):
        await trio.to_thread.run_sync(drive_panel, f"{proxy.url}panel/app?token={TOKEN}")
    metrics = proxy.app.extensions["trioproxy"].metrics
    assert metrics.websockets_tunnelled.get("panel", 0) >= 1  # the browser's WebSocket took the fast path


def drive_reload(url: str) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("li.server .title")).to_have_text(["Echo service", "Old one"])
            page.evaluate("window.notReloaded = true")
            # Someone else reloads trioproxy's configuration; the open page follows.
            assert page.request.post(url.split("?")[0] + "server-proxy/api/reload").ok
            expect(page.locator("li.server .title")).to_have_text(["Echo renamed", "Added one"])
            assert page.evaluate("window.notReloaded") is True
            added = page.locator("li.server[data-server='added']")
            added.get_by_role("button", name="Start", exact=True).click()
            expect(added).to_have_attribute("data-state", "ready")
        finally:
            browser.close()


async def test_launcher_follows_a_reload_without_reloading_the_page(nursery: trio.Nursery, tmp_path: Path) -> None:
    from trioproxy.config import Reloader, make_server_process

    expect.set_options(timeout=15_000)
    before = {
        "echo": {"command": echo_command(), "launcher_entry": {"title": "Echo service"}},
        "old": {"command": echo_command(), "launcher_entry": {"title": "Old one"}},
    }
    after = {
        "echo": {"command": echo_command(), "launcher_entry": {"title": "Echo renamed"}},
        "added": {"command": echo_command(), "launcher_entry": {"title": "Added one"}},
    }
    proxy = await start_proxy(nursery, before)
    load = lambda: {name: make_server_process(name, settings) for name, settings in after.items()}  # noqa: E731
    proxy.app.extensions["trioproxy"].settings.reloader = Reloader(load, proxy.supervisors)
    with trio.fail_after(90):
        await trio.to_thread.run_sync(drive_reload, f"{proxy.url}?token={TOKEN}")
    assert sorted(proxy.supervisors) == ["added", "echo"]
    assert proxy.supervisors["added"].state is State.READY


def drive_template_form(url: str, screenshot: Path) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 700})
            page.goto(url)
            form = page.locator("form.template-form[data-template='viewer']")
            expect(form.get_by_label("Log directory")).to_be_visible()
            # A value the template refuses: the form says why, and nothing is made.
            form.get_by_label("Log directory").fill("../outside")
            form.get_by_role("button", name="Start new").click()
            expect(form.locator(".form-error")).to_contain_text("argument 'logdir'")
            expect(form.locator(".form-error")).to_contain_text("is outside")
            expect(page.locator("section.template li.server")).to_have_count(0)

            form.get_by_label("Log directory").fill("runs/exp1")
            form.get_by_role("button", name="Start new").click()
            instance = page.locator("section.template li.server")
            expect(instance).to_have_count(1)
            expect(instance).to_have_attribute("data-state", "ready")
            expect(instance.locator(".title")).to_contain_text("Viewer (logdir=")
            expect(page.locator("#status")).to_be_visible()
            page.screenshot(path=str(screenshot), full_page=True, animations="disabled")

            with page.context.expect_page() as opened:
                instance.get_by_role("link", name="Open").click()
            tab = opened.value
            tab.wait_for_load_state()
            assert '"--logdir"' in tab.content()  # the instance's own backend, through the proxy
            tab.close()

            # Stopping it removes it from the page.
            instance.get_by_role("button", name="Stop", exact=True).click()
            expect(page.locator("section.template li.server")).to_have_count(0)
            expect(form.get_by_role("button", name="Start new")).to_be_enabled()
        finally:
            browser.close()


async def test_launcher_form_makes_an_instance_of_a_template(nursery: trio.Nursery, tmp_path: Path) -> None:
    expect.set_options(timeout=15_000)
    (tmp_path / "runs" / "exp1").mkdir(parents=True)
    templates = {
        "viewer": {
            "command": [PY, str(Path(__file__).parent / "backends" / "argv_env.py"), "{port}", "--logdir", "{logdir}"],
            "cwd": str(tmp_path),
            "timeout": 20,
            "params": {"logdir": {"type": "path", "exists": "dir", "description": "Log directory"}},
            "launcher_entry": {"title": "Viewer"},
        }
    }
    proxy = await start_proxy(nursery, {"echo": {"command": echo_command()}}, templates=templates)
    screenshot = tmp_path / "form.png"
    with trio.fail_after(90):
        await trio.to_thread.run_sync(drive_template_form, f"{proxy.url}?token={TOKEN}", screenshot)
    assert [name for name in proxy.supervisors] == ["echo"]
    assert screenshot.stat().st_size > 10_000
    if os.environ.get(FORM_SCREENSHOT_ENV):
        shutil.copyfile(screenshot, os.environ[FORM_SCREENSHOT_ENV])
