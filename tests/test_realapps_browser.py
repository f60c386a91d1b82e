"""Real apps, opened from trioproxy's launcher in a real Chromium, started by the real
jupyter-*-proxy packages' entry points, each doing one real thing:

- TensorBoard 2.21 (jupyter-tensorboard-proxy 0.1.1): a scalar written with TensorBoard's own
  summary writer is drawn as a chart;
- marimo 0.25 (jupyter-marimo-proxy 0.0.4, its token passed by ``request_headers_override``):
  a notebook opened from marimo's file list runs its cells in marimo's kernel;
- Panel 1.x (jupyter-panel-proxy 0.2.0): an app picked from Panel's index updates a widget
  over Bokeh's WebSocket;
- code-server 4.99 (jupyter-vscode-proxy 0.7): VS Code's workbench loads and a file opens
  from its explorer.

One trioproxy, under the base URL ``/user/e2e/`` (jupyter-marimo-proxy takes marimo's base URL
from ``JUPYTERHUB_SERVICE_PREFIX``), sees the four packages' entry points through PYTHONPATH
and the apps through PATH. tests/realapps/install.sh (run by .ci/run) installs each app in a
prefix of its own under ``.venv/realapps/``; there, only what is missing is installed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

import trioproxy

from .e2e_helpers import (
    VENV_BIN,
    Service,
    clean_env,
    free_port,
    new_marker,
    read_until,
    services_cleaned_up,
    start_service,
    wait_until,
)
from .test_launcher_browser import launch

# Each test's own limit, above the suite's 120 s: the first request starts the app.
pytestmark = [pytest.mark.e2e, pytest.mark.realapps, pytest.mark.timeout(300)]

REALAPPS = Path(sys.prefix) / "realapps"
INSTALL = "bash tests/realapps/install.sh"
BASE = "/user/e2e/"
TOKEN = "realapps-token-0123456789abcdef"
APPS = ("tensorboard", "marimo", "panel", "vscode")
TENSORBOARD_PORT = 6006  # jupyter-tensorboard-proxy's fixed port
# Generous: four apps start on a 2-core machine that may be busy.
TIMEOUT_MS = 90_000

NOTEBOOK = '''\
import marimo

app = marimo.App()


@app.cell
def _():
    import marimo as mo
    return (mo,)


@app.cell
def _(mo):
    answer = sum(range(1, 7)) * 2
    mo.md(f"the kernel says {answer}")
    return (answer,)


if __name__ == "__main__":
    app.run()
'''
PANEL_APP = """\
import panel as pn

count = pn.widgets.IntInput(name="count", value=0)
button = pn.widgets.Button(name="Add one")
button.on_click(lambda event: setattr(count, "value", count.value + 1))
pn.Column("Hello from jupyter-panel-proxy", button, pn.bind(lambda n: f"Clicked {n} times", count)).servable()
"""
SOURCE = 'print("opened in VS Code through trioproxy")\n'
SCALARS = """\
import sys
from tensorboard.summary import Writer

writer = Writer(sys.argv[1])
for step, value in enumerate([0.9, 0.5, 0.3, 0.2, 0.15]):
    writer.add_scalar("realapps/loss", value, step=step)
