"""Tolerant loading, strict reporting: what jupyter-server-proxy 4.6 accepts loads, with a
warning for what trioproxy leaves out; ``--strict-config`` refuses it. Real trioproxy
processes, with real installed packages (dist-info directories on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS, PY, ProxyProcess, launch_trioproxy
from tests.test_config import write_package

pytestmark = pytest.mark.timeout(120)
TOKEN = "tolerant-token"
HEADERS = {"Authorization": f"token {TOKEN}"}
ARGV_ENV = str(BACKENDS / "argv_env.py")
COMMAND = [PY, ARGV_ENV, "{port}"]


def wait_until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def python_path(*sites: Path) -> str:
    return os.pathsep.join([*(str(site) for site in sites), os.environ.get("PYTHONPATH", "")])


def package(site: Path, dist: str, name: str, settings: str) -> str:
    """An installed package whose entry point ``name`` returns ``settings`` (Python source,
    which may use PY and COMMAND); the source messages name it by."""
    module = dist
    write_package(
        site,
        dist,
        module,
        f"""
        PY = {PY!r}
        COMMAND = {COMMAND!r}

        def setup():
            return {settings}
        """,
        {name: f"{module}:setup"},
    )
    return f"entry point '{name} = {module}:setup' of {dist} 1.0"


def launch(args: list[str], proxy_processes: list[ProxyProcess], *sites: Path, env: dict[str, str] | None = None) -> ProxyProcess:
    proxy = launch_trioproxy(
        ["--port", "0", "--token", TOKEN, *args], env={"PYTHONPATH": python_path(*sites), **(env or {})}
    )
    proxy_processes.append(proxy)
    return proxy


def start_fails(args: list[str], *sites: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "trioproxy", "--port", "0", "--token", TOKEN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": python_path(*sites)},
    )


def client(proxy: ProxyProcess) -> httpx.Client:
    return httpx.Client(base_url=proxy.base, headers=HEADERS, timeout=30)


def launcher_titles(http: httpx.Client) -> dict[str, str]:
    info = http.get("server-proxy/servers-info").json()["server_processes"]
    return {server["name"]: server["launcher_entry"]["title"] for server in info}


# The shapes of jupyter-remote-desktop-proxy 3.0.1 (new_browser_window), jupyter-shiny-proxy
# 1.4 (timeout inside launcher_entry) and jupyter-myst-build-proxy 0.6.0 (path_info at the top).
PACKAGES = {
    "desktop-like": (
        "desktop_like_proxy",
        "{'command': COMMAND, 'timeout': 30, 'new_browser_window': True, 'launcher_entry': {'title': 'Desktop'}}",
        "unknown option 'new_browser_window' (did you mean 'new_browser_tab'?)",
    ),
    "shiny-like": (
        "shiny_like_proxy",
        "{'command': COMMAND, 'launcher_entry': {'title': 'Shiny', 'timeout': 20}}",
        "unknown launcher_entry option 'timeout' (a server option, not a launcher_entry one)",
    ),
    "myst-like": (
        "myst_like_proxy",
        "{'command': COMMAND, 'path_info': 'myst-like/index.html', 'launcher_entry': {'title': 'MyST'}}",
        "unknown option 'path_info' (a launcher_entry option, not a server option)",
    ),
}


def install_packages(site: Path) -> dict[str, str]:
    site.mkdir()
    return {name: package(site, dist, name, settings) for name, (dist, settings, _) in PACKAGES.items()}


def test_packages_with_keys_trioproxy_does_not_know_load_with_a_warning(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    sources = install_packages(tmp_path / "site")
    proxy = launch([], proxy_processes, tmp_path / "site")
    with client(proxy) as http:
        for name in PACKAGES:
            response = http.get(f"{name}/")
            assert response.status_code == 200, (name, response.text)
        titles = launcher_titles(http)
        assert {titles[name] for name in PACKAGES} == {"Desktop", "Shiny", "MyST"}
    for name, (_, _, message) in PACKAGES.items():
        line = f"server {name!r}: {message} in {sources[name]}; ignored, the server loads without it"
        assert line in proxy.output()
        assert "(--strict-config makes this an error)" in proxy.output()
    assert proxy.stop() == 0


def test_jupyter_server_proxy_accepts_the_same_packages(tmp_path: Path) -> None:
    """The premise: jupyter-server-proxy 4.6 loads all three (so trioproxy must)."""
    install_packages(tmp_path / "site")
    script = (
        "import json, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from jupyter_server_proxy.config import get_entrypoint_server_processes\n"
        "print(json.dumps([p.name for p in get_entrypoint_server_processes()]))\n"
    )
    result = subprocess.run(
        [PY, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONPATH": python_path(tmp_path / "site")},
    )
    assert set(PACKAGES) <= set(json.loads(result.stdout))


def test_strict_config_skips_those_packages_and_trioproxy_runs(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    sources = install_packages(tmp_path / "site")
    config = tmp_path / "cfg.py"
    config.write_text(f"c.ServerProxy.servers = {{'mine': {{'command': {COMMAND!r}}}}}\n")
    proxy = launch(["--strict-config", "--config", str(config)], proxy_processes, tmp_path / "site")
    with client(proxy) as http:
        assert http.get("mine/").status_code == 200
        for name in PACKAGES:
            assert http.get(f"{name}/").status_code == 404
        assert set(launcher_titles(http)) == {"mine"}
    for name, (_, _, message) in PACKAGES.items():
        assert f"skipping server {name!r} from {sources[name]}: server {name!r}: {message} in {sources[name]}" in proxy.output()
    assert proxy.stop() == 0


def test_a_typo_in_the_config_file_is_a_warning_with_a_suggestion(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "cfg.py"
    config.write_text(
        textwrap.dedent(
            f"""
            from trioproxy.config import ServerProcess

            c.ServerProxy.servers = {{
                "web": {{"command": {COMMAND!r}, "comand": ["x"], "launcher_entry": {{"titel": "W", "title": "Web"}}}},
                "made": ServerProcess(command={COMMAND!r}, timout=3),
            }}
            """
        )
    )
    proxy = launch(["--config", str(config)], proxy_processes)
    source = f"config file {config}"
    with client(proxy) as http:
        assert http.get("web/").status_code == 200
        assert http.get("made/").status_code == 200
        assert launcher_titles(http)["web"] == "Web"
    output = proxy.output()
    assert f"server 'web': unknown option 'comand' (did you mean 'command'?) in {source}; ignored" in output
    assert f"server 'web': unknown launcher_entry option 'titel' (did you mean 'title'?) in {source}; ignored" in output
    assert f"server 'made': unknown option 'timout' (did you mean 'timeout'?) in {source}; ignored" in output
    assert "Traceback" not in output
    assert proxy.stop() == 0


@pytest.mark.parametrize("how", ["flag", "trait"])
def test_strict_config_refuses_a_typo_in_the_config_file(tmp_path: Path, how: str) -> None:
    config = tmp_path / "cfg.py"
    servers = f"c.ServerProxy.servers = {{'web': {{'command': {COMMAND!r}, 'comand': ['x']}}}}\n"
    config.write_text(servers if how == "flag" else "c.ServerProxy.strict_config = True\n" + servers)
    result = start_fails(["--config", str(config), *(["--strict-config"] if how == "flag" else [])])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"trioproxy: config error: server 'web': unknown option 'comand' (did you mean 'command'?) in config file {config}"
    )


def test_a_value_of_the_wrong_type_fails_that_server_alone(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    site = tmp_path / "site"
    site.mkdir()
    source = package(site, "typed_proxy", "typed-like", "{'command': 'one string, not a list'}")
    config = tmp_path / "cfg.py"
    config.write_text(
        f"c.ServerProxy.servers = {{'bad': {{'command': {COMMAND!r}, 'timeout': 'soon'}}, 'good': {{'command': {COMMAND!r}}}}}\n"
    )
    for strict in ([], ["--strict-config"]):
        proxy = launch([*strict, "--config", str(config)], proxy_processes, site)
        with client(proxy) as http:
            assert http.get("good/").status_code == 200
            bad = http.get("bad/")
            assert bad.status_code == 503
            assert bad.json()["message"].startswith("server 'bad': option 'timeout': The 'timeout' trait")
            typed = http.get("typed-like/")
            assert typed.status_code == 503
            assert typed.json()["message"].startswith("server 'typed-like': option 'command': ")
            states = {s["name"]: s["state"] for s in http.get("server-proxy/api/servers").json()["servers"]}
            assert states["bad"] == states["typed-like"] == "failed"
        output = proxy.output()
        assert "server 'typed-like': option 'command': " in output and f"(in {source}); this server will not start" in output
        assert proxy.stop() == 0


@pytest.mark.parametrize("first", ["alpha_marimo_proxy", "beta_marimo_proxy"])
def test_two_packages_with_one_name_serve_the_first_found(
    tmp_path: Path, proxy_processes: list[ProxyProcess], first: str
) -> None:
    """As jupyter-marimo-proxy and swan-marimo-proxy both register ``marimo``: the one found
    first (sys.path order) is served, as jupyter-server-proxy routes to the first."""
    sites: dict[str, Path] = {}
    sources: dict[str, str] = {}
    icon = tmp_path / "beta.svg"
    icon.write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    for dist in ("alpha_marimo_proxy", "beta_marimo_proxy"):
        sites[dist] = tmp_path / dist
        sites[dist].mkdir()
        entry = f"'title': {dist!r}" + (f", 'icon_path': {str(icon)!r}" if dist.startswith("beta") else "")
        sources[dist] = package(
            sites[dist], dist, "dup-like",
            f"{{'command': COMMAND, 'environment': {{'MARK': {dist!r}}}, 'launcher_entry': {{{entry}}}}}",
        )  # fmt: skip
    second = next(dist for dist in sites if dist != first)
    order = [sites[first], sites[second]]

    script = (
        "import json, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from jupyter_server_proxy.config import get_entrypoint_server_processes\n"
        "print(json.dumps([p.launcher_entry.title for p in get_entrypoint_server_processes() if p.name == 'dup-like']))\n"
    )
    jsp = subprocess.run(
        [PY, "-c", script], capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "PYTHONPATH": python_path(*order)},
    )
    assert json.loads(jsp.stdout) == [first, second]  # both listed; Tornado routes to the first

    proxy = launch([], proxy_processes, *order)
    with client(proxy) as http:
        assert http.get("dup-like/").json()["env"]["MARK"] == first
        listed = [s for s in http.get("server-proxy/servers-info").json()["server_processes"] if s["name"] == "dup-like"]
        assert [s["launcher_entry"]["title"] for s in listed] == [first, second]  # as jupyter-server-proxy lists them
        # Only beta's has an icon: its URL gives it whichever is served.
        assert [("icon_url" in s["launcher_entry"]) for s in listed] == [first.startswith("beta"), second.startswith("beta")]
        assert http.get("server-proxy/icon/dup-like").content == icon.read_bytes()
        assert [s["name"] for s in http.get("server-proxy/api/servers").json()["servers"]].count("dup-like") == 1
    assert (
        f"server 'dup-like' is registered by two packages: {sources[first]} and {sources[second]}; serving the one "
        f"of {first} 1.0 (found first, as jupyter-server-proxy does), not the one of {second} 1.0 (servers-info lists both)"
    ) in proxy.output()
    assert proxy.stop() == 0


def test_a_configured_server_is_listed_before_the_entry_point_of_its_name(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    """jupyter-server-proxy lists the configuration's servers, then the entry points', and
    routes a name to the first: the configuration's."""
    site = tmp_path / "site"
    site.mkdir()
    package(site, "packaged_proxy", "both", "{'command': COMMAND, 'launcher_entry': {'title': 'From the package'}}")
    config = tmp_path / "cfg.py"
    config.write_text(
        f"c.ServerProxy.servers = {{'both': {{'command': {COMMAND!r}, 'environment': {{'MARK': 'config'}}, "
        "'launcher_entry': {'title': 'From the configuration'}}}\n"
    )
    proxy = launch(["--config", str(config)], proxy_processes, site)
    with client(proxy) as http:
        assert http.get("both/").json()["env"]["MARK"] == "config"
        listed = [s for s in http.get("server-proxy/servers-info").json()["server_processes"] if s["name"] == "both"]
        assert [s["launcher_entry"]["title"] for s in listed] == ["From the configuration", "From the package"]
    assert proxy.stop() == 0


