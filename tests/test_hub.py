"""JupyterHub mode against a fake Hub: real HTTP both ways, trioproxy built as the CLI builds it."""

from __future__ import annotations

import json
import math
import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from trioproxy.auth import TokenAuth
from trioproxy.cli import TrioProxy, build
from trioproxy.config import ConfigError
from trioproxy.hub import HubAuth, scopes_allow
from trioproxy.hub.activity import latest_of, report_activity_forever
from trioproxy.server import run_app

from .conftest import ProxyProcess, echo_command, free_port, launch_trioproxy, wait_for
from .fakehub import API_TOKEN, CLIENT_ID, FakeHub

PREFIX = "/user/alice/"
HTML = {"Accept": "text/html"}


@dataclass
class HubProxy:
    url: str  # the public URL of the server: http://127.0.0.1:<port>/user/alice/
    auth: HubAuth
    supervisors: Any

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10, **kwargs)


def hub_environ(hub: FakeHub, port: int) -> dict[str, str]:
    return {
        "JUPYTERHUB_API_TOKEN": API_TOKEN,
        "JUPYTERHUB_API_URL": f"{hub.url}/hub/api",
        "JUPYTERHUB_CLIENT_ID": CLIENT_ID,
        "JUPYTERHUB_USER": "alice",
        "JUPYTERHUB_SERVER_NAME": "",
        "JUPYTERHUB_SERVICE_PREFIX": PREFIX,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}{PREFIX}",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": f"http://127.0.0.1:{port}{PREFIX}oauth_callback",
        "JUPYTERHUB_HOST": hub.url,
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_ACTIVITY_URL": f"{hub.url}/hub/api/users/alice/activity",
        "JUPYTERHUB_ACTIVITY_INTERVAL": "0.1",
    }


def use_environ(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> None:
    for name in list(os.environ):
        if name.startswith("JUPYTERHUB_") or name == "JUPYTER_TOKEN":
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)


def configured_app(tmp_path: Path, args: list[str] | None = None, servers: dict[str, Any] | None = None) -> TrioProxy:
    config = tmp_path / "cfg.json"
    servers = servers if servers is not None else {"echo": {"command": echo_command()}}
    config.write_text(json.dumps({"ServerProxy": {"servers": servers}}))
    app = TrioProxy()
    app.initialize(["--config", str(config), *(args or [])])
    app.load_file(str(config))
    return app


@pytest.fixture
async def hub(nursery: trio.Nursery) -> FakeHub:
    fake = FakeHub()
    await nursery.start(fake.serve)
    return fake


async def start_hub_proxy(
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    hub: FakeHub,
    env: dict[str, str] | None = None,
    servers: dict[str, Any] | None = None,
) -> HubProxy:
    port = free_port()
    environ = {**hub_environ(hub, port), **(env or {})}
    hub.redirect_uri = environ["JUPYTERHUB_OAUTH_CALLBACK_URL"]
    use_environ(monkeypatch, environ)
    hconfig, supervisors, asgi_app = build(configured_app(tmp_path, servers=servers))
    hconfig.graceful_timeout = 0.2
    binds = await nursery.start(run_app, asgi_app, hconfig)
    assert binds == [f"http://127.0.0.1:{port}"]
    auth = asgi_app.extensions["trioproxy"].settings.auth
    assert isinstance(auth, HubAuth)
    return HubProxy(f"http://127.0.0.1:{port}{PREFIX}", auth, supervisors)


async def log_in(proxy: HubProxy, client: httpx.AsyncClient, path: str = "echo/x?y=1") -> httpx.Response:
    return await client.get(proxy.url + path, headers=HTML, follow_redirects=True)


# -- the OAuth round trip ---------------------------------------------------------------------


