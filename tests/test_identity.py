"""Telling an app who its user is (``forward_user``, trioproxy.identity), and the attacks on it.

Backends record exactly what reached them (tests/recording_backend.py on the wire; a raw
socket for WebSocket handshakes; tests/backends/whoami.py, which runs README's verification
snippet with the secret from its own environment): a client's copy of the identity headers
never arrives, on any route, protocol or path, whether ``forward_user`` is on or not; the
signature trioproxy adds verifies; a stale one, a forged one and a tampered one do not.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioproxy import identity
from trioproxy.auth import Identity, local_user, mask_secrets
from trioproxy.config import ServerOptionError, make_server_process
from trioproxy.hub.authenticator import _identity as hub_identity

from .conftest import BACKENDS, PY, TOKEN, free_port, start_proxy, wait_for
from .recording_backend import RecordingBackend
from .test_admission import PATHS, held_handshake, upgrade
from .test_websocket import start_raw_server

pytestmark = pytest.mark.timeout(60)
SECRET = "s3cret-shared-with-the-app-0123456789"
README = Path(__file__).parent.parent / "README.md"
NAMES = ("x-trioproxy-user", "x-trioproxy-groups", "x-trioproxy-scopes", "x-trioproxy-user-signature")

# What a client may try: every identity header, in other cases, with "_" for "-", repeated.
FORGED = [
    ("X-Trioproxy-User", "admin"),
    ("x-TRIOPROXY-user", "mallory"),
    ("X_Trioproxy_User", "admin"),
    ("X-Trioproxy-User", "second-copy"),
    ("X-Trioproxy-Groups", "admins"),
    ("X-TRIOPROXY-SCOPES", "admin:users"),
    ("X-Trioproxy-User-Signature", "t=1, n=0, v1=00"),
    ("x_trioproxy_user_signature", "t=1, n=0, v1=00"),
]


def identity_headers_in(headers: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The identity headers among ``headers`` (names as a WSGI server would fold them)."""
    found: dict[str, list[str]] = {}
    for name, value in headers:
        folded = name.lower().replace("_", "-")
        if folded in NAMES:
            found.setdefault(folded, []).append(value)
    return found


def assert_signed_by_trioproxy(headers: list[tuple[str, str]], secret: str = SECRET) -> None:
    found = identity_headers_in(headers)
    assert sorted(found) == sorted(NAMES), headers
    assert all(len(values) == 1 for values in found.values()), found  # no client copy beside ours
    single = {name: values[0] for name, values in found.items()}
    assert single["x-trioproxy-user"] == identity.encode(local_user())
    assert single["x-trioproxy-groups"] == single["x-trioproxy-scopes"] == ""
    assert identity.verify(single, secret) == local_user()


# -- the headers and their signature (pure) --------------------------------------------------


def test_the_signature_covers_every_value_and_the_time() -> None:
    who = Identity("zoë@example.org", via="hub-token", groups=("staff", "a,b"), scopes=("access:servers!user=zoë",))
    setting = identity.ForwardUser(SECRET)
    headers = {n.decode(): v.decode() for n, v in identity.identity_headers(who, setting, now=1_000_000, nonce="ab" * 16)}
    assert headers["x-trioproxy-user"] == "zo%C3%AB@example.org"
    assert headers["x-trioproxy-groups"] == "staff,a%2Cb"
    assert headers["x-trioproxy-scopes"] == "access:servers!user=zo%C3%AB"
    timestamp, nonce, signature = (part.split("=", 1)[1] for part in headers["x-trioproxy-user-signature"].split(", "))
    assert (timestamp, nonce) == ("1000000", "ab" * 16)
    assert signature == identity.sign(
        SECRET.encode(), f"trioproxy-user-v1\n1000000\n{'ab' * 16}\n{headers['x-trioproxy-user']}\nstaff,a%2Cb\naccess:servers!user=zo%C3%AB".encode()
    )
    assert identity.verify(headers, SECRET, now=1_000_000 + 59) == "zoë@example.org"
    # A replay after the freshness window, another secret, or any value changed: refused.
    assert identity.verify(headers, SECRET, now=1_000_000 + identity.FRESHNESS + 1) is None
    assert identity.verify(headers, SECRET, now=1_000_000 - identity.FRESHNESS - 1) is None
    assert identity.verify(headers, "another-secret-of-the-same-length!!", now=1_000_000) is None
    for name, value in [("x-trioproxy-user", "admin"), ("x-trioproxy-groups", "staff,admins"), ("x-trioproxy-scopes", "admin:users")]:
        assert identity.verify({**headers, name: value}, SECRET, now=1_000_000) is None
    moved = headers["x-trioproxy-user-signature"].replace("t=1000000", "t=1000050")
    assert identity.verify({**headers, "x-trioproxy-user-signature": moved}, SECRET, now=1_000_050) is None
    assert identity.verify({}, SECRET) is None


