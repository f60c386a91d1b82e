"""Every option that can be wrong is refused when loaded, for that server alone: the rules
(pure), what a server with a bad value answers on a real trioproxy (HTTP and WebSocket), values
that callables produce at start or request time, and rewrite_response results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import PY, TOKEN, ProxyProcess, echo_command, launch_trioproxy, start_proxy, wait_for
from tests.test_websocket_fastpath import proxy_port, raw_handshake
from trioproxy.config import (
    ConfigError,
    ServerOptionError,
    ServerProxy,
    collect_servers,
    load_server,
    make_server_process,
)
from trioproxy.options import (
    MAX_SOCKET_PATH,
    OptionError,
    check_environment,
    check_header,
    header_name_problem,
    header_value_problem,
)

pytestmark = pytest.mark.timeout(90)


# -- the rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["X Who", "X\0Who", "Äpfel", "X:Who", "", "X\r\nY", "X(Who)", "X\tWho"])
def test_header_names_must_be_tokens(name: str) -> None:
    assert header_name_problem(name) is not None


@pytest.mark.parametrize("name", ["X-Who", "x_who", "X.Who~1", "!#$%&'*+-.^_`|~"])
def test_tokens_are_header_names(name: str) -> None:
    assert header_name_problem(name) is None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("a\0b", "NUL"),
        ("a\rb", "line break"),
        ("a\nb", "line break"),
        ("a\x0bb", "control character"),
        ("a\x0cb", "control character"),
        ("a\x01b", "control character"),
        ("a\x7fb", "control character"),
        ("caf\u20ac", "beyond latin-1"),
        (" padded", "whitespace"),
        ("padded\t", "whitespace"),
    ],
)
def test_header_values_must_be_field_values(value: str, why: str) -> None:
    problem = header_value_problem("X-Who", value)
    assert problem is not None and why in problem


@pytest.mark.parametrize("value", ["", "plain", "a\tb c", "caf\u00e9 (obs-text, sent as latin-1)", "{}[]\"'"])
def test_field_values_pass(value: str) -> None:
    assert header_value_problem("X-Who", value) is None


@pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding", "Connection", "Upgrade", "TE"])
def test_framing_and_connection_headers_cannot_be_overridden(name: str) -> None:
    with pytest.raises(OptionError, match="set by trioproxy"):
        check_header("request_headers_override", name, "1")


@pytest.mark.parametrize("environment", [{"A=B": "1"}, {"": "1"}, {"A\0": "1"}, {"A": "1\0"}, {"A": "\ud800"}])
def test_environment_entries_the_os_cannot_take(environment: dict[str, str]) -> None:
    with pytest.raises(OptionError, match="option 'environment'"):
        check_environment(environment)


@pytest.mark.parametrize(
    ("settings", "option", "detail"),
    [
        ({"command": ["serve", "a\0b"]}, "command", "item 1 'a\\x00b' contains a NUL character"),
        ({"command": ["serve", "{prot}"]}, "command", "cannot expand '{prot}'"),
        ({"command": ["x"], "cwd": "/tmp\0"}, "cwd", "NUL"),
        ({"command": ["x"], "unix_socket": "/tmp/s\0"}, "unix_socket", "NUL"),
        ({"command": ["x"], "unix_socket": "/" + "s" * MAX_SOCKET_PATH}, "unix_socket", "longer than"),
        ({"command": ["x"], "environment": {"A=B": "1"}}, "environment", "contains '='"),
        ({"command": ["x"], "environment": {"A": "{nope}"}}, "environment", "cannot expand"),
        ({"command": ["x"], "environment": {"A": "a\0"}}, "environment", "NUL"),
        ({"timeout": -1}, "timeout", "above 0, got -1"),
        ({"timeout": 0}, "timeout", "above 0, got 0"),
        ({"timeout": math.nan}, "timeout", "got nan"),
        ({"timeout": math.inf}, "timeout", "more than ten years"),
        ({"timeout": 86400 * 365 * 11}, "timeout", "more than ten years"),
        ({"stop_timeout": -0.5}, "stop_timeout", "0 or more"),
        ({"idle_timeout": -1}, "idle_timeout", "0 or more"),
        ({"backoff_max": math.nan}, "backoff_max", "nan"),
        ({"connect_timeout": 0}, "connect_timeout", "above 0"),
        ({"response_timeout": -1}, "response_timeout", "above 0"),
        ({"port": -1}, "port", "from 0 to 65535"),
        ({"port": 70000}, "port", "from 0 to 65535"),
        ({"max_connections": 0}, "max_connections", "at least 1"),
        ({"max_failures": -1}, "max_failures", "at least 0"),
        ({"websocket_keepalive": 0.01}, "websocket_keepalive", "0 (off) or at least 0.1 s"),
        ({"websocket_keepalive": -1}, "websocket_keepalive", "0 or more"),
        ({"health_check": {"interval": math.nan}}, "health_check", "nan"),
        ({"health_check": {"timeout": 1e12}}, "health_check", "ten years"),
        ({"health_check": {"path": "/\x00"}}, "health_check", "not a request path"),
        ({"request_headers_override": {"X Who": "me"}}, "request_headers_override", "a space"),
        ({"request_headers_override": {"X\0": "me"}}, "request_headers_override", "NUL"),
        ({"request_headers_override": {"Äpfel": "1"}}, "request_headers_override", "non-ASCII"),
        ({"request_headers_override": {"X-Who": "a\x0bb"}}, "request_headers_override", "control character"),
        ({"request_headers_override": {"X-Who": "a\0b"}}, "request_headers_override", "NUL"),
        ({"request_headers_override": {"X-Who": "{prot}"}}, "request_headers_override", "cannot expand"),
        ({"request_headers_override": {"Content-Length": "0"}}, "request_headers_override", "set by trioproxy"),
        ({"ready_check_path": "/a\x01b"}, "ready_check_path", "not a request path"),
    ],
)
def test_values_that_cannot_work_name_the_server_and_option(settings: dict[str, Any], option: str, detail: str) -> None:
    with pytest.raises(ServerOptionError) as info:
        make_server_process("web", settings)
    message = str(info.value)
    assert message.startswith(f"server 'web': option {option!r}: ")
    assert detail in message
    assert "\n" not in message
    assert (info.value.server, info.value.option) == ("web", option)


def test_a_unix_socket_naming_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ServerOptionError, match="is a directory"):
        make_server_process("web", {"command": ["x"], "unix_socket": str(tmp_path)})
    # A socket in a directory that does not exist yet is the server's to create (as with
    # jupyter-server-proxy, which passes the path on unchecked): no error here.
    make_server_process("web", {"command": ["x"], "unix_socket": str(tmp_path / "later" / "socket")})


@pytest.mark.parametrize(
    ("option", "value"),
    [("graceful_timeout", math.nan), ("graceful_timeout", -1), ("body_timeout", 0), ("port", 70000), ("max_body_size", -1), ("websocket_max_message_size", 0)],
)
def test_trioproxys_own_options(option: str, value: Any) -> None:
    from trioproxy.cli import TrioProxy
    from trioproxy.options import check_app_options

    app = TrioProxy()
    check_app_options(app)  # the defaults pass
    setattr(app, option, value)
    with pytest.raises(OptionError, match=f"option {option!r}: "):
        check_app_options(app)


def test_good_values_pass() -> None:
    process = make_server_process(
        "web",
        {
            "command": ["serve", "--port={port}", "{{literal}}"],
            "environment": {"BASE": "{base_url}", "EMPTY": ""},
            "request_headers_override": {"X-Port": "{port}", "X-Text": "caf\u00e9 \t ok"},
            "timeout": 0.001,
            "stop_timeout": 0,
            "idle_timeout": 0,
            "port": 65535,
        },
    )
    assert process.config_error is None


def test_a_bad_value_fails_that_server_and_a_bad_file_fails_the_load() -> None:
    proxy = ServerProxy(
        servers={"bad": {"command": ["x"], "timeout": -1}, "good": {"command": ["x"]}}, load_entry_points=False
    )
    servers = collect_servers(proxy)
    assert servers["good"].config_error is None
    assert servers["bad"].config_error == "option 'timeout': must be a number of seconds above 0, got -1.0; fix the configuration and reload"
    # A value of the wrong type fails that server too.
    servers = collect_servers(ServerProxy(servers={"bad": {"timeout": "soon"}, "good": {"port": 1}}, load_entry_points=False))
    assert servers["good"].config_error is None
    assert servers["bad"].config_error is not None and servers["bad"].config_error.startswith("option 'timeout': ")
    # With strict_config, an unknown option: the file is not what was meant.
    with pytest.raises(ConfigError) as info:
        collect_servers(ServerProxy(servers={"bad": {"comand": ["x"]}, "good": {}}, load_entry_points=False, strict_config=True))
    assert not isinstance(info.value, ServerOptionError)


# -- a real trioproxy ----------------------------------------------------------------------------

BAD = {
    "spaced-header": ({"request_headers_override": {"X Who": "me"}}, "request_headers_override"),
    "nul-command": ({"command": [PY, "-c", "pass\0"]}, "command"),
    "negative-timeout": ({"timeout": -1}, "timeout"),
    "equals-env": ({"environment": {"A=B": "1"}}, "environment"),
}


def test_trioproxy_starts_with_bad_servers_that_answer_with_their_error(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    servers: dict[str, Any] = {name: {"command": echo_command(), **settings} for name, (settings, _) in BAD.items()}
    servers["good"] = {"command": echo_command()}
    servers["dir-socket"] = {"command": echo_command(unix=True), "unix_socket": str(tmp_path)}
    config = tmp_path / "config.py"
    config.write_text(f"c.ServerProxy.servers = {servers!r}\n")
    proxy = launch_trioproxy(["--port", "0", "--token", "t", "--config", str(config)])
    proxy_processes.append(proxy)
    expected = {name: option for name, (_, option) in BAD.items()} | {"dir-socket": "unix_socket"}
    with httpx.Client(base_url=proxy.base, headers={"Authorization": "token t"}, timeout=30) as client:
        for name, option in expected.items():
            response = client.get(f"{name}/")
            assert response.status_code == 503, (name, response.text)
            message = response.json()["message"]
            assert message.startswith(f"server {name!r}: option {option!r}: "), message
            listed = {s["name"]: s for s in client.get("server-proxy/api/servers").json()["servers"]}
            assert listed[name]["state"] == "failed" and f"option {option!r}" in listed[name]["reason"]
            assert client.get("good/").status_code == 200
        port = int(proxy.base.split(":")[2].split("/")[0])
        assert _websocket_status(port, "spaced-header/echo") == 503
    assert proxy.process.poll() is None
    output = proxy.output()
    assert "server 'spaced-header': option 'request_headers_override': header name 'X Who' contains a space" in output
    assert "Traceback" not in output


def _websocket_status(port: int, path: str) -> int:
    async def handshake() -> int:
        stream, head, _ = await raw_handshake(port, path, "Authorization: token t")
        await stream.aclose()
        return int(head.split(b" ")[1])

    return trio.run(handshake)


# -- values produced by callables ------------------------------------------------------------------


def _nul_command(port: int) -> list[str]:
    return [PY, "-c", "pass\0", str(port)]


def _equals_environment() -> dict[str, str]:
    return {"A=B": "1"}


def _vertical_tab_header(port: int) -> dict[str, str]:
    return {"X-Port": f"{port}\x0b"}


async def test_values_from_callables_are_checked_before_use(nursery: trio.Nursery) -> None:
    servers: dict[str, dict[str, Any]] = {
        "cmd": {"command": _nul_command, "max_failures": 1},
        "env": {"command": echo_command(), "environment": _equals_environment, "max_failures": 1},
        "hdr": {"command": echo_command(), "request_headers_override": _vertical_tab_header},
        "good": {"command": echo_command()},
    }
    proxy = await start_proxy(nursery, servers)
    expected = {
        "cmd": "server 'cmd': option 'command': item 2 'pass\\x00' contains a NUL character",
        "env": "server 'env': option 'environment': the name 'A=B' is empty or contains '='",
    }
    async with proxy.client() as client:
        for name, message in expected.items():
            response = await client.get(f"{name}/")
            assert response.status_code == 503
            assert response.json()["message"].startswith(message)
            status = (await client.get(f"server-proxy/api/servers/{name}")).json()
            assert status["state"] == "failed" and "option " in status["reason"]
        response = await client.get("hdr/")
        assert response.status_code == 500
        assert "option 'request_headers_override': header 'X-Port': the value contains the control character '\\x0b'" in response.json()["message"]
        assert (await client.get("good/")).status_code == 200
    # The fast path builds the same request: the WebSocket upgrade is refused the same way.
    stream, head, _ = await raw_handshake(proxy_port(proxy.url), "hdr/echo", f"Authorization: token {TOKEN}")
    await stream.aclose()
    assert head.startswith(b"HTTP/1.1 500")


async def test_a_socket_path_that_became_a_directory_fails_the_start(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "socket"
    proxy = await start_proxy(
        nursery, {"web": {"command": echo_command(unix=True), "unix_socket": str(path), "max_failures": 1}}
    )
    path.mkdir()  # after the configuration was loaded, before the first start
    async with proxy.client() as client:
        response = await client.get("web/")
        assert response.status_code == 503
        assert "option 'unix_socket': the path" in response.json()["message"] and "is a directory" in response.json()["message"]
        path.rmdir()
        assert (await client.post("server-proxy/api/servers/web/start")).status_code == 200
        assert (await client.get("web/")).status_code == 200


# -- rewrite_response ----------------------------------------------------------------------------


def switch_protocols(response: Any) -> None:
    response.code = 101


def not_a_status(response: Any) -> None:
    response.code = 1000


def header_with_line_break(response: Any) -> None:
    response.headers["X-Bad"] = "a\r\nInjected: 1"


def body_of_a_dict(response: Any) -> None:
    response.body = {"not": "bytes"}


def raises(response: Any) -> None:
    raise RuntimeError("rewriter broke")


@pytest.mark.parametrize(
    ("rewrite", "detail"),
    [
        (switch_protocols, "switch_protocols set the status to 101; a final response needs 200 to 599"),
        (not_a_status, "not_a_status set the status to 1000"),
        (header_with_line_break, "header_with_line_break set header 'X-Bad': the value contains a line break"),
        (body_of_a_dict, "body_of_a_dict set the body to a dict"),
        (raises, "raises raised RuntimeError: rewriter broke"),
    ],
)
async def test_a_rewrite_that_leaves_an_unsendable_response_is_a_500_naming_it(
    nursery: trio.Nursery, rewrite: Any, detail: str
) -> None:
    servers = {
        "web": {"command": echo_command(), "rewrite_response": [rewrite]},
        "plain": {"command": echo_command()},
    }
    proxy = await start_proxy(nursery, servers)
    async with proxy.client() as client:
        response = await client.get("web/")
        assert response.status_code == 500
        assert "the rewrite_response callable tests.test_option_validation." + detail in response.json()["message"]
        assert "Injected" not in response.headers
        again = await client.get("web/")  # the connection and the server are fine
        assert again.status_code == 500
        assert json.loads((await client.get("plain/")).text)["method"] == "GET"


async def test_supervisor_keeps_running_when_every_server_is_bad(nursery: trio.Nursery) -> None:
    servers = {name: load_server(name, {"command": echo_command(), **settings}) for name, (settings, _) in BAD.items()}
    proxy = await start_proxy(nursery, servers)  # type: ignore[arg-type]
    await wait_for(lambda: all(proxy.supervisors[name].state.value == "failed" for name in BAD))
    async with proxy.client() as client:
        for name in BAD:
            assert (await client.get(f"{name}/")).status_code == 503
            assert (await client.post(f"server-proxy/api/servers/{name}/start")).status_code == 503


async def test_a_socket_that_cannot_be_prepared_or_a_cwd_the_os_refuses_fails_that_start(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    servers = {
        "sock": {"command": echo_command(unix=True), "unix_socket": str(not_a_directory / "socket"), "max_failures": 1},
        "cwd": {"command": echo_command(), "max_failures": 1},
        "good": {"command": echo_command()},
    }
    proxy = await start_proxy(nursery, servers)
    # Set after loading (which refuses it), so that the start itself meets it: trio.Process
    # raises ValueError for a NUL, which must fail the start like an OSError does.
    proxy.supervisors["cwd"].process.cwd = str(tmp_path) + "\0"
    async with proxy.client() as client:
        response = await client.get("sock/")
        assert response.status_code == 503
        assert response.json()["message"].startswith("server 'sock': option 'unix_socket': cannot clear ")
        assert response.json()["message"].endswith("socket': Not a directory")
        response = await client.get("cwd/")
        assert response.status_code == 503
        assert "ValueError" in response.json()["message"] and "null" in response.json()["message"]
        assert (await client.get("good/")).status_code == 200


def test_a_bad_option_of_trioproxys_own_stops_the_command_with_one_line() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "trioproxy", "--port", "0", "--TrioProxy.graceful_timeout=nan"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "graceful_timeout" in result.stderr and "Traceback" not in result.stderr + result.stdout