writer.close()
"""


@dataclass
class Apps:
    url: str  # http://127.0.0.1:<port>/user/e2e/
    service: Service

    def launcher(self) -> str:
        return f"{self.url}?token={TOKEN}"


def _installed(app: str) -> bool:
    stamp = {"tensorboard": "tensorboard", "marimo": "marimo", "vscode": "code-server"}.get(app)
    return (REALAPPS / "plugins" / app / ".installed").is_file() and (
        stamp is None or (REALAPPS / stamp / ".installed").is_file()
    )


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apps]:
    missing = [app for app in APPS if not _installed(app)]
    if missing:
        message = f"real apps not installed in {REALAPPS}: {', '.join(missing)}; run: {INSTALL} {REALAPPS}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("realapps")
    home, work = tmp / "home", tmp / "work"
    work.mkdir()
    # jupyter-tensorboard-proxy reads $HOME/logs; TensorBoard's own writer fills it.
    subprocess.run([str(REALAPPS / "tensorboard/bin/python"), "-c", SCALARS, str(home / "logs" / "run1")], check=True)
    (work / "notebook.py").write_text(NOTEBOOK)
    # jupyter-panel-proxy serves the *.py and *.ipynb of ./examples when there is one (else of ./).
    (work / "examples").mkdir()
    (work / "examples" / "app.py").write_text(PANEL_APP)
    code = home / "code"
    code.mkdir()
    (code / "hello.py").write_text(SOURCE)
    # No "Do you trust the authors?" dialog in front of the explorer.
    settings = home / ".local/share/code-server/User/settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"security.workspace.trust.enabled": False, "workbench.startupEditor": "none"}))

    wait_until(lambda: _port_is_free(TENSORBOARD_PORT), timeout=60, what=f"port {TENSORBOARD_PORT} to be free")
    marker = new_marker()
    source = Path(trioproxy.__file__).resolve().parent.parent
    env = clean_env(
        marker,
        PYTHONPATH=os.pathsep.join([str(source), *(str(REALAPPS / "plugins" / app) for app in APPS)]),
        HOME=str(home),
        JUPYTERHUB_SERVICE_PREFIX=BASE,
        CODE_WORKINGDIR=str(code),
        JUPYTER_CONFIG_DIR=str(tmp / "jupyter"),
    )
    paths = [REALAPPS / "tensorboard/bin", REALAPPS / "marimo/bin", REALAPPS / "code-server/node_modules/.bin"]
    # The apps' own bin directories after the test venv's (panel, and trioproxy's python).
    env["PATH"] = os.pathsep.join([str(VENV_BIN), *map(str, paths), env["PATH"]])
    port = free_port()
    argv = [sys.executable, "-m", "trioproxy", "--port", str(port), "--token", TOKEN, "--base-url", BASE]
    with services_cleaned_up(marker) as services:
        service = start_service("trioproxy", argv, env, work, tmp)
        services.append(service)
        read_until(service, "trioproxy is serving", timeout=60)
        yield Apps(f"http://127.0.0.1:{port}{BASE}", service)


def open_from_launcher(page: Page, apps: Apps, name: str, title: str) -> Page:
    """The launcher lists ``name`` under its package's title; its Open link gives a new tab."""
    page.goto(apps.launcher())
    item = page.locator(f"li.server[data-server='{name}']")
    expect(item.locator(".title")).to_have_text(title)
    with page.context.expect_page() as opened:
        item.get_by_role("link", name="Open").click()
    tab = opened.value
    tab.set_default_timeout(TIMEOUT_MS)
    return tab


def in_chromium(apps: Apps, drive: Callable[[Page], None]) -> None:
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            try:
                drive(page)
            except Exception as exc:
                shots = Path(os.environ.get("TRIOPROXY_REALAPPS_SHOTS", apps.service.log_path.parent))
                for index, tab in enumerate(page.context.pages):
                    tab.screenshot(path=str(shots / f"failure-{index}.png"))
                raise AssertionError(f"{exc}\n--- screenshots in {shots}; trioproxy's log:\n{apps.service.log()[-6000:]}") from exc
        finally:
            browser.close()


def test_tensorboard_draws_a_scalar_chart(apps: Apps) -> None:
    def drive(page: Page) -> None:
        tab = open_from_launcher(page, apps, "tensorboard", "Tensorboard")
        expect(tab).to_have_url(f"{apps.url}tensorboard/", timeout=TIMEOUT_MS)
        # The time-series dashboard: the tag's card, with its line chart drawn.
        card = tab.locator("scalar-card").filter(has_text="realapps/loss")
        expect(card).to_be_visible()
        expect(card.locator("line-chart canvas").first).to_be_visible()
        # Its data table shows the last point written: step 4, value 0.15.
        expect(card.get_by_text("0.15", exact=True)).to_be_visible()

    in_chromium(apps, drive)


def test_marimo_runs_a_notebook_cell(apps: Apps) -> None:
    def drive(page: Page) -> None:
        tab = open_from_launcher(page, apps, "marimo", "Marimo")
        # marimo opens the notebook from its file list in a tab of its own.
        with tab.context.expect_page() as opened:
            tab.get_by_text("notebook.py").first.click()
        notebook = opened.value
        expect(notebook.get_by_text("the kernel says {answer}")).to_be_visible()  # the cell's source
        # Its cells are stale until run: the "run all stale cells" button (the last run button).
        notebook.get_by_test_id("run-button").last.click()
        # 42 is computed by marimo's kernel and comes back over its WebSocket through trioproxy.
        expect(notebook.get_by_text("the kernel says 42")).to_be_visible()

    in_chromium(apps, drive)


def test_panel_app_updates_a_widget(apps: Apps) -> None:
    def drive(page: Page) -> None:
        tab = open_from_launcher(page, apps, "panel", "Panel Launcher")
        tab.get_by_role("link", name="app").first.click()
        expect(tab.get_by_text("Hello from jupyter-panel-proxy")).to_be_visible()
        tab.get_by_role("button", name="Add one").click()
        expect(tab.get_by_text("Clicked 1 times")).to_be_visible()

    in_chromium(apps, drive)


def test_vscode_opens_a_file(apps: Apps) -> None:
    def drive(page: Page) -> None:
        tab = open_from_launcher(page, apps, "vscode", "VS Code")
        explorer = tab.locator(".explorer-folders-view")
        expect(explorer).to_be_visible()
        explorer.get_by_text("hello.py").click()
        expect(tab.locator(".editor-instance .view-lines")).to_contain_text("opened in VS Code through trioproxy")

    in_chromium(apps, drive)