async def test_oauth_round_trip(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub) -> None:
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub)
    async with proxy.client() as client:
        response = await log_in(proxy, client)
        assert response.status_code == 200, response.text
        assert response.json()["target"] == "/x?y=1"
        steps = [str(r.url).split("?")[0] for r in response.history]
        assert steps == [
            proxy.url + "echo/x",
            proxy.url + "login",
            f"{hub.url}/hub/api/oauth2/authorize",
            proxy.url + "oauth_callback",
        ]
        authorize = hub.authorize_requests[0]
        assert authorize["client_id"] == CLIENT_ID and authorize["response_type"] == "code"
        assert authorize["redirect_uri"] == proxy.url + "oauth_callback"
        assert authorize["code_challenge_method"] == "S256" and authorize["state"]
        exchange = hub.token_requests[0]
        assert exchange["client_secret"] == API_TOKEN and exchange["grant_type"] == "authorization_code"

        session = response.history[-1].headers["set-cookie"]
        assert session.startswith(proxy.auth.cookie_name + "=")
        assert "HttpOnly" in session and "SameSite=Lax" in session and f"Path={PREFIX}" in session
        user_token = next(iter(hub.tokens))
        assert user_token not in session  # the cookie is a session id, not the Hub token

        # The cookie alone now lets the browser in, and never reaches the backend.
        again = await client.get("echo/again", headers={"Accept": "application/json"})
        assert again.status_code == 200
        relayed = dict(again.json()["headers"])
        assert proxy.auth.cookie_name not in relayed.get("cookie", "")
        assert "oauth" not in relayed.get("cookie", "")
        # trioproxy's own API takes the same session.
        servers = await client.get("server-proxy/api/servers")
        assert servers.status_code == 200

        # Logging out ends the session on the server too: the old cookie no longer works.
        cookie = {proxy.auth.cookie_name: client.cookies[proxy.auth.cookie_name]}
        await client.get("logout")
        async with httpx.AsyncClient(base_url=proxy.url, cookies=cookie) as replay:
            assert (await replay.get("server-proxy/api/servers")).status_code == 403


@pytest.mark.parametrize(("address", "secure"), [("127.0.0.2", False), ("127.0.0.1", True)])
async def test_cookies_are_secure_behind_https_only_by_a_trusted_proxys_word(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub, address: str, secure: bool
) -> None:
    # X-Forwarded-Proto is believed from 127.0.0.1 (forwarded_allow_ips' default), not from
    # any client: a Secure cookie the browser then withholds over http would lock it out.
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub)
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with proxy.client(transport=transport, headers={"X-Forwarded-Proto": "https"}) as client:
        started = await client.get("login", params={"next": PREFIX + "echo/"})
        assert started.status_code == 302
        state_cookie = started.headers["set-cookie"]
        assert ("; Secure" in state_cookie) is secure, state_cookie
        if not secure:
            # The whole round trip works over plain http, and the session cookie is not Secure.
            response = await log_in(proxy, client, "echo/")
            assert response.status_code == 200, response.text
            session = response.history[-1].headers["set-cookie"]
            assert session.startswith(proxy.auth.cookie_name + "=") and "Secure" not in session


@pytest.mark.parametrize(("user", "status"), [("admin", 200), ("bob", 403), ("nobody", 403), ("ghost", 403)])
async def test_only_users_with_access_scopes_get_in(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub, user: str, status: int
) -> None:
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub)
    hub.login_as = user
    async with proxy.client() as client:
        response = await log_in(proxy, client)
        assert response.status_code == status
        if status == 403:
            assert "not allowed to access this server" in response.text
            assert not any(proxy.auth.cookie_name + "=" in r.headers.get("set-cookie", "") for r in response.history)
            assert proxy.supervisors["echo"].state.value == "stopped"
            # Without a session, the next visit starts over at the Hub.
            again = await client.get("echo/", headers=HTML)
            assert again.status_code == 302 and "/login" in again.headers["location"]


async def test_access_scopes_from_the_environment(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    scopes = json.dumps(["access:servers!server=alice/special"])
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub, {"JUPYTERHUB_OAUTH_ACCESS_SCOPES": scopes})
    hub.users["carol"] = ["access:servers!server=alice/special"]
    alice, carol = hub.issue_token("alice"), hub.issue_token("carol")
    async with proxy.client() as client:
        assert (await client.get("echo/", headers={"Authorization": f"token {alice}"})).status_code == 403
        assert (await client.get("echo/", headers={"Authorization": f"token {carol}"})).status_code == 200


def test_scope_matching() -> None:
    required = {"access:servers!server=alice/", "access:servers!user=alice"}
    assert scopes_allow(required, ["access:servers!user=alice"])
    assert scopes_allow(required, ["access:servers"])
    assert not scopes_allow(required, ["access:servers!user=alicex", "access:servers!server=alice/x"])
    assert not scopes_allow(required, ["access:servers!group=alice", "access:services", "read:users"])
    assert not scopes_allow(required, [])
    # A group filter grants access to the servers of that group's members.
    assert scopes_allow(required, ["access:servers!group=staff"], owner_groups=["staff"])
    assert scopes_allow(required, ["access:servers!group=staff"], owner_groups=["x", "staff"])
    assert not scopes_allow(required, ["access:servers!group=staff"], owner_groups=["staffx"])
    assert not scopes_allow(required, ["access:servers!group=staff"], owner_groups=[])
    assert not scopes_allow(required, ["read:users!group=staff", "access:services!group=staff"], owner_groups=["staff"])
    # ... not a service's (no user, no groups).
    assert not scopes_allow({"access:services!service=x"}, ["access:services!group=staff"], owner_groups=["staff"])