def test_a_server_with_nothing_to_start_or_reach_gets_no_route(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    site = tmp_path / "site"
    site.mkdir()
    source = package(site, "empty_proxy", "empty-like", "{'launcher_entry': {'title': 'Empty'}}")
    config = tmp_path / "cfg.py"
    config.write_text(
        f"c.ServerProxy.servers = {{'nothing': {{'timeout': 3}}, 'sock': {{'unix_socket': True}}, 'web': {{'command': {COMMAND!r}}}}}\n"
    )
    proxy = launch(["--config", str(config)], proxy_processes, site)
    with client(proxy) as http:
        assert http.get("web/").status_code == 200
        for name in ("nothing", "sock", "empty-like"):
            assert http.get(f"{name}/").status_code == 404, name
        assert "nothing" not in launcher_titles(http) and "empty-like" not in launcher_titles(http)
        names = {s["name"] for s in http.get("server-proxy/api/servers").json()["servers"]}
        assert names == {"web"}
    output = proxy.output()
    for name, where in (("nothing", f"config file {config}"), ("sock", f"config file {config}"), ("empty-like", source)):
        assert (
            f"server {name!r} in {where} has no command, port or unix_socket path: nothing to start or reach; "
            "it gets no route (404), as in jupyter-server-proxy"
        ) in output
    assert proxy.stop() == 0

    result = start_fails(["--strict-config", "--config", str(config)], site)
    assert result.returncode == 2
    assert "server 'nothing' in config file" in result.stderr and "has no command, port or unix_socket path" in result.stderr


def test_only_servers_with_nothing_to_start_do_not_bring_the_default_one(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "cfg.py"
    config.write_text("c.ServerProxy.servers = {'nothing': {}}\nc.ServerProxy.load_entry_points = False\n")
    proxy = launch(["--config", str(config)], proxy_processes)
    with client(proxy) as http:
        assert http.get("server-proxy/api/servers").json()["servers"] == []
        assert http.get("files/").status_code == 404
    assert proxy.stop() == 0


def test_none_environment_values_leave_the_variable_unset(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    """jupyter-pgadmin-proxy returns {"PGHOST": os.environ.get("PGHOST")...}: None is no value."""
    config = tmp_path / "cfg.py"
    config.write_text(
        textwrap.dedent(
            f"""
            def environment(port):
                return {{"PGHOST": None, "PGUSER": "user-" + str(port), "MARK": None}}

            c.ServerProxy.servers = {{"pg": {{"command": {COMMAND!r}, "environment": environment}}}}
            """
        )
    )
    # PGHOST is trioproxy's own (inherited): None unsets it for the child too.
    proxy = launch(["--config", str(config)], proxy_processes, env={"PGHOST": "inherited-host"})
    with client(proxy) as http:
        env = http.get("pg/").json()["env"]
        port = http.get("server-proxy/api/servers/pg").json()["port"]
    assert env["PGHOST"] is None and env["MARK"] is None
    assert env["PGUSER"] == f"user-{port}"
    assert proxy.stop() == 0


def test_expand_environment_keeps_none() -> None:
    from trioproxy.options import check_environment
    from trioproxy.templating import expand_environment

    expanded: dict[str, Any] = expand_environment(lambda port: {"A": None, "B": "{port}"}, {"port": 5})
    assert expanded == {"A": None, "B": "5"}
    check_environment(expanded)  # None is allowed: the variable is unset


def test_a_reload_applies_a_file_with_an_unknown_key_and_warns(tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    config = tmp_path / "cfg.py"
    config.write_text(f"c.ServerProxy.servers = {{'web': {{'command': {COMMAND!r}}}}}\n")
    proxy = launch(["--config", str(config)], proxy_processes)
    config.write_text(
        f"c.ServerProxy.servers = {{'web': {{'command': {COMMAND!r}}}, 'new': {{'command': {COMMAND!r}, 'new_browser_window': True}}}}\n"
    )
    with client(proxy) as http:
        result = http.post("server-proxy/api/reload")
        assert result.status_code == 200, result.text
        assert result.json()["added"] == ["new"] and result.json()["unchanged"] == ["web"]
        assert http.get("new/").status_code == 200
        wait_until(lambda: "server 'new': unknown option 'new_browser_window'" in proxy.output())
        # With strict_config in the file, the same file is refused and nothing changes.
        config.write_text("c.ServerProxy.strict_config = True\n" + config.read_text())
        refused = http.post("server-proxy/api/reload")
        assert refused.status_code == 400
        assert refused.json()["message"] == (
            "Reload failed, nothing changed: config error: server 'new': unknown option 'new_browser_window' "
            f"(did you mean 'new_browser_tab'?) in config file {config}"
        )
        assert http.get("new/").status_code == 200
    assert proxy.stop() == 0
