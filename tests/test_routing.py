"""Which route a path takes (trioproxy.routing): pure, no sockets."""

from __future__ import annotations

import pytest

from trioproxy.routing import resolve

SERVERS = {"loginx", "logout-tool", "oauth_callbacks", "server-proxyx", "web"}


@pytest.mark.parametrize("name", sorted(SERVERS))
@pytest.mark.parametrize("base_url", ["/", "/base/"])
def test_servers_named_like_an_own_route_are_servers(name: str, base_url: str) -> None:
    route = resolve(f"{base_url}{name}/x".encode(), base_url, SERVERS)
    assert (route.kind, route.name, route.upstream_path) == ("server", name, b"/x")
    assert resolve(f"{base_url}{name}".encode(), base_url, SERVERS).kind == "add-slash"


@pytest.mark.parametrize(
    "path, app_path",
    [
        ("login", "login"),
        ("login/", "login/"),
        ("logout", "logout"),
        ("oauth_callback", "oauth_callback"),
        ("server-proxy", "server-proxy"),
        ("server-proxy/api/servers", "server-proxy/api/servers"),
        ("%6Cogin", "login"),
        ("", ""),
    ],
)
def test_own_routes_are_matched_by_whole_segment(path: str, app_path: str) -> None:
    route = resolve(f"/base/{path}".encode(), "/base/", SERVERS)
    assert (route.kind, route.app_path) == ("app", app_path)


@pytest.mark.parametrize("path", ["loginz", "logout-other/", "server-proxyy/api"])
def test_near_misses_without_such_a_server_are_not_found(path: str) -> None:
    route = resolve(f"/{path}".encode(), "/", SERVERS)
    assert route.kind == "not-found"
    assert route.reason.startswith("no server named")


def test_a_standalone_server_gets_near_misses_but_not_own_routes() -> None:
    assert resolve(b"/loginx", "/", set(), root_server="root").kind == "server"
    assert resolve(b"/login", "/", set(), root_server="root").kind == "app"