# -- tokens from API clients --------------------------------------------------------------------


async def test_api_clients_use_hub_tokens(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub) -> None:
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub)
    alice, bob = hub.issue_token("alice"), hub.issue_token("bob")
    async with proxy.client() as client:
        for refused in ({}, {"Authorization": "token made-up"}, {"Authorization": f"token {bob}"}, {"Authorization": f"Basic {alice}"}):
            response = await client.get("echo/", headers=refused)
            assert response.status_code == 403, refused
        assert proxy.supervisors["echo"].state.value == "stopped"

        calls = hub.user_requests
        for scheme in ("token", "Bearer", "token"):
            response = await client.get("echo/", headers={"Authorization": f"{scheme} {alice}"})
            assert response.status_code == 200
            relayed = dict(response.json()["headers"])
            assert "authorization" not in relayed  # a Hub token is not passed on
        assert hub.user_requests == calls + 1  # the Hub's answer is cached

        # An Authorization header the Hub does not know is the backend's business: with a
        # session, it is passed on untouched.
        await log_in(proxy, client)
        response = await client.get("echo/", headers={"Authorization": "Bearer for-the-backend"})
        assert response.status_code == 200
        assert dict(response.json()["headers"])["authorization"] == "Bearer for-the-backend"


async def test_expired_tokens_are_refused(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub) -> None:
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub)
    proxy.auth.cache_max_age = 0.05
    api_token = hub.issue_token("alice")
    async with proxy.client() as client:
        assert (await log_in(proxy, client)).status_code == 200
        session_token = next(t for t in hub.tokens if t != api_token)
        assert (await client.get("echo/", headers={"Authorization": f"token {api_token}"})).status_code == 200

        hub.expire(api_token)
        hub.expire(session_token)
        await trio.sleep(0.1)
        assert (await client.get("echo/", headers={"Authorization": f"token {api_token}"})).status_code == 403
        expired = await client.get("echo/", headers=HTML)
        assert expired.status_code == 302 and expired.headers["location"].startswith(PREFIX + "login")
        assert (await client.get("echo/", headers={"Accept": "application/json"})).status_code == 403
        # Logging in again through the Hub gives a new session.
        assert (await log_in(proxy, client)).status_code == 200


# -- the callback refuses what it did not start -------------------------------------------------


async def test_callback_attacks(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub) -> None:
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub)
    async with proxy.client() as client:
        # A code from a login this browser never started (login CSRF): no state cookie.
        async with proxy.client() as attacker:
            start = await attacker.get("login?next=" + PREFIX + "echo/")
            authorize = await attacker.get(start.headers["location"])
        callback = authorize.headers["location"]
        response = await client.get(callback)
        assert response.status_code == 403
        assert "not started here" in response.text

        # Our own login, but the state in the URL does not match the cookie's.
        start = await client.get("login")
        hub_url = httpx.URL(start.headers["location"])
        forged = hub_url.copy_merge_params({"state": "forged-state"})
        landing = await client.get(str(forged))
        assert (await client.get(landing.headers["location"])).status_code == 403

        assert (await client.get("oauth_callback?error=access_denied")).status_code == 403
        assert (await client.get("oauth_callback?state=x")).status_code == 400

        # Right state, wrong code: the Hub refuses the exchange.
        start = await client.get("login")
        landing = await client.get(start.headers["location"])
        callback_url = httpx.URL(landing.headers["location"])
        bad_code = callback_url.copy_set_param("code", "not-a-code")
        response = await client.get(str(bad_code))
        assert response.status_code == 403 and "did not accept" in response.text

        # A code is single-use: replaying it after a successful login fails.
        start = await client.get("login")
        landing = await client.get(start.headers["location"])
        callback_url = httpx.URL(landing.headers["location"])
        cookies = dict(client.cookies)
        assert (await client.get(str(callback_url))).status_code == 302
        async with proxy.client(cookies=cookies) as replay:
            assert (await replay.get(str(callback_url))).status_code == 403

        # The login's next= cannot leave the server's prefix.
        start = await client.get("login?next=https://evil.example/")
        response = await client.get(start.headers["location"], follow_redirects=True)
        assert response.history[-1].headers["location"] == PREFIX
    assert proxy.supervisors["echo"].state.value == "stopped"