def test_nobody_is_vouched_for_without_authentication() -> None:
    assert identity.identity_headers(Identity("anonymous", via="none"), identity.ForwardUser(SECRET)) == []


def test_identity_header_names_are_recognised_in_any_form() -> None:
    for name in (b"x-trioproxy-user", b"X-TRIOPROXY-USER", b"x_trioproxy_user", b"X_Trioproxy-Groups", b"x-trioproxy-user-signature"):
        assert identity.is_identity_header(name), name
    for name in (b"x-trioproxy-users", b"x-trioproxy", b"x-forwarded-user", b"user"):
        assert not identity.is_identity_header(name), name


def test_the_hubs_user_model_gives_name_groups_and_scopes() -> None:
    model = {"name": "alice", "groups": ["staff", 3], "scopes": ["access:servers!user=alice"]}
    who = hub_identity(model, "hub-cookie")
    assert (who.name, who.groups, who.scopes, who.via) == ("alice", ("staff",), ("access:servers!user=alice",), "hub-cookie")
    assert hub_identity({"name": "bob"}, "hub-token").groups == ()  # a token that may not read groups


# -- the option -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"port": 9, "forward_user": True}, "cannot read TRIOPROXY_USER_SECRET"),
        ({"command": ["x"], "forward_user": {"secret": "short"}}, "at least 16 printable ASCII"),
        ({"command": ["x"], "forward_user": {"secrt": SECRET}}, "unknown forward_user option 'secrt'"),
        ({"command": ["x"], "forward_user": "yes"}, "expected a boolean or a dict"),
        ({"command": ["x"], "request_headers_override": {"X-Trioproxy-User": "me"}}, "cannot be overridden"),
        ({"command": ["x"], "request_headers_override": {"x_trioproxy_groups": "admins"}}, "cannot be overridden"),
    ],
)
def test_forward_user_values_that_cannot_work_fail_their_server(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ServerOptionError) as raised:
        make_server_process("app", settings)
    assert message in str(raised.value)
    assert SECRET not in str(raised.value)


def test_a_configured_secret_is_masked_wherever_it_would_be_quoted() -> None:
    make_server_process("app", {"port": 9, "forward_user": {"secret": SECRET}})
    assert mask_secrets(f"the app said {SECRET}!") == "the app said [secret]!"


# -- through a real trioproxy: forged headers never arrive -------------------------------------


async def test_forged_identity_headers_never_reach_a_backend_over_http1(nursery: trio.Nursery) -> None:
    backend = RecordingBackend()
    await nursery.start(backend.serve)
    servers = {
        "signed": {"port": backend.port, "forward_user": {"secret": SECRET}},
        "plain": {"port": backend.port},
    }
    proxy = await start_proxy(nursery, servers)
    async with proxy.client() as client:
        for path in ("signed/a", "plain/b", f"proxy/{backend.port}/c", f"proxy/absolute/{backend.port}/d"):
            answer = await client.get(path, headers=httpx.Headers(FORGED))
            assert answer.status_code == 200, (path, answer.text)
    signed, *others = backend.requests
    assert signed.target == "/a"
    assert_signed_by_trioproxy(signed.headers)
    assert "admin" not in repr(signed.headers) and "mallory" not in repr(signed.headers)
    for request in others:
        assert identity_headers_in(request.headers) == {}, (request.target, request.headers)
    # On the wire too, not only as h11 parsed it.
    assert b"admin" not in b"".join(backend.raw) and b"t=1, n=0" not in b"".join(backend.raw)


