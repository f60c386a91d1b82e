"""What an admin meets running trioproxy as JupyterHub's single-user server (issue 23), against
the fake Hub: the version header on every answer, the default URL, the health endpoints,
``__Host-`` cookies, and the warning about Kubernetes' grace period."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy.cli import build
from trioproxy.hub import HubAuth, HubSettings
from trioproxy.server import run_app

from .conftest import BACKENDS, echo_command, free_port
from .fakehub import FakeHub
from .test_hub import HTML, PREFIX, HubProxy, configured_app, hub_environ, start_hub_proxy

JUPYTERHUB = importlib.metadata.version("jupyterhub")  # installed beside trioproxy here
SERVERS = {
    "echo": {"command": echo_command()},
    "ws": {"command": [sys.executable, str(BACKENDS / "ws_echo.py"), "{port}"]},
}
TOKEN = "secret-token-0123456789"
UPGRADE = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


@pytest.fixture
async def hub(nursery: trio.Nursery) -> FakeHub:
    fake = FakeHub()
    await nursery.start(fake.serve)
    return fake


async def start(nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub, **env: str) -> HubProxy:
    return await start_hub_proxy(nursery, monkeypatch, tmp_path, hub, env=env, servers=SERVERS)


async def raw_head(proxy: HubProxy, data: str) -> tuple[bytes, list[bytes]]:
    """Send ``data`` on a new connection; the first answer's status line and header lines."""
    port = int(proxy.url.split(":")[2].split("/")[0])
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data.encode())
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                received += chunk
    lines = received.partition(b"\r\n\r\n")[0].split(b"\r\n")
    return lines[0], lines[1:]


def versions(header_lines: list[bytes]) -> list[bytes]:
    return [line.partition(b":")[2].strip() for line in header_lines if line.lower().startswith(b"x-jupyterhub-version:")]


# -- X-JupyterHub-Version -----------------------------------------------------------------------