async def test_unreachable_hub_fails_closed(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = FakeHub(url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub)
    async with proxy.client() as client:
        response = await client.get("echo/", headers={"Authorization": "token anything"})
        assert response.status_code == 403
        response = await client.get("oauth_callback?code=c&state=s")
        assert response.status_code == 403  # no state cookie: refused before calling the Hub
        start = await client.get("login")
        state = httpx.URL(start.headers["location"]).params["state"]
        response = await client.get(f"oauth_callback?code=c&state={state}")
        assert response.status_code == 502 and "could not be reached" in response.text
        assert API_TOKEN not in response.text
    assert proxy.supervisors["echo"].state.value == "stopped"


# -- activity -----------------------------------------------------------------------------------


async def test_activity_schedule_on_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    # Each interval: the latest activity if it is news; a report the Hub refused is news still.
    latest = -math.inf
    taken = True
    reports: list[tuple[float, float]] = []  # (when sent, the activity it reports), from t0

    async def report(when: float) -> bool:
        reports.append((trio.current_time() - t0, when - t0))
        return taken

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(report_activity_forever, 10.0, lambda: latest, report)
        await trio.sleep(25)
        assert reports == []  # ticks at 10 and 20: nothing happened
        latest = trio.current_time()  # 25
        await trio.sleep(30)
        assert reports == [(pytest.approx(30), pytest.approx(25))]  # once, at the next tick
        taken = False
        latest = trio.current_time()  # 55
        await trio.sleep(20)
        taken = True
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert [r[0] for r in reports] == pytest.approx([30, 60, 70, 80])  # refused at 60, 70
    assert [r[1] for r in reports] == pytest.approx([25, 55, 55, 55])


def test_latest_activity_of_several_sources() -> None:
    assert latest_of(lambda: None, lambda: -math.inf)() == -math.inf
    assert latest_of(lambda: 0.0, lambda: None, lambda: -3.0)() == 0.0


async def test_activity_is_reported_only_after_traffic(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub)
    await trio.sleep(0.35)
    assert hub.activity == []  # no traffic, no report

    token = hub.issue_token("alice")
    async with proxy.client(headers={"Authorization": f"token {token}"}) as client:
        before = datetime.now(timezone.utc)
        assert (await client.get("echo/")).status_code == 200
        await wait_for(lambda: len(hub.activity) == 1, timeout=5)
        report = hub.activity[0]
        assert hub.activity_auth[0] == f"token {API_TOKEN}"
        assert report["user"] == "alice" and set(report["servers"]) == {""}
        stamp = report["last_activity"]
        assert report["servers"][""]["last_activity"] == stamp and stamp.endswith("Z")
        when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        assert abs((when - before).total_seconds()) < 2
        # The server becoming ready just after may count once more; then all is quiet.
        await trio.sleep(0.3)
        reports = len(hub.activity)
        await trio.sleep(0.35)
        assert len(hub.activity) == reports  # nothing new happened, nothing reported

        # A Hub that fails the report gets it again later.
        hub.activity_status = 503
        attempts = len(hub.activity_auth)
        assert (await client.get("echo/")).status_code == 200
        await wait_for(lambda: len(hub.activity_auth) >= attempts + 2, timeout=5)
        hub.activity_status = 200
        await wait_for(lambda: len(hub.activity) == reports + 1, timeout=5)
        assert hub.activity[-1]["last_activity"] > stamp


async def test_server_traffic_counts_as_activity(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    # A long WebSocket session makes no new requests; the supervisors' activity counts too.
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub)
    await trio.sleep(0.25)
    proxy.supervisors["echo"].touch()
    await wait_for(lambda: len(hub.activity) == 1, timeout=5)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"JUPYTERHUB_CLIENT_ID": ""}, "JUPYTERHUB_CLIENT_ID"),
        ({"JUPYTERHUB_API_URL": ""}, "JUPYTERHUB_API_URL"),
        ({"JUPYTERHUB_OAUTH_ACCESS_SCOPES": "access:servers"}, "JSON list"),
        ({"JUPYTERHUB_ACTIVITY_INTERVAL": "soon"}, "JUPYTERHUB_ACTIVITY_INTERVAL"),
        ({"JUPYTERHUB_ACTIVITY_INTERVAL": "0"}, "positive"),
        ({"JUPYTERHUB_USER": ""}, "JUPYTERHUB_USER"),
        ({"JUPYTERHUB_SERVICE_URL": "https://127.0.0.1:9/user/alice/"}, "JUPYTERHUB_SSL_CERTFILE"),
    ],
)
def test_bad_hub_environment_is_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    hub = FakeHub(url="http://127.0.0.1:9")
    use_environ(monkeypatch, {k: v for k, v in {**hub_environ(hub, 9), **change}.items() if v})
    with pytest.raises(ConfigError, match=message):
        build(configured_app(tmp_path))


