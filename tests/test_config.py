"""Configuration: jupyter-server-proxy's options, config files, entry points, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trioproxy.config import (
    ConfigError,
    LauncherEntry,
    ServerProcess,
    ServerProxy,
    collect_servers,
    make_server_process,
)
from trioproxy.templating import TemplateError, call_with_asked_args, expand_dict, expand_list

PY = sys.executable


def test_every_jupyter_server_proxy_option_is_accepted() -> None:
    process = make_server_process(
        "app",
        {
            "command": ["app", "--port={port}"],
            "environment": {"BASE": "{base_url}"},
            "timeout": 10,
            "absolute_url": True,
            "port": 0,
            "unix_socket": True,
            "mappath": {"/": "/index.html"},
            "launcher_entry": {"enabled": False, "icon_path": "/x.svg", "category": "Other"},
            "new_browser_tab": False,
            "request_headers_override": {"X-Who": "{port}"},
            "rewrite_response": [lambda response: None],
            "update_last_activity": False,
            "exclude_last_activity_patterns": ["/api/status"],
            "raw_socket_proxy": False,
        },
    )
    assert process.timeout == 10.0
    assert process.launcher.title == "app"  # filled from the name
    assert process.launcher.path_info == "app/"
    assert process.launcher.category == "Other"
    assert process.launcher.enabled is False
    assert process.exclude_last_activity_patterns[0].match("/api/status")


def test_defaults_match_jupyter_server_proxy() -> None:
    process = make_server_process("web", {})
    assert process.command == []
    assert process.timeout == 5.0
    assert process.absolute_url is False
    assert process.port == 0
    assert process.unix_socket is None
    assert process.new_browser_tab is True
    assert process.update_last_activity is True
    assert process.launcher.enabled is True
    assert process.launcher.category == "Notebook"
    assert ServerProxy().host_allowlist == ["localhost", "127.0.0.1"]


def test_a_server_process_instance_is_accepted() -> None:
    given = ServerProcess(command=["x"])
    proxy = ServerProxy(servers={"named": given})
    assert collect_servers_without_entry_points(proxy)["named"].name == "named"


def collect_servers_without_entry_points(proxy: ServerProxy) -> dict[str, ServerProcess]:
    proxy.load_entry_points = False
    return collect_servers(proxy)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"comand": ["x"]}, "server 'web': unknown option 'comand' (did you mean 'command'?)"),
        ({"timeout": "soon"}, "server 'web': option 'timeout':"),
        ({"command": "python -m http.server"}, "server 'web': option 'command':"),
        ({"launcher_entry": {"titel": "x"}}, "unknown launcher_entry option 'titel'"),
        ({"restart": "sometimes"}, "server 'web': option 'restart':"),
        ({"exclude_last_activity_patterns": ["("]}, "invalid regular expression"),
    ],
)
def test_config_errors_name_the_server_and_option(settings: dict, message: str) -> None:
    # strict: unknown keys are errors too (by default a warning: tests/test_tolerant_config.py)
    with pytest.raises(ConfigError) as info:
        make_server_process("web", settings, strict=True)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["", "a/b", "proxy", "server-proxy", ".."])
def test_bad_server_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        collect_servers_without_entry_points(ServerProxy(servers={name: {}}))


def test_templates_and_callables_get_the_arguments_they_name() -> None:
    variables = {"port": 8123, "unix_socket": "", "base_url": "/user/a/"}
    assert expand_list(["serve", "--port={port}", "{{literal}}"], variables) == [
        "serve",
        "--port=8123",
        "{literal}",
    ]
    assert expand_list(lambda port: ["serve", str(port)], variables) == ["serve", "8123"]
    assert expand_dict(lambda base_url, port: {"URL": base_url + str(port)}, variables) == {
        "URL": "/user/a/8123"
    }
    assert call_with_asked_args(lambda: 1, variables) == 1
    with pytest.raises(TemplateError, match="asks for 'nope'"):
        call_with_asked_args(lambda nope: 1, variables)
    with pytest.raises(TemplateError, match="cannot expand"):
        expand_list(["{unknown}"], variables)


def write_package(site: Path, dist: str, module: str, body: str, entry_points: dict[str, str]) -> None:
    """A real installed distribution: a module plus its dist-info with entry_points.txt."""
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[jupyter_serverproxy_servers]\n{lines}")
    (info / "RECORD").write_text("")


def test_entry_point_servers_are_loaded_and_broken_ones_skipped(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    write_package(
        site,
        "good_proxy",
        "good_proxy",
        """
        def setup():
            return {"command": ["good", "{port}"], "launcher_entry": {"title": "Good"}}
        """,
        {"good": "good_proxy:setup"},
    )
    write_package(
        site,
        "raising_proxy",
        "raising_proxy",
        """
        def setup():
            raise RuntimeError("this package is broken")
        """,
        {"raising": "raising_proxy:setup"},
    )
    write_package(site, "missing_proxy", "missing_shim", "", {"missing": "not_a_module:setup"})
    write_package(
        site,
        "invalid_proxy",
        "invalid_proxy",
        """
        def setup():
            return {"comand": ["typo"]}
        """,
        {"invalid": "invalid_proxy:setup"},
    )
    script = textwrap.dedent(
        """
        import json, logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from trioproxy.config import ServerProxy, collect_servers
        servers = collect_servers(ServerProxy(servers={"mine": {"command": ["x"]}}))
        print(json.dumps({n: s.launcher.title for n, s in servers.items()}))
        """
    )
    result = subprocess.run(
        [PY, "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert json.loads(result.stdout) == {"good": "Good", "mine": "mine"}
    assert "skipping server 'raising'" in result.stderr
    assert "this package is broken" in result.stderr
    assert "skipping server 'missing'" in result.stderr
    # Its typo is a warning; left without a command, it has nothing to start: no route.
    source = "entry point 'invalid = invalid_proxy:setup' of invalid_proxy 1.0"
    assert f"server 'invalid': unknown option 'comand' (did you mean 'command'?) in {source}" in result.stderr
    assert f"server 'invalid' in {source} has no command, port or unix_socket path" in result.stderr


def test_launcher_entry_instance() -> None:
    entry = LauncherEntry(title="T", path_info="x/")
    process = make_server_process("web", {"launcher_entry": entry})
    assert process.launcher.title == "T"