async def test_every_answer_carries_the_jupyterhub_version(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    proxy = await start(nursery, monkeypatch, tmp_path, hub)
    token = hub.issue_token("alice")
    answers: dict[str, httpx.Response] = {}
    async with proxy.client() as stranger:
        answers["login redirect"] = await stranger.get("", headers=HTML)
        answers["refused API"] = await stranger.get("server-proxy/api/servers")
        answers["login"] = await stranger.get("login")
        answers["refused relay"] = await stranger.get("echo/x")
        answers["unknown, refused"] = await stranger.get("nosuch/")
    async with proxy.client(headers={"Authorization": f"token {token}"}) as alice:
        answers["launcher"] = await alice.get("")
        answers["API"] = await alice.get("server-proxy/api/servers")
        answers["relayed"] = await alice.get("echo/x")
        answers["relayed error"] = await alice.get("echo/status/500")
        answers["relayed redirect"] = await alice.get("echo/redirect?to=/elsewhere")
        answers["add a slash"] = await alice.get("echo")
        answers["not found"] = await alice.get("nosuch/")
        answers["method not allowed"] = await alice.post("server-proxy/servers-info")
        # A backend's own version header (an older jupyter server behind) is replaced, not doubled.
        answers["backend's own"] = await alice.get("echo/headers?X-JupyterHub-Version=0.7")
    statuses = {what: response.status_code for what, response in answers.items()}
    assert statuses == {
        "login redirect": 302,
        "refused API": 403,
        "login": 302,
        "refused relay": 403,
        "unknown, refused": 403,
        "launcher": 200,
        "API": 200,
        "relayed": 200,
        "relayed error": 500,
        "relayed redirect": 302,
        "add a slash": 302,
        "not found": 404,
        "method not allowed": 405,
        "backend's own": 200,
    }
    for what, response in answers.items():
        assert response.headers.get_list("x-jupyterhub-version") == [JUPYTERHUB], what


async def test_websocket_answers_carry_the_version_on_both_paths(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    proxy = await start(nursery, monkeypatch, tmp_path, hub)
    token = hub.issue_token("alice")
    host = f"Host: {proxy.url.split('/')[2]}\r\n"
    auth = f"Authorization: token {token}\r\n"
    version = [JUPYTERHUB.encode()]
    # The fast path (an upgrade first on its connection): its refusals, the backend's, its 101.
    status, headers = await raw_head(proxy, f"GET {PREFIX}ws/echo HTTP/1.1\r\n{host}{UPGRADE}\r\n")
    assert status.startswith(b"HTTP/1.1 403") and versions(headers) == version
    status, headers = await raw_head(proxy, f"GET {PREFIX}ws/reject?status=418 HTTP/1.1\r\n{host}{auth}{UPGRADE}\r\n")
    assert status.startswith(b"HTTP/1.1 418") and versions(headers) == version
    status, headers = await raw_head(proxy, f"GET {PREFIX}ws/echo HTTP/1.1\r\n{host}{auth}{UPGRADE}\r\n")
    assert status.startswith(b"HTTP/1.1 101") and versions(headers) == version
    # Through Hypercorn and the ASGI relay (an upgrade after another request): the accept too.
    first = f"GET {PREFIX}server-proxy/api/health HTTP/1.1\r\n{host}\r\n"
    port = int(proxy.url.split(":")[2].split("/")[0])
    with trio.fail_after(20):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(first.encode())
            received = b""
            while b"}" not in received:  # the health answer's JSON body
                received += await stream.receive_some(65536)
            assert versions(received.partition(b"\r\n\r\n")[0].split(b"\r\n")) == version
            await stream.send_all(f"GET {PREFIX}ws/echo HTTP/1.1\r\n{host}{auth}{UPGRADE}\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(65536)
    head = received.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0].startswith(b"HTTP/1.1 101") and versions(head[1:]) == version


async def test_the_hubs_own_version_when_jupyterhub_is_not_installed(
    nursery: trio.Nursery, hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    settings = HubSettings.from_environ(hub_environ(hub, 9))
    hub.version = "5.3.0"
    auth = HubAuth(settings, jupyterhub_version=None)
    assert auth.response_headers == []
    await nursery.start(auth.run)  # asks the Hub before trioproxy listens
    assert auth.response_headers == [(b"x-jupyterhub-version", b"5.3.0")]

    # A Hub that says it only in its answer's body is understood too.
    hub.version_header = False
    hub.version = "5.2.1"
    quiet = HubAuth(settings, jupyterhub_version=None)
    await nursery.start(quiet.run)
    assert quiet.response_headers == [(b"x-jupyterhub-version", b"5.2.1")]

    # A version that could not be a header value is not sent (nor is a header split open).
    hub.version = "5.3.0\r\nSet-Cookie: x=y"
    shady = HubAuth(settings, jupyterhub_version=None)
    with caplog.at_level(logging.WARNING, "trioproxy.hub"):
        await nursery.start(shady.run)
    assert shady.response_headers == []
    assert "not a version" in caplog.text


async def test_an_unreachable_hub_delays_nothing_but_the_header(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    settings = HubSettings.from_environ(hub_environ(FakeHub(url=f"http://127.0.0.1:{free_port()}"), 9))
    auth = HubAuth(settings, jupyterhub_version=None)
    with caplog.at_level(logging.WARNING, "trioproxy.hub"), trio.fail_after(30):
        await nursery.start(auth.run)
    assert auth.response_headers == []
    assert "cannot ask the Hub for its version" in caplog.text


async def start_token_mode(nursery: trio.Nursery, tmp_path: Path, args: list[str]) -> str:
    port = free_port()
    hconfig, _supervisors, asgi_app = build(configured_app(tmp_path, ["--token", TOKEN, "--port", str(port), *args]))
    hconfig.graceful_timeout = 0.2
    await nursery.start(run_app, asgi_app, hconfig)
    return f"http://127.0.0.1:{port}/"


async def test_outside_jupyterhub_no_version_header_and_the_same_liveness(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trioproxy

    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    url = await start_token_mode(nursery, tmp_path, [])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.get("echo/x", headers={"Authorization": f"token {TOKEN}"})
        assert response.status_code == 200
        assert "x-jupyterhub-version" not in response.headers
        assert (await client.get("api")).json() == {"version": trioproxy.__version__}
        assert (await client.get("server-proxy/api/health")).status_code == 200
        assert (await client.get("server-proxy/api/servers")).status_code == 403


async def test_standalone_mode_keeps_api_for_its_app_and_health_for_probes(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a root server (trioproxy -- <command>) every path but trioproxy's own segments is
    # the app's, "api" included: probes use server-proxy/api/health there.
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    url = await start_token_mode(nursery, tmp_path, ["--", *echo_command()])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        health = await client.get("server-proxy/api/health")
        refused = await client.get("api")
        relayed = await client.get("api", headers={"Authorization": f"token {TOKEN}"})
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert refused.status_code == 403  # the app's, so behind the token
    assert relayed.status_code == 200 and relayed.json()["target"] == "/api"


def test_api_alone_is_trioproxys_and_below_it_a_server_named_api() -> None:
    from trioproxy.routing import resolve

    servers = {"api", "echo"}
    assert resolve(b"/user/alice/api", "/user/alice/", servers).kind == "app"
    below = resolve(b"/user/alice/api/x", "/user/alice/", servers)
    assert (below.kind, below.name, below.upstream_path) == ("server", "api", b"/x")
    assert resolve(b"/user/alice/api/", "/user/alice/", servers).kind == "server"
    assert resolve(b"/user/alice/api", "/user/alice/", {"echo"}, root_server="app").name == "app"
    assert resolve(b"/user/alice/apix", "/user/alice/", servers).kind == "not-found"


# -- JUPYTERHUB_DEFAULT_URL ---------------------------------------------------------------------


async def test_the_root_sends_browsers_to_the_default_url(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    # z2jh's singleuser.defaultUrl: "/echo/" lands users in that app, as jupyterhub-singleuser
    # would (relative to the server's prefix).
    proxy = await start(nursery, monkeypatch, tmp_path, hub, JUPYTERHUB_DEFAULT_URL="/echo/landing")
    async with proxy.client() as browser:
        response = await browser.get("", headers=HTML)
        assert response.status_code == 302
        assert response.headers["location"] == f"{PREFIX}echo/landing"
        assert response.headers["x-jupyterhub-version"] == JUPYTERHUB
        # Followed, it logs in through the Hub and comes back to the default URL itself.
        response = await browser.get("", headers=HTML, follow_redirects=True)
        assert response.status_code == 200, response.text
        assert response.json()["target"] == "/landing"
        # The launcher is still there, at its own URL, with its links pinned to the prefix.
        launcher = await browser.get("server-proxy/launcher", headers=HTML)
        assert launcher.status_code == 200
        assert f"<base href='{PREFIX}'>" in launcher.text
        assert "data-server='echo'" in launcher.text
        # Only the root redirects.
        assert (await browser.get("server-proxy/api/servers")).status_code == 200


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ""),
        ("/", ""),
        ("/rstudio", "rstudio"),
        ("lab/tree/x.ipynb", "lab/tree/x.ipynb"),
        ("/echo/?a=1", "echo/?a=1"),
        ("?a=1", ""),
    ],
)
def test_default_url_is_a_path_below_the_prefix(raw: str, expected: str) -> None:
    env = {**hub_environ(FakeHub(url="http://127.0.0.1:9"), 9), "JUPYTERHUB_DEFAULT_URL": raw}
    assert HubSettings.from_environ(env).default_url == expected


@pytest.mark.parametrize("raw", ["https://evil.example/", "//evil.example/x", "/a/../../bob/", "/a b", "/\\\\evil"])
def test_a_default_url_elsewhere_is_a_config_error(raw: str) -> None:
    from trioproxy.config import ConfigError

    env = {**hub_environ(FakeHub(url="http://127.0.0.1:9"), 9), "JUPYTERHUB_DEFAULT_URL": raw}
    with pytest.raises(ConfigError, match="JUPYTERHUB_DEFAULT_URL"):
        HubSettings.from_environ(env)


async def test_without_a_default_url_the_root_is_the_launcher(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    proxy = await start(nursery, monkeypatch, tmp_path, hub, JUPYTERHUB_DEFAULT_URL="/")
    async with proxy.client(headers={"Authorization": f"token {hub.issue_token('alice')}"}) as alice:
        response = await alice.get("", headers=HTML)
    assert response.status_code == 200 and "data-server='echo'" in response.text


# -- liveness ------------------------------------------------------------------------------------


async def test_liveness_answers_without_credentials_and_says_nothing_else(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    import trioproxy

    proxy = await start(nursery, monkeypatch, tmp_path, hub)
    before = hub.user_requests
    async with proxy.client() as probe:
        api = await probe.get("api")
        health = await probe.get("server-proxy/api/health")
        head = await probe.head("server-proxy/api/health")
        below = await probe.get("api/status")  # only "api" itself is open
    assert api.status_code == 200 and api.json() == {"version": trioproxy.__version__}
    assert health.status_code == 200 and health.json() == {"status": "ok", "version": trioproxy.__version__}
    assert head.status_code == 200
    assert below.status_code == 403
    assert api.headers["x-jupyterhub-version"] == JUPYTERHUB
    assert hub.user_requests == before  # a probe costs the Hub nothing


# -- subdomain deployments: __Host- cookies ---------------------------------------------------


def cookie_attributes(set_cookie: str) -> tuple[str, dict[str, str]]:
    """(name, {attribute: value}) of one Set-Cookie header, attribute names lower-cased."""
    first, *rest = [part.strip() for part in set_cookie.split(";")]
    attributes = {}
    for part in rest:
        key, _, value = part.partition("=")
        attributes[key.lower()] = value
    return first.partition("=")[0], attributes


async def test_host_prefixed_cookies_for_subdomain_deployments(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    proxy = await start(nursery, monkeypatch, tmp_path, hub, JUPYTERHUB_COOKIE_HOST_PREFIX_ENABLED="1")
    assert proxy.auth.cookie_name.startswith("__Host-trioproxy-hub-")
    # Step by step over plain http: a cookie jar would keep Secure cookies to itself.
    async with proxy.client() as browser:
        started = await browser.get("login", params={"next": PREFIX + "echo/landed"})
        state_name, state = cookie_attributes(started.headers["set-cookie"])
        assert state_name.startswith("__Host-") and state["path"] == "/" and "secure" in state
        state_cookie = started.headers["set-cookie"].split(";")[0]
        at_hub = await browser.get(started.headers["location"])
        assert at_hub.status_code == 302
        back = await browser.get(at_hub.headers["location"], headers={"Cookie": state_cookie})
        assert back.status_code == 302 and back.headers["location"] == PREFIX + "echo/landed"
        cookies = [cookie_attributes(value) for value in back.headers.get_list("set-cookie")]
        session_name, session = next(c for c in cookies if c[0] == proxy.auth.cookie_name)
        assert session["path"] == "/" and "secure" in session and "httponly" in session
        spent_name, spent = next(c for c in cookies if c[0] == state_name)
        assert spent["path"] == "/" and "secure" in spent  # deleted with the flags it was set with
        session_cookie = next(v for v in back.headers.get_list("set-cookie") if v.startswith(session_name)).split(";")[0]

        landed = await browser.get("echo/landed", headers={"Cookie": session_cookie})
        assert landed.status_code == 200, landed.text
        out = await browser.get("logout", headers={"Cookie": session_cookie})
        assert out.status_code == 302
        gone_name, gone = cookie_attributes(out.headers["set-cookie"])
        assert gone_name == session_name and gone["path"] == "/" and "secure" in gone and gone.get("max-age") == "0"
        assert (await browser.get("echo/landed", headers={"Cookie": session_cookie})).status_code == 403


async def test_without_the_host_prefix_cookies_stay_under_the_prefix(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    proxy = await start(nursery, monkeypatch, tmp_path, hub, JUPYTERHUB_COOKIE_HOST_PREFIX_ENABLED="0")
    assert proxy.auth.cookie_name.startswith("trioproxy-hub-")
    async with proxy.client() as browser:
        response = await browser.get("echo/x", headers=HTML, follow_redirects=True)
        assert response.status_code == 200
        cookies = [cookie_attributes(value) for value in response.history[-1].headers.get_list("set-cookie")]
        session_name, session = next(c for c in cookies if c[0] == proxy.auth.cookie_name)
        assert session["path"] == PREFIX and "secure" not in session
        out = await browser.get("logout")
        gone_name, gone = cookie_attributes(out.headers["set-cookie"])
        assert gone_name == session_name and gone["path"] == PREFIX and gone.get("max-age") == "0"


# -- group grants ---------------------------------------------------------------------------------


async def test_group_grants_follow_the_owners_groups(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    # carol's role grants access:servers!group=staff; alice (the owner) is in staff, then leaves.
    hub.users["carol"] = ["access:servers!group=staff"]
    hub.users["dave"] = ["access:servers!group=other"]
    hub.groups["alice"] = ["staff"]
    proxy = await start(nursery, monkeypatch, tmp_path, hub)
    proxy.auth.cache_max_age = 0  # ask the Hub every time, so that a change shows at once
    carol, dave = hub.issue_token("carol"), hub.issue_token("dave")
    async with proxy.client() as client:
        assert (await client.get("echo/", headers={"Authorization": f"token {carol}"})).status_code == 200
        assert (await client.get("echo/", headers={"Authorization": f"token {dave}"})).status_code == 403
        hub.groups["alice"] = []
        assert (await client.get("echo/", headers={"Authorization": f"token {carol}"})).status_code == 403
        # Through the browser login as well.
        hub.groups["alice"] = ["staff"]
        hub.login_as = "carol"
        response = await client.get("echo/x", headers=HTML, follow_redirects=True)
        assert response.status_code == 200, response.text


async def test_only_group_filtered_scopes_cost_a_question_about_groups(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub
) -> None:
    proxy = await start(nursery, monkeypatch, tmp_path, hub)
    alice, bob = hub.issue_token("alice"), hub.issue_token("bob")
    async with proxy.client() as client:
        assert (await client.get("echo/", headers={"Authorization": f"token {alice}"})).status_code == 200
        assert (await client.get("echo/", headers={"Authorization": f"token {bob}"})).status_code == 403
    assert hub.user_requests == 2  # one per token: the owner's groups were never needed


async def test_an_unreachable_hub_grants_no_group_access(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub.users["carol"] = ["access:servers!group=staff"]
    hub.groups["alice"] = ["staff"]
    proxy = await start(nursery, monkeypatch, tmp_path, hub)
    carol = hub.issue_token("carol")
    proxy.auth.client.cache.put(carol, {"kind": "user", "name": "carol", "scopes": ["access:servers!group=staff"]}, 60)
    proxy.auth.client.settings = HubSettings.from_environ(
        {**hub_environ(FakeHub(url=f"http://127.0.0.1:{free_port()}"), 9)}
    )
    with caplog.at_level(logging.WARNING, "trioproxy.hub"):
        async with proxy.client() as client:
            response = await client.get("echo/", headers={"Authorization": f"token {carol}"})
    assert response.status_code == 403
    assert "cannot ask the Hub for the groups of this server's owner" in caplog.text


def test_the_recheck_interval_is_an_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trioproxy.config import ConfigError

    from .test_hub import use_environ

    use_environ(monkeypatch, hub_environ(FakeHub(url="http://127.0.0.1:9"), free_port()))
    _hconfig, _supervisors, asgi_app = build(configured_app(tmp_path, ["--TrioProxy.hub_cache_max_age=2.5"]))
    assert asgi_app.extensions["trioproxy"].settings.auth.cache_max_age == 2.5
    with pytest.raises(ConfigError, match="hub_cache_max_age"):
        build(configured_app(tmp_path, ["--TrioProxy.hub_cache_max_age=-1"]))


# -- Kubernetes: the pod's grace period ---------------------------------------------------------


def test_kubernetes_grace_warning() -> None:
    from trioproxy.cli import kubernetes_grace_warning
    from trioproxy.config import ServerProxy, make_server_process

    proxy = ServerProxy()
    servers = {
        "slow": make_server_process("slow", {"command": ["x"], "stop_timeout": 8}, parent=proxy),
        "quick": make_server_process("quick", {"command": ["x"], "stop_timeout": 1}, parent=proxy),
        "relayed": make_server_process("relayed", {"port": 9999}, parent=proxy),
    }
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert kubernetes_grace_warning(5, servers, {}) is None  # not in Kubernetes
    warning = kubernetes_grace_warning(5, servers, pod)
    assert warning is not None
    assert "up to 13 s" in warning and "killed after 1 s" in warning and "delete_grace_period to at least 13" in warning
    # The admin says what grace they gave the pod: silent when it is enough.
    assert kubernetes_grace_warning(5, servers, {**pod, "TRIOPROXY_DELETE_GRACE_PERIOD": "15"}) is None
    assert "killed after 10 s" in (kubernetes_grace_warning(5, servers, {**pod, "TRIOPROXY_DELETE_GRACE_PERIOD": "10"}) or "")
    assert kubernetes_grace_warning(0.5, {"relayed": servers["relayed"]}, pod) is None  # nothing to stop: 0.5 s
    assert "must be a number" in (kubernetes_grace_warning(5, servers, {**pod, "TRIOPROXY_DELETE_GRACE_PERIOD": "soon"}) or "")


def test_the_grace_warning_is_logged_at_start_in_hub_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from .test_hub import use_environ

    use_environ(monkeypatch, hub_environ(FakeHub(url="http://127.0.0.1:9"), free_port()))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with caplog.at_level(logging.WARNING, "trioproxy"):
        build(configured_app(tmp_path))
    assert "running in Kubernetes: a graceful stop takes up to 10 s" in caplog.text


def test_the_kubernetes_example_fits_its_grace_period(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # examples/kubernetes: the config loads, and the grace period its values.yaml gives is enough.
    from trioproxy.cli import TrioProxy, kubernetes_grace_warning

    from .test_hub import use_environ

    example = Path(__file__).parents[1] / "examples" / "kubernetes"
    use_environ(monkeypatch, hub_environ(FakeHub(url="http://127.0.0.1:9"), free_port()))
    app = TrioProxy()
    app.initialize(["--config", str(example / "trioproxy_config.py")])
    app.load_file(str(example / "trioproxy_config.py"))
    _hconfig, supervisors, _asgi_app = build(app)
    servers = supervisors._processes  # before they run, the supervisors hold only their configuration
    assert sorted(servers) == ["files", "hello"]
    values = (example / "values.yaml").read_text()
    assert 'TRIOPROXY_DELETE_GRACE_PERIOD: "10"' in values and "delete_grace_period: 10" in values
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert kubernetes_grace_warning(app.graceful_timeout, servers, {**pod, "TRIOPROXY_DELETE_GRACE_PERIOD": "10"}) is None
    assert kubernetes_grace_warning(app.graceful_timeout, servers, pod) is not None  # KubeSpawner's 1 s


async def test_the_example_app_answers(nursery: trio.Nursery) -> None:
    port = free_port()
    app = Path(__file__).parents[1] / "examples" / "kubernetes" / "apps" / "hello.py"
    command = [sys.executable, str(app), str(port)]
    process = await nursery.start(partial(trio.run_process, command, env={"JUPYTERHUB_USER": "alice"}, check=False))
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            with trio.fail_after(20):
                while True:
                    try:
                        response = await client.get(f"http://127.0.0.1:{port}/x")
                        break
                    except httpx.ConnectError:
                        await trio.sleep(0.05)
        assert response.text == "Hello, alice! You asked for /x\n"
    finally:
        process.terminate()