def test_hub_mode_choice_and_address(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = FakeHub(url="http://127.0.0.1:9")
    use_environ(monkeypatch, hub_environ(hub, 4567))
    hconfig, _, asgi_app = build(configured_app(tmp_path))
    assert isinstance(asgi_app.extensions["trioproxy"].settings.auth, HubAuth)
    assert hconfig.bind == ["127.0.0.1:4567"]
    assert asgi_app.extensions["trioproxy"].settings.base_url == PREFIX
    # Explicit options win over the Hub's.
    hconfig, _, asgi_app = build(configured_app(tmp_path, ["--port", "5678", "--base-url", "/x/"]))
    assert hconfig.bind == ["127.0.0.1:5678"]
    assert asgi_app.extensions["trioproxy"].settings.base_url == "/x/"
    # An explicit token means token authentication, even under the Hub.
    _, _, asgi_app = build(configured_app(tmp_path, ["--token", "explicit-token-123"]))
    assert isinstance(asgi_app.extensions["trioproxy"].settings.auth, TokenAuth)


async def test_hub_mode_as_a_command(nursery: trio.Nursery, hub: FakeHub, tmp_path: Path, proxy_processes: list[ProxyProcess]) -> None:
    port = free_port()
    environ = hub_environ(hub, port)
    hub.redirect_uri = environ["JUPYTERHUB_OAUTH_CALLBACK_URL"]
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"ServerProxy": {"servers": {"echo": {"command": echo_command()}}}}))
    env = {**environ, "JUPYTER_TOKEN": ""}
    proxy = await trio.to_thread.run_sync(lambda: launch_trioproxy(["--config", str(config)], env=env))
    proxy_processes.append(proxy)
    assert proxy.url == f"http://127.0.0.1:{port}{PREFIX}"  # where the Hub said, no token in it
    token = hub.issue_token("alice")
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        assert (await client.get("echo/")).status_code == 403
        assert (await client.get("echo/", headers={"Authorization": f"token {token}"})).status_code == 200
        response = await client.get("echo/x", headers=HTML, follow_redirects=True)
        assert response.status_code == 200 and response.json()["target"] == "/x"
        await wait_for(lambda: len(hub.activity) >= 1, timeout=5)
    assert await trio.to_thread.run_sync(proxy.stop) == 0
    output = "".join(proxy.lines)
    assert API_TOKEN not in output and token not in output


# -- internal SSL -------------------------------------------------------------------------------


def make_certificates(directory: Path) -> dict[str, str]:
    """A CA, and a server and a client certificate for 127.0.0.1 signed by it (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "1", "-subj", "/CN=trioproxy test CA")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", "san.cnf")
    return {name: str(directory / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_internal_ssl(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    files = await trio.to_thread.run_sync(make_certificates, tmp_path)
    hub = FakeHub()
    await nursery.start(
        lambda task_status: hub.serve(
            ssl_files={"certfile": files["server.pem"], "keyfile": files["server.key"], "ca": files["ca.pem"]},
            task_status=task_status,
        )
    )
    assert hub.url.startswith("https://")
    ssl_env = {
        "JUPYTERHUB_SSL_CERTFILE": files["client.pem"],
        "JUPYTERHUB_SSL_KEYFILE": files["client.key"],
        "JUPYTERHUB_SSL_CLIENT_CA": files["ca.pem"],
    }
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub, ssl_env)
    token = hub.issue_token("alice")
    # The browser, too, must trust the Hub (and here show a client certificate to it).
    browser_tls = ssl.create_default_context(cafile=files["ca.pem"])
    browser_tls.load_cert_chain(files["client.pem"], files["client.key"])
    async with proxy.client(verify=browser_tls) as client:
        assert (await client.get("echo/", headers={"Authorization": f"token {token}"})).status_code == 200
        assert (await log_in(proxy, client)).status_code == 200

    # Without the client certificate the Hub refuses the connection: nobody gets in.
    other = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub, {"JUPYTERHUB_SSL_CLIENT_CA": files["ca.pem"]})
    async with other.client() as client:
        assert (await client.get("echo/", headers={"Authorization": f"token {token}"})).status_code == 403
