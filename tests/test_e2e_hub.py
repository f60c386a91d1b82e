"""trioproxy under a real JupyterHub (README "Under JupyterHub").

JupyterHub with configurable-http-proxy (from npm), DummyAuthenticator and the simple local
spawner, whose single-user server is trioproxy in standalone mode: alice logs in through the
Hub, her server is spawned, the Hub's OAuth lets her (and only her) in, WebSockets pass the
Hub's proxy, and trioproxy reports activity to the Hub. Then what admins meet next: the Hub
finds trioproxy's version header at the spawn, a named server, a JupyterHub 5 share from alice
to bob (and its revocation, within trioproxy's re-check interval), and a group grant
(``access:servers!group=staff`` for carol, alice being in staff).

The spawned trioproxy is the one under test (PYTHONPATH in the Spawner's environment).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import trioproxy

from .conftest import BACKENDS, pid_alive
from .e2e_helpers import (
    VENV_BIN,
    Service,
    answers,
    clean_env,
    free_port,
    marked_pids,
    new_marker,
    services_cleaned_up,
    start_service,
    wait_until,
)

pytestmark = [
    pytest.mark.e2e,
    # Skipped where configurable-http-proxy is missing, never in CI (CI=true), where .ci/run installs it.
    pytest.mark.skipif(
        shutil.which("configurable-http-proxy") is None and not os.environ.get("CI"),
        reason="configurable-http-proxy is not installed (npm install -g configurable-http-proxy; .ci/run does)",
    ),
]

PASSWORD = "e2e-password"
SERVICE_TOKEN = secrets.token_hex(16)
ACTIVITY_INTERVAL = 1  # seconds between trioproxy's activity reports
RECHECK = 1  # seconds trioproxy trusts the Hub's word on a token (--TrioProxy.hub_cache_max_age)


@dataclass
class Hub:
    url: str  # the public address (configurable-http-proxy), no trailing slash
    tmp: Path  # the Hub's files; users' homes in home/
    marker: str
    service: Service

    def proxy_pid(self) -> int | None:
        """configurable-http-proxy's pid, from the pid file the Hub writes."""
        try:
            return int((self.tmp / "proxy.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A call to the Hub's REST API as the test's admin service."""
        headers = {"Authorization": f"token {SERVICE_TOKEN}"}
        return httpx.request(method, f"{self.url}/hub/api{path}", headers=headers, timeout=30, **kwargs)

    def user(self, name: str) -> dict[str, Any]:
        return self.api("GET", f"/users/{name}").json()  # type: ignore[no-any-return]

    @contextmanager
    def browser(self, user: str) -> Iterator[httpx.Client]:
        """A client logged in to the Hub as ``user`` through its login form."""
        with httpx.Client(base_url=self.url, timeout=30, headers={"Accept": "text/html"}) as client:
            form = client.get("/hub/login")
            assert form.status_code == 200
            xsrf = client.cookies.get("_xsrf")
            assert xsrf, "the Hub's login page set no _xsrf cookie"
            response = client.post("/hub/login", data={"username": user, "password": PASSWORD, "_xsrf": xsrf})
            assert response.status_code == 302, response.text[:500]
            yield client

    def token_of(self, user: str) -> str:
        response = self.api("POST", f"/users/{user}/tokens", json={"note": "e2e"})
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    def log(self) -> str:
        return self.service.log()


def hub_config(tmp: Path, ports: dict[str, int], marker: str, ws_config: Path) -> str:
    """README's JupyterHub configuration, plus what a test needs (ports, files in tmp)."""
    settings = {
        "port": ports["proxy"],
        "hub_port": ports["hub"],
        "api_url": f"http://127.0.0.1:{ports['api']}",
        "tmp": str(tmp),
        "home": str(tmp / "home" / "{username}"),
        # A one-second re-check: a revoked share or group membership shows within the test.
        "args": [
            "--config", str(ws_config), f"--TrioProxy.hub_cache_max_age={RECHECK}",
            "--", "python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1",
        ],
        "environment": {
            "JUPYTERHUB_ACTIVITY_INTERVAL": str(ACTIVITY_INTERVAL),
            "TRIOPROXY_E2E": marker,
            # The trioproxy under test (a worktree's, not only the installed one).
            "PYTHONPATH": str(Path(trioproxy.__file__).resolve().parents[1]),
        },
        "token": SERVICE_TOKEN,
        "password": PASSWORD,
    }
    return "settings = " + json.dumps(settings) + "\n" + """
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = settings["port"]
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_port"]
c.ConfigurableHTTPProxy.api_url = settings["api_url"]
c.ConfigurableHTTPProxy.debug = True
c.ConfigurableHTTPProxy.pid_file = settings["tmp"] + "/proxy.pid"
c.JupyterHub.db_url = "sqlite:///" + settings["tmp"] + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = settings["tmp"] + "/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = settings["tmp"] + "/jupyterhub.pid"
# Activity must come from trioproxy, not from the Hub polling its proxy.
c.JupyterHub.last_activity_interval = 3600

c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = settings["password"]
c.Authenticator.allowed_users = {"alice", "bob", "carol"}
c.JupyterHub.allow_named_servers = True
# carol may use the servers of the staff group's members (alice): a group grant.
c.JupyterHub.load_groups = {"staff": {"users": ["alice"]}}

c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = settings["home"]
c.Spawner.cmd = ["trioproxy"]
c.Spawner.args = settings["args"]
c.Spawner.environment = settings["environment"]
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 60

# The test's own admin client.
c.JupyterHub.services = [{"name": "e2e", "api_token": settings["token"]}]
c.JupyterHub.load_roles = [
    {"name": "e2e-admin", "scopes": ["admin:users", "admin:servers", "tokens", "shares", "read:users:name", "groups"], "services": ["e2e"]},
    {"name": "staff-servers", "scopes": ["access:servers!group=staff"], "users": ["carol"]},
]
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("e2e-hub")
    marker = new_marker()
    ports = {"proxy": free_port(), "hub": free_port(), "api": free_port()}
    for user in ("alice", "bob", "carol"):
        (tmp / "home" / user).mkdir(parents=True)
    (tmp / "home" / "alice" / "hello.txt").write_text("hello from alice's home")
    ws_config = tmp / "ws_config.py"
    ws_config.write_text(
        "c.ServerProxy.servers = "
        + repr(
            {
                "ws": {"command": [sys.executable, str(BACKENDS / "ws_echo.py"), "{port}"]},
                "asker": {"command": [sys.executable, str(BACKENDS / "asks_url.py"), "{port}"], "path": "tools/asker"},
            }
        )
        + "\n"
    )
    config = tmp / "jupyterhub_config.py"
    config.write_text(hub_config(tmp, ports, marker, ws_config))
    env = clean_env(marker)
    with services_cleaned_up(marker) as services:
        service = start_service("jupyterhub", [str(VENV_BIN / "jupyterhub"), "-f", str(config)], env, tmp, tmp)
        services.append(service)
        url = f"http://127.0.0.1:{ports['proxy']}"
        wait_until(answers(f"{url}/hub/api", status=200), timeout=60, what="JupyterHub", services=(service,))
        hub = Hub(url, tmp, marker, service)
        try:
            yield hub
        finally:
            # Stopping, the Hub stops its proxy and the servers it spawned; whatever is left
            # still carries the marker and is ended by services_cleaned_up.
            proxy = hub.proxy_pid()
            service.stop(timeout=20)
            if proxy is not None and proxy in marked_pids(marker):
                os.kill(proxy, signal.SIGKILL)


@pytest.fixture(scope="module")
def alice_server(hub: Hub) -> dict[str, Any]:
    """alice's trioproxy, spawned through the Hub's API; her server's model once ready."""
    started = hub.api("POST", "/users/alice/server")
    assert started.status_code in (201, 202), started.text
    wait_until(
        lambda: bool((hub.user("alice")["servers"].get("") or {}).get("ready")),
        timeout=60, what="alice's server", services=(hub.service,), interval=0.1,
    )
    return hub.user("alice")["servers"][""]  # type: ignore[no-any-return]


def test_login_spawn_and_reach_the_app(hub: Hub, alice_server: dict[str, Any]) -> None:
    assert alice_server["url"] == "/user/alice/"
    with hub.browser("alice") as browser:
        page = browser.get("/user/alice/", follow_redirects=True)
        assert page.status_code == 200, hub.log()[-3000:]
        assert "Directory listing for /" in page.text and "hello.txt" in page.text
        # Through trioproxy's login, the Hub's OAuth authorization, and trioproxy's callback.
        hops = [urlpath(response.headers["location"]) for response in page.history]
        assert hops[:3] == ["/user/alice/login", "/hub/api/oauth2/authorize", "/user/alice/oauth_callback"], hops
        assert str(page.url) == f"{hub.url}/user/alice/"
        # Once in, trioproxy's session cookie is enough.
        assert len(session_cookies(browser)) == 1
        again = browser.get("/user/alice/hello.txt")
        assert again.status_code == 200 and again.text == "hello from alice's home"


def session_cookies(client: httpx.Client) -> list[str]:
    """trioproxy's session cookies (trioproxy-hub-<client>), not its OAuth state cookies."""
    return [c.name for c in client.cookies.jar if c.name.startswith("trioproxy-hub-") and "-oauth-" not in c.name]


def urlpath(location: str) -> str:
    return httpx.URL(location).path


def test_other_users_are_refused(hub: Hub, alice_server: dict[str, Any]) -> None:
    with hub.browser("bob") as browser:
        page = browser.get("/user/alice/", follow_redirects=True)
        # The Hub refuses to authorize bob for alice's server.
        assert page.status_code == 403
        # trioproxy gave him only the short-lived OAuth state cookie, no session.
        assert session_cookies(browser) == []
    # With a Hub token of his own, trioproxy itself refuses him (its scope check); alice's works.
    bob = httpx.get(f"{hub.url}/user/alice/hello.txt", headers={"Authorization": f"token {hub.token_of('bob')}"})
    assert bob.status_code == 403
    alice = httpx.get(f"{hub.url}/user/alice/hello.txt", headers={"Authorization": f"token {hub.token_of('alice')}"})
    assert alice.status_code == 200 and alice.text == "hello from alice's home"


async def test_websocket_through_the_hubs_proxy(hub: Hub, alice_server: dict[str, Any]) -> None:
    token = await trio.to_thread.run_sync(hub.token_of, "alice")
    url = hub.url.replace("http://", "ws://") + "/user/alice/ws/echo"
    headers = [(b"authorization", f"token {token}".encode()), (b"origin", hub.url.encode())]
    with trio.fail_after(30):
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message("through configurable-http-proxy")
            assert await ws.get_message() == "through configurable-http-proxy"
            await ws.send_message(b"\x01\x02")
            assert await ws.get_message() == b"\x01\x02"


def test_a_child_asks_its_url_with_the_servers_own_hub_token(hub: Hub, alice_server: dict[str, Any]) -> None:
    """README "Apps that know their public URL": the Hub's server token (its
    access:servers!server scope) lets a child ask trioproxy's API, at $JUPYTERHUB_SERVICE_URL."""
    alice = httpx.get(f"{hub.url}/user/alice/tools/asker/", headers={"Authorization": f"token {hub.token_of('alice')}"}, timeout=30)
    assert alice.status_code == 200, alice.text
    seen = alice.json()
    assert seen["prefix"] == "/user/alice/tools/asker/"
    assert (seen["answer"]["server"], seen["answer"]["url"]) == ("asker", "/user/alice/tools/asker/")


def test_activity_is_reported_to_the_hub(hub: Hub, alice_server: dict[str, Any]) -> None:
    def server_activity() -> datetime:
        return parse_time(hub.user("alice")["servers"][""]["last_activity"])

    token = hub.token_of("alice")
    time.sleep(0.6)
    # Later than anything reported so far, and than earlier traffic (the stamp is the traffic's time).
    since = max(server_activity(), datetime.now(timezone.utc) - timedelta(seconds=0.5))
    response = httpx.get(f"{hub.url}/user/alice/hello.txt", headers={"Authorization": f"token {token}"})
    assert response.status_code == 200
    wait_until(
        lambda: server_activity() > since,
        timeout=10 * ACTIVITY_INTERVAL, what="activity at the Hub", services=(hub.service,), interval=0.2,
    )
    assert re.search(r"POST /hub/api/users/alice/activity \(alice@", hub.log())


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def through_consent(browser: httpx.Client, path: str) -> httpx.Response:
    """GET ``path``, authorizing at the Hub's consent page if it shows one (access to another
    user's server: the Hub asks before letting the owner's server identify you)."""
    page = browser.get(path, follow_redirects=True)
    if page.url.path != "/hub/api/oauth2/authorize" or "<form" not in page.text:
        return page
    fields = dict(re.findall(r'<input type="hidden" name="(_xsrf)" value="([^"]*)"', page.text))
    scopes = re.findall(r'<input type="hidden" name="scopes" value="([^"]*)"', page.text)
    data = {"_xsrf": fields["_xsrf"], "scopes": scopes}
    return browser.post(str(page.url), data=data, follow_redirects=True)


def get_as(hub: Hub, path: str, token: str) -> httpx.Response:
    return httpx.get(f"{hub.url}{path}", headers={"Authorization": f"token {token}"}, timeout=30)


def test_the_hub_sees_the_version_header(hub: Hub, alice_server: dict[str, Any]) -> None:
    import importlib.metadata

    health = httpx.get(f"{hub.url}/user/alice/server-proxy/api/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"  # no credentials needed
    assert health.headers["x-jupyterhub-version"] == importlib.metadata.version("jupyterhub")
    # The Hub checked it at the spawn: no "Single-user server has no version header" in its log.
    assert "no version header" not in hub.log()


def test_a_named_server(hub: Hub, alice_server: dict[str, Any]) -> None:
    started = hub.api("POST", "/users/alice/servers/second")
    assert started.status_code in (201, 202), started.text
    try:
        wait_until(
            lambda: bool((hub.user("alice")["servers"].get("second") or {}).get("ready")),
            timeout=60, what="alice's server 'second'", services=(hub.service,), interval=0.1,
        )
        assert hub.user("alice")["servers"]["second"]["url"] == "/user/alice/second/"
        alice = get_as(hub, "/user/alice/second/hello.txt", hub.token_of("alice"))
        assert alice.status_code == 200 and alice.text == "hello from alice's home"
        assert get_as(hub, "/user/alice/second/hello.txt", hub.token_of("bob")).status_code == 403
        with hub.browser("alice") as browser:
            page = browser.get("/user/alice/second/hello.txt", follow_redirects=True)
            assert page.status_code == 200 and page.text == "hello from alice's home"
            hops = [urlpath(response.headers["location"]) for response in page.history]
            assert hops[:3] == ["/user/alice/second/login", "/hub/api/oauth2/authorize", "/user/alice/second/oauth_callback"]
    finally:
        hub.api("DELETE", "/users/alice/servers/second")
        wait_until(
            lambda: "second" not in hub.user("alice")["servers"], timeout=30, what="'second' to stop", services=(hub.service,)
        )


def test_a_share_lets_bob_in_until_it_is_revoked(hub: Hub, alice_server: dict[str, Any]) -> None:
    token = hub.token_of("bob")
    assert get_as(hub, "/user/alice/hello.txt", token).status_code == 403
    granted = hub.api("POST", "/shares/alice/", json={"user": "bob"})
    assert granted.status_code == 200, granted.text
    try:
        # Within the re-check interval: the Hub's earlier "no" was trusted that long.
        wait_until(
            lambda: get_as(hub, "/user/alice/hello.txt", token).status_code == 200,
            timeout=10 * RECHECK, what="bob let in by the share", interval=0.2,
        )
        with hub.browser("bob") as browser:
            page = through_consent(browser, "/user/alice/hello.txt")
            assert page.status_code == 200 and page.text == "hello from alice's home"
            assert len(session_cookies(browser)) == 1
            revoked = hub.api("PATCH", "/shares/alice/", json={"user": "bob"})
            assert revoked.status_code == 200, revoked.text
            # Both his token and his session stop working once trioproxy asks the Hub again.
            wait_until(
                lambda: get_as(hub, "/user/alice/hello.txt", token).status_code == 403,
                timeout=10 * RECHECK, what="bob's token shut out", interval=0.2,
            )
            wait_until(
                lambda: browser.get("/user/alice/hello.txt", follow_redirects=True).status_code == 403,
                timeout=10 * RECHECK, what="bob's session shut out", interval=0.2,
            )
    finally:
        hub.api("PATCH", "/shares/alice/", json={"user": "bob"})


def test_a_group_grant(hub: Hub, alice_server: dict[str, Any]) -> None:
    # carol's role: access:servers!group=staff; alice is in staff. The Hub's model of carol's
    # token carries the group filter itself: trioproxy resolves it with alice's groups.
    carol = hub.token_of("carol")
    assert "access:servers!group=staff" in get_as(hub, "/hub/api/user", carol).json()["scopes"]
    response = get_as(hub, "/user/alice/hello.txt", carol)
    assert response.status_code == 200, response.text
    with hub.browser("carol") as browser:
        page = through_consent(browser, "/user/alice/hello.txt")
        assert page.status_code == 200 and page.text == "hello from alice's home"
    # alice leaves the group: carol is out within the re-check interval.
    removed = hub.api("DELETE", "/groups/staff/users", json={"users": ["alice"]})
    assert removed.status_code == 200, removed.text
    try:
        wait_until(
            lambda: get_as(hub, "/user/alice/hello.txt", carol).status_code == 403,
            timeout=10 * RECHECK, what="carol shut out", interval=0.2,
        )
    finally:
        hub.api("POST", "/groups/staff/users", json={"users": ["alice"]})


def test_stopping_the_server_leaves_no_process(hub: Hub, alice_server: dict[str, Any]) -> None:
    pid = alice_server["state"]["pid"]
    assert pid_alive(pid)
    spawned = [p for p in marked_pids(hub.marker) if p not in (hub.service.process.pid, hub.proxy_pid())]
    assert pid in spawned  # trioproxy, its orphan guard and its backends carry the marker
    stopped = hub.api("DELETE", "/users/alice/server")
    assert stopped.status_code in (202, 204), stopped.text
    wait_until(lambda: not hub.user("alice")["servers"], timeout=30, what="alice's server to stop", services=(hub.service,))
    wait_until(lambda: not any(pid_alive(p) for p in spawned), timeout=15, what="trioproxy and its servers to exit")
