"""The start page in a real headless Chromium (the launcher tests' driver).

A person opens a deep link to a server that takes ~8 s to start and prints as it loads: the tab
shows the start page at once, the output appearing line by line, then lands on the deep link;
the process was started once. The same under a base URL and behind another proxy's prefix;
without JavaScript; and a failed start with its Restart button.

Until a start no longer ends at ``timeout`` (issue 21's other half), the servers set it high;
the start page itself does not use it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio
from playwright.sync_api import Page, expect, sync_playwright

from .conftest import BACKENDS, PY, TOKEN, start_proxy
from .test_launcher_browser import CHROMIUM, ICON, launch

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason=f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium), as .ci/run does",
)

LOADING = re.compile(r"loading model… \d+/\d+")


def model_server(tmp_path: Path, seconds: float, *, fail: bool = False, **options: Any) -> dict[str, Any]:
    (tmp_path / "model.svg").write_text(ICON)
    command = [PY, str(BACKENDS / "slow_start.py"), "{port}", str(seconds), str(tmp_path / f"pids-{seconds}")]
    return {
        "command": command + (["fail"] if fail else []),
        "timeout": 120,  # until start_timeout lands, timeout still ends a start
        "launcher_entry": {"title": "Slow model", "icon_path": str(tmp_path / "model.svg")},
        **options,
    }


def started(tmp_path: Path, seconds: float) -> int:
    path = tmp_path / f"pids-{seconds}"
    return len(path.read_text().split()) if path.exists() else 0


def loading_lines(page: Page) -> int:
    return len(LOADING.findall(page.locator("#output").text_content() or ""))


def watch_start(page: Page, deep_link: str) -> None:
    """From the deep link: the start page at once, output as it comes, then the deep link."""
    page.goto(deep_link)
    expect(page).to_have_url(re.compile(r"/server-proxy/start/model\?next=model%2Fsome%2Fpage%3Fx%3D1$"))
    expect(page.locator("h1")).to_have_text("Slow model")
    expect(page.locator("header img.icon")).to_be_visible()
    expect(page.locator("#state")).to_have_text("starting")
    expect(page.locator("#elapsed")).to_have_text(re.compile(r"^for \d+ s$"))
    expect(page.locator("#estimate")).to_have_text("first start: no estimate yet")
    expect(page.locator("#output")).to_contain_text("loading model…")
    seen = loading_lines(page)
    # More lines arrive while the page still says it is starting: streamed, not at the end.
    page.wait_for_function(
        "seen => document.getElementById('state').textContent === 'starting'"
        " && (document.getElementById('output').textContent.match(/loading model…/g) || []).length > seen",
        arg=seen,
    )
    page.wait_for_url(deep_link, timeout=60_000)
    expect(page.locator("#target")).to_have_text("/some/page?x=1")


def drive(login: str, deep_link: str) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.goto(login)  # the launcher, with the token: the cookie is set
            watch_start(page, deep_link)
        finally:
            browser.close()


async def test_a_deep_link_to_a_slow_server_shows_its_start_then_lands(nursery: trio.Nursery, tmp_path: Path) -> None:
    expect.set_options(timeout=30_000)
    proxy = await start_proxy(nursery, {"model": model_server(tmp_path, 8)})
    with trio.fail_after(120):
        await trio.to_thread.run_sync(drive, f"{proxy.url}?token={TOKEN}", f"{proxy.url}model/some/page?x=1")
    assert started(tmp_path, 8) == 1
    assert proxy.supervisors["model"].starts == 1
    durations = proxy.supervisors["model"].history.durations("model")
    assert len(durations) == 1 and durations[0] >= 8


async def test_the_start_page_under_a_base_url(nursery: trio.Nursery, tmp_path: Path) -> None:
    expect.set_options(timeout=30_000)
    proxy = await start_proxy(nursery, {"model": model_server(tmp_path, 3)}, base_url="/lab/")
    with trio.fail_after(120):
        await trio.to_thread.run_sync(drive, f"{proxy.url}?token={TOKEN}", f"{proxy.url}model/some/page?x=1")
    assert started(tmp_path, 3) == 1


async def test_the_start_page_behind_another_proxys_prefix(nursery: trio.Nursery, tmp_path: Path) -> None:
    # An inner trioproxy reached through an outer one's proxy/<port>/ (which strips that
    # prefix), as under Jupyter; nothing tells the inner one the prefix.
    expect.set_options(timeout=30_000)
    inner = await start_proxy(nursery, {"model": model_server(tmp_path, 3)}, token=None)
    inner_port = int(inner.url.split(":")[2].split("/")[0])
    outer = await start_proxy(nursery, {})
    prefix = f"{outer.url}proxy/{inner_port}/"
    with trio.fail_after(120):
        await trio.to_thread.run_sync(drive, f"{outer.url}?token={TOKEN}", f"{prefix}model/some/page?x=1")
    assert started(tmp_path, 3) == 1


def drive_without_javascript(login: str, deep_link: str) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_context(java_script_enabled=False).new_page()
            page.goto(login)
            page.goto(deep_link)
            expect(page).to_have_url(re.compile(r"/server-proxy/start/model\?next="))
            expect(page.locator("#state")).to_have_text("starting")
            page.wait_for_url(deep_link, timeout=60_000)  # by the meta refresh, then a redirect
            expect(page.locator("#target")).to_have_text("/some/page?x=1")
        finally:
            browser.close()


async def test_without_javascript_the_refresh_lands_on_the_deep_link(nursery: trio.Nursery, tmp_path: Path) -> None:
    expect.set_options(timeout=30_000)
    proxy = await start_proxy(nursery, {"model": model_server(tmp_path, 3)})
    with trio.fail_after(120):
        await trio.to_thread.run_sync(
            drive_without_javascript, f"{proxy.url}?token={TOKEN}", f"{proxy.url}model/some/page?x=1"
        )
    assert started(tmp_path, 3) == 1


def drive_failure(login: str, deep_link: str) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.goto(login)
            page.goto(deep_link)
            expect(page.locator("#state")).to_have_text("failed")
            expect(page.locator("#reason")).to_contain_text("exited before it was ready (exit code 3)")
            expect(page.locator("#output")).to_contain_text("model.bin: checksum mismatch")
            restart = page.get_by_role("button", name="Restart")
            expect(restart).to_be_visible()
            restart.click()
            # The restarted process prints again, and fails again.
            page.wait_for_function(
                "() => (document.getElementById('output').textContent.match(/checksum mismatch/g) || []).length >= 2"
            )
            expect(page.locator("#state")).to_have_text("failed")
            assert "/server-proxy/start/model" in page.url  # it never went on
        finally:
            browser.close()


async def test_a_failed_start_shows_why_and_restarts_on_a_click(nursery: trio.Nursery, tmp_path: Path) -> None:
    expect.set_options(timeout=30_000)
    proxy = await start_proxy(nursery, {"model": model_server(tmp_path, 0.5, fail=True, max_failures=1)})
    with trio.fail_after(120):
        await trio.to_thread.run_sync(drive_failure, f"{proxy.url}?token={TOKEN}", f"{proxy.url}model/some/page?x=1")
    assert started(tmp_path, 0.5) == 2


def drive_launcher(url: str) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.goto(url)
            model = page.locator("li.server[data-server='model']")
            model.get_by_role("button", name="Start", exact=True).click()
            expect(model).to_have_attribute("data-state", "starting")
            detail = model.locator(".detail")
            expect(detail).to_contain_text(re.compile(r"starting for \d+ s · usually ready in ~12 s"))
            expect(model.locator(".last-line")).to_have_text(LOADING)
            expect(model).to_have_attribute("data-state", "ready", timeout=60_000)
            expect(model.locator(".last-line")).to_be_hidden()
            expect(detail).not_to_contain_text("starting for")
        finally:
            browser.close()


async def test_the_launcher_shows_a_start_in_progress(nursery: trio.Nursery, tmp_path: Path) -> None:
    expect.set_options(timeout=30_000)
    proxy = await start_proxy(nursery, {"model": model_server(tmp_path, 4)})
    for seconds in (11.5, 12.0, 20.0):  # earlier starts, as if kept from another run
        proxy.supervisors.history.record("model", seconds)
    with trio.fail_after(120):
        await trio.to_thread.run_sync(drive_launcher, f"{proxy.url}?token={TOKEN}")
    assert started(tmp_path, 4) == 1
