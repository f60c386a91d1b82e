"""Packages' Jupyter server extensions, run by trioproxy in an extension host.

Discovery (which installed distributions enable which extensions, and at which page their
launcher points) on real dist-info directories; the extension host as a real Jupyter Server
child behind a real trioproxy: a package's extension page served under the base URL, its
static-free handler seeing Jupyter's own ``base_url``, and the failures (an extension that
raises while loading, no token) reported as the server's reason, never trioproxy's end.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from trioproxy.config import make_server_process
from trioproxy.server_extensions import (
    TOKEN_ENV,
    PackageExtension,
    disabled_in_jupyter_config,
    extension_servers,
    find_package_extensions,
    page_paths,
)

from .conftest import BACKENDS, PY, ProxyProcess, launch_trioproxy

pytestmark = pytest.mark.timeout(120)
TOKEN = "extensions-token-0123456789"
COMMAND = [PY, str(BACKENDS / "argv_env.py"), "{port}"]
RECORD_PATH = "../../etc/jupyter/jupyter_server_config.d/{module}.json"


def write_package(
    site: Path,
    dist: str,
    *,
    servers: dict[str, dict[str, object]],
    extension: str = "",
    config: object = None,
    json_at: Path | None = None,
) -> None:
    """An installed distribution as pip leaves it: a module whose entry points return
    ``servers``, and, with ``config``, the jupyter_server_config.d file enabling its extension
    (recorded as a prefix install records it; written at ``json_at``, by default where
    ``pip install --target`` puts it: below the site directory)."""
    module = dist.replace("-", "_")
    functions = "".join(
        f"\ndef setup_{index}():\n    return {settings!r}\n" for index, settings in enumerate(servers.values())
    )
    (site / f"{module}.py").write_text(textwrap.dedent(extension) + functions)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {module}:setup_{index}\n" for index, name in enumerate(servers))
    (info / "entry_points.txt").write_text(f"[jupyter_serverproxy_servers]\n{lines}")
    record = f"{module}.py,,\n"
    if config is not None:
        recorded = RECORD_PATH.format(module=module)
        record += f"{recorded},,\n"
        target = json_at or site / "etc" / "jupyter" / "jupyter_server_config.d"
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{module}.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (info / "RECORD").write_text(record)


def enabling(module: str, on: object = True) -> dict[str, object]:
    return {"ServerApp": {"jpserver_extensions": {module: on}}}


PAGE = {"command": COMMAND, "launcher_entry": {"title": "Page", "path_info": "page"}}


# -- discovery --------------------------------------------------------------------------------


def test_extensions_are_found_where_pip_puts_their_config(tmp_path: Path) -> None:
    prefix_site = tmp_path / "prefix" / "lib" / "site"
    target_site = tmp_path / "target"
    for site in (prefix_site, target_site):
        site.mkdir(parents=True)
    # A prefix install: the file where RECORD says (relative to the site directory).
    write_package(prefix_site, "prefix-proxy", servers={"a": PAGE}, config=enabling("prefix_proxy"),
                  json_at=tmp_path / "prefix" / "etc" / "jupyter" / "jupyter_server_config.d")
    # pip --target: RECORD names the prefix's place, the file is below the target.
    write_package(target_site, "target-proxy", servers={"b": PAGE}, config=enabling("target_proxy"))
    write_package(target_site, "off-proxy", servers={"c": PAGE}, config=enabling("off_proxy", False))
    write_package(target_site, "plain-proxy", servers={"d": PAGE})
    found = find_package_extensions([str(prefix_site), str(target_site)])
    assert found == [
        PackageExtension("prefix-proxy 1.0", ("prefix_proxy",), ("a",)),
        PackageExtension("target-proxy 1.0", ("target_proxy",), ("b",)),
    ]


def test_an_extension_disabled_in_the_jupyter_configuration_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    site, user, system = tmp_path / "site", tmp_path / "user", tmp_path / "system"
    site.mkdir()
    write_package(site, "desk-proxy", servers={"a": PAGE}, config=enabling("desk_proxy"))
    # What `jupyter server extension disable desk_proxy` writes, in the user's directory.
    (user / "jupyter_server_config.d").mkdir(parents=True)
    (user / "jupyter_server_config.d" / "desk_proxy.json").write_text(json.dumps(enabling("desk_proxy", False)))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(user))
    with caplog.at_level(logging.INFO, "trioproxy.config"):
        assert find_package_extensions([str(site)]) == []
    assert "desk_proxy of desk-proxy 1.0: disabled in the Jupyter configuration" in caplog.text
    # Merged as Jupyter merges: a directory of higher priority (listed first) wins.
    system.mkdir()
    (system / "jupyter_server_config.json").write_text(json.dumps(enabling("desk_proxy", True)))
    assert disabled_in_jupyter_config(["desk_proxy"], [str(user), str(system)]) == {"desk_proxy"}
    assert disabled_in_jupyter_config(["desk_proxy"], [str(system), str(user)]) == set()
    (system / "jupyter_server_config.json").write_text("{broken")  # Jupyter's to report; no change here
    assert disabled_in_jupyter_config(["desk_proxy"], [str(system), str(user)]) == {"desk_proxy"}


@pytest.mark.parametrize(
    ("config", "why"),
    [("{not json", "Expecting property name"), ({"ServerApp": {"jpserver_extensions": ["x"]}}, "is not an object"),
     (["a list"], "has no attribute")],
)
def test_a_config_file_that_cannot_be_read_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, config: object, why: str
) -> None:
    write_package(tmp_path, "bad-proxy", servers={"a": PAGE}, config=config)
    with caplog.at_level(logging.WARNING, "trioproxy.config"):
        assert find_package_extensions([str(tmp_path)]) == []
    assert "bad_proxy.json of bad-proxy 1.0" in caplog.text and why in caplog.text


def test_the_page_is_where_the_launcher_points_outside_the_servers() -> None:
    package = PackageExtension("p 1.0", ("p",), ("ws", "own", "deep", "missing"))
    servers = {
        "ws": make_server_process("ws", {"command": ["x"], "launcher_entry": {"path_info": "desktop"}}),
        "own": make_server_process("own", {"command": ["x"]}),  # own/: its own route
        "deep": make_server_process("deep", {"command": ["x"], "launcher_entry": {"path_info": "/desktop/sub?x=1"}}),
    }
    assert page_paths(package, servers) == ["desktop"]
    servers["desktop"] = make_server_process("desktop", {"command": ["mine"]})  # the configuration's wins
    assert page_paths(package, servers) == []
    del servers["desktop"]
    servers["other"] = make_server_process("other", {"command": ["x"], "path": "desktop/sub"})  # so does a path there
    assert page_paths(package, servers) == []


def test_extension_servers_are_hosts_named_after_their_page(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_package(tmp_path, "desk-proxy", servers={"desk-ws": PAGE}, config=enabling("desk_proxy"))
    write_package(tmp_path, "own-proxy", servers={"own": {"command": COMMAND}}, config=enabling("own_proxy"))
    servers = {
        "desk-ws": make_server_process("desk-ws", PAGE),
        "own": make_server_process("own", {"command": COMMAND}),
    }
    with caplog.at_level(logging.INFO, "trioproxy.config"):
        hosts = extension_servers(servers, path=[str(tmp_path)])
    assert list(hosts) == ["page"]
    host = make_server_process("page", hosts["page"])
    assert host.command[:3] == [sys.executable, "-m", "trioproxy.extension_host"] and host.command[-1] == "desk_proxy"
    assert host.absolute_url and not host.launcher.enabled
    token = host.environment[TOKEN_ENV]
    assert host.request_headers_override == {"Authorization": f"token {token}"} and token not in host.command
    assert "not running the server extension(s) own_proxy of own-proxy 1.0" in caplog.text
    # Stable across loads, so that a reload leaves a running host alone.
    assert extension_servers(servers, path=[str(tmp_path)]) == hosts
    assert extension_servers(servers, reserved={"page"}, path=[str(tmp_path)]) == {}


# -- the extension host behind trioproxy ------------------------------------------------------

EXTENSION = """
from jupyter_server.base.handlers import JupyterHandler
from tornado import web