async def test_forged_identity_headers_never_reach_a_backend_over_http2(nursery: trio.Nursery) -> None:
    backend = RecordingBackend()
    await nursery.start(backend.serve)
    servers = {"signed": {"port": backend.port, "forward_user": {"secret": SECRET}}, "plain": {"port": backend.port}}
    proxy = await start_proxy(nursery, servers)
    async with httpx.AsyncClient(base_url=proxy.url, http1=False, http2=True, headers=proxy.headers) as client:
        for path in ("signed/h2", "plain/h2"):
            answer = await client.get(path, headers=httpx.Headers(FORGED))
            assert answer.status_code == 200 and answer.http_version == "HTTP/2"
    assert_signed_by_trioproxy(backend.requests[0].headers)
    assert identity_headers_in(backend.requests[1].headers) == {}


def head_headers(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n\r\n")[0].split("\r\n")[1:]
    return [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines)]


@pytest.mark.parametrize("way", PATHS)
async def test_forged_identity_headers_never_reach_a_backend_in_a_websocket_handshake(nursery: trio.Nursery, way: str) -> None:
    release = trio.Event()
    release.set()
    backend = await start_raw_server(nursery, held_handshake(release))
    servers = {"signed": {"port": backend.port, "forward_user": {"secret": SECRET}}, "plain": {"port": backend.port}}
    proxy = await start_proxy(nursery, servers)
    port = int(proxy.url.split(":")[2].split("/")[0])
    forged = "".join(f"{name}: {value}\r\n" for name, value in FORGED)
    for path in ("signed/ws", "plain/ws", f"proxy/{backend.port}/ws"):
        stream = await upgrade(port, path, way, extra=f"Authorization: token {TOKEN}\r\n" + forged)
        with trio.fail_after(10):
            answer = await stream.receive_some(65536)
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 101"), answer
    signed, *others = (head_headers(head) for head in backend.requests)
    assert_signed_by_trioproxy(signed)
    for headers in others:
        assert identity_headers_in(headers) == {}, headers


# -- the app checks them with README's snippet and its own environment ------------------------


