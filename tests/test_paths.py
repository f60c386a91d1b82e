"""Servers at paths of their own (trioproxy.paths, routing): the grammar, the overlap rule,
the table routing uses, and what the configuration does with clashes. Pure, no sockets;
tests/test_public_urls.py runs the same with real processes."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from trioproxy.config import ConfigError, ServerOptionError, ServerProxy, collect_servers, make_server_process
from trioproxy.options import OptionError
from trioproxy.paths import PathTable, find_clashes, overlaps, parse_path, server_path
from trioproxy.routing import alias_location, resolve


def table(**servers: dict[str, Any]) -> PathTable:
    return PathTable(make_server_process(name, {"command": ["x"], **options}) for name, options in servers.items())


@pytest.mark.parametrize(
    "value, segments",
    [
        ("tools/refine", ("tools", "refine")),
        ("/tools/refine/", ("tools", "refine")),
        ("dask/dashboards/1", ("dask", "dashboards", "1")),
        ("a-b.c_d~e!$&'()*+,;=:@", ("a-b.c_d~e!$&'()*+,;=:@",)),
        ("api/x", ("api", "x")),  # only "api" alone is trioproxy's
        ("proxyx", ("proxyx",)),
        ("...", ("...",)),
    ],
)
def test_paths_that_are_accepted(value: str, segments: tuple[str, ...]) -> None:
    assert parse_path("path", value) == segments


@pytest.mark.parametrize(
    "value, why",
    [
        ("", "empty"),
        ("/", "empty"),
        ("//", "empty"),
        ("a//b", "empty segment"),
        ("//evil.example", "empty segment"),
        ("a/../server-proxy", "'..' segment"),
        ("./a", "'.' segment"),
        ("a/.", "'.' segment"),
        ("%73erver-proxy/api", "percent-encoded"),
        ("tools%2Frefine", "percent-encoded"),
        ("a%2e%2e", "percent-encoded"),
        ("a b", "contains ' '"),
        ("a?b", "contains '?'"),
        ("a#b", "contains '#'"),
        ("a\\b", "contains '\\\\'"),
        ("a\nb", "contains '\\n'"),
        ("caf\u00e9", "contains"),
        ("server-proxy", "own route 'server-proxy/'"),
        ("server-proxy/api/servers", "own route 'server-proxy/'"),
        ("proxy/8050", "own route 'proxy/'"),
        ("login", "own route 'login/'"),
        ("logout/x", "own route 'logout/'"),
        ("oauth_callback", "own route 'oauth_callback/'"),
        ("api", "own route (its version)"),
        ("/api/", "own route (its version)"),
    ],
)
def test_paths_that_are_refused(value: str, why: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_path("path", value)
    assert why in caught.value.detail


def test_a_bad_path_or_alias_fails_its_server_naming_the_option() -> None:
    with pytest.raises(ServerOptionError, match=r"server 'x': option 'path': 'server-proxy/api' is under"):
        make_server_process("x", {"command": ["a"], "path": "server-proxy/api"})
    with pytest.raises(ServerOptionError, match=r"option 'aliases': 'a/\.\./b' has a '\.\.' segment"):
        make_server_process("x", {"command": ["a"], "aliases": ["ok", "a/../b"]})
    with pytest.raises(ServerOptionError, match=r"option 'path'.*not a valid|option 'path'.*string|option 'path'"):
        make_server_process("x", {"command": ["a"], "path": 5})


def test_an_alias_may_not_overlap_its_own_path() -> None:
    # It would redirect to itself for ever (tools/x -> tools/refine/x -> tools/refine/refine/x...).
    with pytest.raises(ServerOptionError, match=r"alias 'tools' overlaps path 'tools/refine' of the same server"):
        make_server_process("x", {"command": ["a"], "path": "tools/refine", "aliases": ["tools"]})
    with pytest.raises(ServerOptionError, match=r"alias 'x' overlaps path 'x'"):
        make_server_process("x", {"command": ["a"], "aliases": ["x"]})


def test_overlap_is_by_whole_segments() -> None:
    assert overlaps(("tools",), ("tools", "refine"))
    assert overlaps(("tools", "refine"), ("tools", "refine"))
    assert not overlaps(("tool",), ("tools", "refine"))
    assert not overlaps(("tools", "a"), ("tools", "b"))


def test_the_launchers_default_follows_the_path_but_not_an_explicit_one() -> None:
    process = make_server_process("refine", {"command": ["a"], "path": "tools/refine"})
    assert process.launcher.path_info == "tools/refine/"
    assert server_path(process) == "tools/refine"
    own = make_server_process("refine", {"command": ["a"], "path": "tools/refine", "launcher_entry": {"path_info": "tools/refine/?x=1"}})
    assert own.launcher.path_info == "tools/refine/?x=1"
    named = make_server_process("a b", {"command": ["a"]})
    assert (named.launcher.path_info, server_path(named)) == ("a b/", "a%20b")


# -- routing ---------------------------------------------------------------------------------


def test_a_server_is_routed_at_its_path_and_no_longer_at_its_name() -> None:
    paths = table(refine={"path": "tools/refine"}, other={})
    route = resolve(b"/base/tools/refine/x/y", "/base/", paths)
    assert (route.kind, route.name, route.upstream_path, route.context_path) == (
        "server", "refine", b"/x/y", "/base/tools/refine"
    )
    assert resolve(b"/base/tools/refine", "/base/", paths).kind == "add-slash"
    assert resolve(b"/base/refine/x", "/base/", paths).kind == "not-found"
    assert resolve(b"/base/tools/x", "/base/", paths).kind == "not-found"
    assert resolve(b"/base/other/x", "/base/", paths).name == "other"


@pytest.mark.parametrize(
    "raw",
    [
        b"/tools%2Frefine/x",  # one segment, which is no path
        b"/tools/./refine/x",
        b"/tools//refine/x",
        b"//tools/refine/x",
        b"/tools/refine%2Fx",  # "refine/x" is not "refine"
        b"/Tools/refine/x",  # paths are case-sensitive, as URLs are
    ],
)
def test_spellings_that_are_not_the_path(raw: bytes) -> None:
    assert resolve(raw, "/", table(refine={"path": "tools/refine"})).kind == "not-found"


def test_escaped_characters_that_need_no_escape_still_match() -> None:
    # RFC 3986 §6.2.2.2: %72 is "r"; the backend still gets the rest as sent.
    route = resolve(b"/tools/%72efine/a%2Fb", "/", table(refine={"path": "tools/refine"}))
    assert (route.kind, route.upstream_path) == ("server", b"/a%2Fb")


def test_own_routes_come_first_whatever_the_table_says() -> None:
    paths = table(refine={"path": "tools/refine"})
    for own in (b"/server-proxy/api/servers", b"/login", b"/api", b"/%73erver-proxy/api/servers"):
        assert resolve(own, "/", paths).kind == "app"
    assert resolve(b"/proxy/8050/", "/", paths).kind == "proxy"


def test_an_alias_redirects_keeping_the_rest_and_the_query() -> None:
    paths = table(refine={"path": "tools/refine", "aliases": ["refine", "old/place"]})
    route = resolve(b"/u/old/place/a%20b/c", "/u/", paths)
    assert (route.kind, route.name, route.redirect) == ("alias", "refine", "/u/tools/refine/")
    assert alias_location(route, b"q=1&r=%2F") == "/u/tools/refine/a%20b/c?q=1&r=%2F"
    assert alias_location(resolve(b"/u/refine", "/u/", paths), b"") == "/u/tools/refine/"
    assert alias_location(resolve(b"/u/refine/", "/u/", paths), b"") == "/u/tools/refine/"
    # An empty segment after the alias stays below the server's prefix, never "//host".
    assert alias_location(resolve(b"/u/refine//evil.example/", "/u/", paths), b"") == "/u/tools/refine//evil.example/"


def test_names_still_route_as_before_through_the_table() -> None:
    paths = table(**{"a b": {}, "app:1": {}, "caf\u00e9": {}})
    assert resolve(b"/a%20b/x", "/", paths).name == "a b"
    assert resolve(b"/app:1/x", "/", paths).context_path == "/app:1"
    assert resolve("/caf%C3%A9/x".encode(), "/", paths).name == "caf\u00e9"
    assert "a b" in paths and "nope" not in paths


def test_a_root_server_gets_what_no_path_takes() -> None:
    paths = table(refine={"path": "tools/refine"})
    assert resolve(b"/tools/refine/x", "/", paths, root_server="app").name == "refine"
    assert resolve(b"/tools/x", "/", paths, root_server="app").name == "app"


def test_a_server_without_a_route_is_not_in_the_table() -> None:
    process = make_server_process("refine", {"command": ["a"], "path": "tools/refine"})
    process.routed = False
    assert resolve(b"/tools/refine/x", "/", PathTable([process])).kind == "not-found"


# -- clashes ---------------------------------------------------------------------------------


def processes(**servers: dict[str, Any]) -> list[Any]:
    return [make_server_process(name, {"command": ["x"], **options}) for name, options in servers.items()]


@pytest.mark.parametrize(
    "servers, refused, why",
    [
        ({"a": {"path": "tools"}, "b": {"path": "tools"}}, "b", "its path 'tools' is the same as the path 'tools' of server 'a'"),
        ({"tools": {}, "b": {"path": "tools/refine"}}, "b", "its path 'tools/refine' overlaps the path 'tools' of server 'tools'"),
        ({"a": {"path": "tools/refine"}, "b": {"path": "tools"}}, "b", "its path 'tools' overlaps the path 'tools/refine' of server 'a'"),
        ({"a": {"aliases": ["old"]}, "old": {}}, "old", "its path 'old' is the same as the alias 'old' of server 'a'"),
        ({"a": {}, "b": {"aliases": ["a/x"]}}, "b", "its alias 'a/x' overlaps the path 'a' of server 'a'"),
    ],
)
def test_clashes_name_both_servers(servers: dict[str, Any], refused: str, why: str) -> None:
    assert find_clashes(processes(**servers)) == {refused: why}


def test_no_clash_between_paths_that_only_share_characters() -> None:
    assert find_clashes(processes(a={"path": "tool"}, b={"path": "tools/refine"}, c={"path": "tools/other"})) == {}


def test_a_clashing_server_is_a_stand_in_without_a_url(caplog: pytest.LogCaptureFixture) -> None:
    proxy = ServerProxy(load_entry_points=False, servers={"a": {"command": ["x"], "path": "tools"}, "b": {"command": ["y"], "path": "tools/b"}})
    with caplog.at_level(logging.ERROR, "trioproxy.config"):
        servers = collect_servers(proxy, source="config file c.py")
    assert servers["a"].config_error is None and servers["a"].routed
    assert not servers["b"].routed
    assert "overlaps the path 'tools' of server 'a'" in (servers["b"].config_error or "")
    assert "server 'b' in config file c.py: its path 'tools/b' overlaps the path 'tools' of server 'a'" in caplog.text


def test_with_strict_config_a_clash_refuses_the_configuration() -> None:
    proxy = ServerProxy(
        load_entry_points=False, strict_config=True, servers={"a": {"command": ["x"]}, "b": {"command": ["y"], "path": "a"}}
    )
    with pytest.raises(ConfigError, match=r"server 'b' in the configuration: its path 'a' is the same as the path 'a' of server 'a'"):
        collect_servers(proxy)