class Page(JupyterHandler):
    @web.authenticated
    def get(self, rest):
        self.finish(f"extension page {rest!r} under {self.base_url}")

def _jupyter_server_extension_points():
    return [{"module": __name__}]

def _load_jupyter_server_extension(serverapp):
    serverapp.web_app.add_handlers(".*", [(serverapp.base_url + "page/(.*)", Page)])
"""
BROKEN = """
def _jupyter_server_extension_points():
    return [{"module": __name__}]

def _load_jupyter_server_extension(serverapp):
    raise RuntimeError("this extension is broken on purpose")
"""


def launch(tmp_path: Path, proxy_processes: list[ProxyProcess], extension: str) -> httpx.Client:
    site = tmp_path / "site"
    site.mkdir()
    write_package(site, "page-proxy", servers={"page-ws": PAGE}, extension=extension, config=enabling("page_proxy"))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    proxy = launch_trioproxy(["--port", "0", "--token", TOKEN, "--base-url", "/a/b/"], env=env, cwd=str(tmp_path))
    proxy_processes.append(proxy)
    return httpx.Client(base_url=proxy.base, headers={"Authorization": f"token {TOKEN}"}, timeout=90)


def test_an_extension_page_is_served_under_the_base_url(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    with launch(tmp_path, proxy_processes, EXTENSION) as client:
        listing = {server["name"]: server for server in client.get("server-proxy/api/servers").json()["servers"]}
        assert listing["page"]["state"] == "stopped"  # started on first use
        page = client.get("page/some/where?x=1")
        assert page.status_code == 200, "".join(proxy_processes[0].lines)[-3000:]
        assert page.text == "extension page 'some/where' under /a/b/"
        # The launcher opens the package's entry, pointing at the page; the host has no entry.
        info = client.get("server-proxy/servers-info").json()["server_processes"]
        assert [(s["name"], s["launcher_entry"]["path_info"]) for s in info if s["launcher_entry"]["enabled"]] == [("page-ws", "page")]
        # A reload finds the same host: the running one is left alone.
        reload = client.post("server-proxy/api/reload").json()
        assert "page" in reload["unchanged"] and reload["changed"] == [], reload
        assert client.get("server-proxy/api/servers/page").json()["state"] == "ready"
    output = "".join(proxy_processes[0].lines)
    assert TOKEN_ENV in output and "page_proxy" in output
    # The host's own token is never in the log (argv carries the variable's name, not its value).
    assert "?token=[secret]" in output


def test_an_extension_that_fails_to_load_fails_its_server_alone(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    with launch(tmp_path, proxy_processes, BROKEN) as client:
        page = client.get("page/")
        assert page.status_code == 503
        assert "this extension is broken on purpose" in page.text
        assert client.get("page-ws/").status_code == 200  # the package's own server still works


def test_the_host_refuses_to_run_without_its_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [PY, "-m", "trioproxy.extension_host", "--port", "1", "--auth-variable", "NOT_SET_HERE", "some_module"],
        capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "NOT_SET_HERE"},
    )
    assert result.returncode == 1
    assert "$NOT_SET_HERE is empty; trioproxy passes the token there" in result.stderr