async def test_the_app_verifies_the_user_with_the_secret_from_its_environment(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    command = [PY, str(BACKENDS / "whoami.py"), str(port), str(README)]
    proxy = await start_proxy(nursery, {"whoami": {"command": command, "port": port, "forward_user": True}})
    async with proxy.client() as client:
        answer = (await client.get("whoami/", headers=httpx.Headers(FORGED))).json()
        assert answer["user"] == local_user()
        received = [(name, value) for name, value in answer["headers"]]
        assert_signed_by_trioproxy(received, identity.forward_user(proxy.supervisors["whoami"].process).secret)

        status = await client.get("server-proxy/api/servers/whoami")
        assert status.json()["forward_user"] == {"headers": list(NAMES), "secret": "$TRIOPROXY_USER_SECRET"}
        listing = await client.get("server-proxy/api/servers")
    secret = identity.forward_user(proxy.supervisors["whoami"].process).secret
    assert secret not in status.text and secret not in listing.text
    assert all(secret not in record.getMessage() for record in caplog.records)
    assert any("TRIOPROXY_USER_SECRET=[secret]" in record.getMessage() for record in caplog.records)

    # An attacker who reaches the app's port directly: unsigned, forged, or replayed late.
    direct = f"http://127.0.0.1:{port}/"
    async with httpx.AsyncClient(timeout=10) as raw:
        assert (await raw.get(direct, headers={"X-Trioproxy-User": "admin"})).json()["user"] is None
        signed = dict(identity_headers_in(received))
        captured = {name: values[0] for name, values in signed.items()}
        forged = {**captured, "x-trioproxy-user": "admin"}
        assert (await raw.get(direct, headers=forged)).json()["user"] is None
        assert (await raw.get(direct, headers=captured)).json()["user"] == local_user()  # within the minute
        timestamp = int(captured["x-trioproxy-user-signature"].split(",")[0].split("=")[1])
        await wait_for(lambda: time.time() >= timestamp + 2, timeout=10)
        stale = await raw.get(direct + "?max_age=1", headers=captured)
        assert stale.json()["user"] is None  # older than the app's freshness rule: a replay


async def test_a_restarted_process_gets_the_same_secret(nursery: trio.Nursery) -> None:
    port = free_port()
    command = [PY, str(BACKENDS / "whoami.py"), str(port), str(README)]
    proxy = await start_proxy(nursery, {"whoami": {"command": command, "port": port, "forward_user": True}})
    async with proxy.client() as client:
        assert (await client.get("whoami/")).json()["user"] == local_user()
        restarted = await client.post("server-proxy/api/servers/whoami/restart")
        assert restarted.status_code in (200, 202), restarted.text
        await wait_for(lambda: proxy.supervisors["whoami"].state.value == "ready", timeout=20)
        assert (await client.get("whoami/")).json()["user"] == local_user()


def test_readme_documents_the_signed_string_as_the_code_builds_it() -> None:
    text = README.read_text()
    assert r"`trioproxy-user-v1\n<t>\n<n>\n<X-Trioproxy-User>\n<X-Trioproxy-Groups>\n<X-Trioproxy-Scopes>`" in text
    assert identity.signed_string("t", "n", "u", "g", "s") == b"trioproxy-user-v1\nt\nn\nu\ng\ns"
    assert identity.SAFE in text


async def test_under_jupyterhub_the_hubs_user_their_groups_and_scopes_arrive_signed(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from urllib.parse import unquote

    from .fakehub import FakeHub, default_users
    from .test_hub import start_hub_proxy

    hub = FakeHub()
    await nursery.start(hub.serve)
    hub.groups["alice"] = ["staff", "physics, theory"]
    port = free_port()
    servers = {"whoami": {"command": [PY, str(BACKENDS / "whoami.py"), str(port), str(README)], "port": port, "forward_user": True}}
    proxy = await start_hub_proxy(nursery, monkeypatch, tmp_path, hub, servers=servers)
    token = hub.issue_token("alice")
    async with proxy.client() as client:
        answer = await client.get("whoami/", headers=httpx.Headers([("Authorization", f"token {token}"), *FORGED]))
    assert answer.status_code == 200, answer.text
    assert answer.json()["user"] == "alice"
    found = identity_headers_in(answer.json()["headers"])
    assert all(len(values) == 1 for values in found.values()), found
    assert [unquote(group) for group in found["x-trioproxy-groups"][0].split(",")] == ["staff", "physics, theory"]
    assert [unquote(scope) for scope in found["x-trioproxy-scopes"][0].split(" ")] == default_users()["alice"]


async def test_an_override_callable_cannot_set_an_identity_header(nursery: trio.Nursery) -> None:
    backend = RecordingBackend()
    await nursery.start(backend.serve)

    def overrides() -> dict[str, str]:
        return {"X-Trioproxy-User": "admin"}

    servers = {"app": {"port": backend.port, "forward_user": {"secret": SECRET}, "request_headers_override": overrides}}
    proxy = await start_proxy(nursery, servers)
    async with proxy.client(headers={"Accept": "application/json"}) as client:
        answer = await client.get("app/x")
    assert answer.status_code == 500
    assert "cannot be overridden" in answer.json()["message"]
    assert backend.requests == []
