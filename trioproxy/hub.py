"""JupyterHub mode: browsers log in through the Hub's OAuth, API clients use Hub tokens.

When JupyterHub spawns trioproxy (as a single-user server or a service), its environment
says where to listen and how to reach the Hub. :class:`HubAuth` then authenticates:

- browsers by the OAuth code flow: ``<prefix>login`` redirects to the Hub's ``authorize``
  page with a random ``state`` (kept, signed, in a short-lived cookie only sent to the
  callback) and a PKCE challenge; ``<prefix>oauth_callback`` checks the state, exchanges the
  code for the user's token, asks the Hub who that is, and lets the user in only if the
  token carries one of the access scopes for this server. The session cookie holds a random
  session id; the user's token stays in memory here and is re-checked with the Hub (cached
  briefly), so a token the Hub revokes or expires ends the session.
- API clients by ``Authorization: token <hub token>`` (or ``Bearer``), checked the same way.

While there is traffic, :meth:`HubAuth.run` tells the Hub (``JUPYTERHUB_ACTIVITY_URL``), so
that idle culling sees the server as used. Every call to the Hub goes through httpx with the
internal-TLS files the Hub gives (``JUPYTERHUB_SSL_*``) and fails closed: an unreachable Hub
lets nobody in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import secrets
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
import trio
from quart import Response

from .auth import (
    Identity,
    authorization_token,
    local_redirect,
    parse_cookies,
    remove_cookie,
    same_secret,
)
from .config import ConfigError
from .errors import render_error
from .relay.headers import Headers

log = logging.getLogger("trioproxy.hub")

STATE_MAX_AGE = 600  # seconds a login may take between the Hub's page and the callback
MAX_SESSIONS = 10_000
MAX_CACHED_TOKENS = 4096
HUB_TIMEOUT = 10.0


class HubUnavailable(Exception):
    """The Hub could not be reached or answered with a server error."""


@dataclass(frozen=True)
class HubSettings:
    """What JupyterHub tells its spawned server, read from ``JUPYTERHUB_*`` variables."""

    api_token: str
    api_url: str  # e.g. http://127.0.0.1:8081/hub/api, no trailing slash
    client_id: str
    prefix: str  # where trioproxy is served, e.g. /user/alice/
    callback_url: str  # the OAuth redirect_uri, as registered with the Hub
    authorize_url: str
    access_scopes: frozenset[str]
    user: str = ""
    server_name: str = ""
    service_url: str = ""  # where to listen, e.g. http://127.0.0.1:45678/user/alice/
    activity_url: str = ""
    activity_interval: float = 300.0
    keyfile: str = ""
    certfile: str = ""
    client_ca: str = ""

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> HubSettings:
        required = ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL", "JUPYTERHUB_CLIENT_ID")
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise ConfigError(f"JupyterHub mode needs {', '.join(missing)} in the environment")
        prefix = _slashed(env.get("JUPYTERHUB_SERVICE_PREFIX", "/"))
        hub_base = _slashed(env.get("JUPYTERHUB_BASE_URL", "/"))
        user = env.get("JUPYTERHUB_USER", "")
        server_name = env.get("JUPYTERHUB_SERVER_NAME", "")
        return cls(
            api_token=env["JUPYTERHUB_API_TOKEN"],
            api_url=env["JUPYTERHUB_API_URL"].rstrip("/"),
            client_id=env["JUPYTERHUB_CLIENT_ID"],
            prefix=prefix,
            callback_url=env.get("JUPYTERHUB_OAUTH_CALLBACK_URL") or prefix + "oauth_callback",
            authorize_url=env.get("JUPYTERHUB_HOST", "") + hub_base + "hub/api/oauth2/authorize",
            access_scopes=_access_scopes(env, user, server_name),
            user=user,
            server_name=server_name,
            service_url=env.get("JUPYTERHUB_SERVICE_URL", ""),
            activity_url=env.get("JUPYTERHUB_ACTIVITY_URL", ""),
            activity_interval=_positive_float(env, "JUPYTERHUB_ACTIVITY_INTERVAL", 300.0),
            keyfile=env.get("JUPYTERHUB_SSL_KEYFILE", ""),
            certfile=env.get("JUPYTERHUB_SSL_CERTFILE", ""),
            client_ca=env.get("JUPYTERHUB_SSL_CLIENT_CA", ""),
        )


def _slashed(path: str) -> str:
    """``path`` with exactly one slash at each end ("/" for an empty one)."""
    inner = path.strip("/")
    return f"/{inner}/" if inner else "/"


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be positive, not {raw!r}")
    return value


def _access_scopes(env: Mapping[str, str], user: str, server_name: str) -> frozenset[str]:
    raw = env.get("JUPYTERHUB_OAUTH_ACCESS_SCOPES")
    if raw:
        try:
            scopes = json.loads(raw)
        except ValueError:
            scopes = None
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ConfigError("JUPYTERHUB_OAUTH_ACCESS_SCOPES must be a JSON list of strings")
        return frozenset(scopes)
    if user:
        return frozenset({f"access:servers!server={user}/{server_name}", f"access:servers!user={user}"})
    service = env.get("JUPYTERHUB_SERVICE_NAME")
    if service:
        return frozenset({f"access:services!service={service}"})
    raise ConfigError("JupyterHub mode needs JUPYTERHUB_USER, JUPYTERHUB_SERVICE_NAME or JUPYTERHUB_OAUTH_ACCESS_SCOPES")


def scopes_allow(required: Iterable[str], held: Iterable[str]) -> bool:
    """Whether ``held`` grants any of ``required``.

    A scope without a filter covers all its filtered forms (``access:servers`` covers
    ``access:servers!user=alice``), as in JupyterHub. Group filters cannot be resolved here
    and grant nothing unless they match exactly.
    """
    have = set(held)
    return any(scope in have or scope.partition("!")[0] in have for scope in required)


def ssl_context(settings: HubSettings) -> ssl.SSLContext | None:
    """The TLS context for calls to the Hub under internal SSL, or None without it."""
    if not (settings.client_ca or settings.certfile):
        return None
    context = ssl.create_default_context(cafile=settings.client_ca or None)
    if settings.certfile:
        context.load_cert_chain(settings.certfile, settings.keyfile or None)
    return context


class _TokenCache:
    """The Hub's answers about tokens (a user model, or None for "not a valid token").

    Kept for a while so that every request does not become a call to the Hub, and
    bounded, since a client can send any number of made-up tokens. Keys are digests so the
    tokens themselves are not kept longer than needed.
    """

    def __init__(self, max_entries: int = MAX_CACHED_TOKENS) -> None:
        self._entries: OrderedDict[str, tuple[float, dict[str, Any] | None]] = OrderedDict()
        self._max_entries = max_entries

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()

    def get(self, token: str) -> tuple[bool, dict[str, Any] | None]:
        entry = self._entries.get(self._key(token))
        if entry is None or entry[0] <= trio.current_time():
            return False, None
        return True, entry[1]

    def put(self, token: str, model: dict[str, Any] | None, max_age: float) -> None:
        key = self._key(token)
        self._entries.pop(key, None)
        self._entries[key] = (trio.current_time() + max_age, model)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


@dataclass
class HubAuth:
    """Authentication through JupyterHub; the same interface as :class:`~trioproxy.auth.TokenAuth`."""

    settings: HubSettings
    cache_max_age: float = 60.0  # how long the Hub's word on a token is trusted
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _client: httpx.AsyncClient | None = field(default=None, init=False, repr=False)
    _sessions: OrderedDict[str, str] = field(default_factory=OrderedDict, init=False, repr=False)
    _last_activity: float = field(default=-math.inf, init=False, repr=False)

    def __post_init__(self) -> None:
        self._cache = _TokenCache()

    # -- the authenticator interface --------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return True

    @property
    def base_url(self) -> str:
        return self.settings.prefix

    @property
    def cookie_name(self) -> str:
        # Per OAuth client, as JupyterHub does, so two servers on one domain keep apart.
        digest = hashlib.sha256(self.settings.client_id.encode()).hexdigest()[:10]
        return f"trioproxy-hub-{digest}"

    def known_secrets(self) -> list[str]:
        return [self.settings.api_token]

    def login_url(self, next_url: str) -> str:
        return f"{self.settings.prefix}login?next={quote(next_url, safe='/')}"

    async def authenticate(self, scope: dict[str, Any]) -> Identity | None:
        headers: Headers = scope["headers"]
        identity = await self._by_header(headers)
        if identity is None:
            identity = await self._by_session(headers)
        if identity is not None:
            self._last_activity = trio.current_time()
        return identity

    def strip_credentials(self, headers: Headers) -> Headers:
        """Take out the session cookie, and an Authorization header carrying a Hub token."""
        headers = remove_cookie(headers, self.cookie_name)
        token = authorization_token(headers)
        if token is not None:
            known, model = self._cache.get(token)
            if known and model is not None:
                headers = [(n, v) for n, v in headers if n != b"authorization"]
        return headers

    # -- who a request is from --------------------------------------------------------------

    async def _by_header(self, headers: Headers) -> Identity | None:
        token = authorization_token(headers)
        if token is None:
            return None
        model = await self._allowed_user(token)
        return Identity(model["name"], via="hub-token") if model is not None else None

    async def _by_session(self, headers: Headers) -> Identity | None:
        session_id = parse_cookies(headers).get(self.cookie_name)
        if not session_id:
            return None
        key = self._session_key(session_id)
        token = self._sessions.get(key)
        if token is None:
            return None
        model = await self._allowed_user(token)
        if model is None:
            self._sessions.pop(key, None)  # revoked or expired at the Hub: log in again
            return None
        return Identity(model["name"], via="hub-cookie")

    async def _allowed_user(self, token: str) -> dict[str, Any] | None:
        """The Hub's user model for ``token`` if that user may use this server."""
        try:
            model = await self.user_for_token(token)
        except HubUnavailable as exc:
            log.warning("cannot check a token with the Hub: %s", exc)
            return None
        if model is None or not self._may_access(model):
            return None
        return model

    def _may_access(self, model: dict[str, Any]) -> bool:
        held = model.get("scopes")
        if not isinstance(held, list):
            return False  # a Hub too old to report scopes: refuse rather than guess
        return scopes_allow(self.settings.access_scopes, held)

    # -- talking to the Hub -----------------------------------------------------------------

    @asynccontextmanager
    async def _hub(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._client is not None:
            yield self._client
            return
        async with self._new_client() as client:
            yield client

    def _new_client(self) -> httpx.AsyncClient:
        context = ssl_context(self.settings)
        # trust_env=False: the Hub's API is internal, and HTTP(S)_PROXY or .netrc must not
        # see the tokens sent to it.
        return httpx.AsyncClient(
            verify=context if context is not None else True,
            timeout=HUB_TIMEOUT,
            follow_redirects=False,
            trust_env=False,
        )

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            async with self._hub() as client:
                response = await client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"{type(exc).__name__} calling {url}: {exc}") from None
        if response.status_code >= 500:
            raise HubUnavailable(f"{url} answered {response.status_code}")
        return response

    async def user_for_token(self, token: str) -> dict[str, Any] | None:
        """The Hub's user model for ``token``, or None if the Hub does not accept it."""
        known, model = self._cache.get(token)
        if known:
            return model
        response = await self._call(
            "GET", f"{self.settings.api_url}/user", headers={"Authorization": f"token {token}"}
        )
        model = _json_object(response) if response.status_code == 200 else None
        if model is not None and not isinstance(model.get("name"), str):
            model = None
        self._cache.put(token, model, self.cache_max_age)
        return model

    async def _token_for_code(self, code: str, verifier: str) -> str | None:
        response = await self._call(
            "POST",
            f"{self.settings.api_url}/oauth2/token",
            data={
                "client_id": self.settings.client_id,
                "client_secret": self.settings.api_token,
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.settings.callback_url,
                "code_verifier": verifier,
            },
        )
        document = _json_object(response) if response.status_code == 200 else None
        token = document.get("access_token") if document else None
        return token if isinstance(token, str) and token else None

    # -- the OAuth flow (Quart handlers, wired by trioproxy.api) ----------------------------

    async def oauth_login(self, request: Any) -> Response:
        """Send the browser to the Hub's authorize page, remembering where it was going."""
        next_url = local_redirect(request.args.get("next"), self.settings.prefix)
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = urlencode(
            {
                "client_id": self.settings.client_id,
                "redirect_uri": self.settings.callback_url,
                "response_type": "code",
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        response = _redirect(f"{self.settings.authorize_url}?{query}")
        response.set_cookie(
            self._state_cookie_name(state),
            self._sign({"state": state, "next": next_url, "verifier": verifier}),
            max_age=STATE_MAX_AGE,
            path=self._callback_path(),
            httponly=True,
            samesite="Lax",  # sent on the Hub's top-level redirect back to us, not on others
            secure=_is_https(request),
        )
        _no_store(response)
        return response

    async def oauth_callback(self, request: Any) -> Response:
        """Finish the login: check the state, get the user's token, check the user."""
        if request.args.get("error"):
            return _page(403, f"The Hub refused the login: {request.args.get('error')}.")
        code, state = request.args.get("code"), request.args.get("state")
        if not code or not state:
            return _page(400, "The login callback needs a code and a state.")
        cookie_name = self._state_cookie_name(state)
        flow = self._unsign(request.cookies.get(cookie_name))
        if flow is None or not same_secret(str(flow.get("state", "")), state):
            return _page(403, "This login was not started here or has expired; please try again.")
        try:
            token = await self._token_for_code(code, str(flow["verifier"]))
            model = await self.user_for_token(token) if token is not None else None
        except HubUnavailable as exc:
            log.warning("login failed: %s", exc)
            return _page(502, "The Hub could not be reached to finish the login.")
        if token is None or model is None:
            return _page(403, "The Hub did not accept this login; please try again.")
        if not self._may_access(model):
            log.warning("refused Hub user %r: no access scope for this server", model["name"])
            return _page(403, f"User {model['name']!r} is not allowed to access this server.")
        response = _redirect(local_redirect(str(flow.get("next", "")), self.settings.prefix))
        response.set_cookie(
            self.cookie_name,
            self._new_session(token),
            path=self.settings.prefix,
            httponly=True,
            samesite="Lax",
            secure=_is_https(request),
        )
        response.delete_cookie(cookie_name, path=self._callback_path())
        _no_store(response)
        log.info("Hub user %r logged in", model["name"])
        return response

    def _callback_path(self) -> str:
        return urlsplit(self.settings.callback_url).path or self.settings.prefix

    def _state_cookie_name(self, state: str) -> str:
        # One cookie per login in flight, so two tabs logging in at once do not collide.
        return f"{self.cookie_name}-oauth-{hashlib.sha256(state.encode('utf-8', 'replace')).hexdigest()[:12]}"

    def end_session(self, headers: Headers) -> None:
        """Forget the session whose cookie ``headers`` carry (logging out)."""
        session_id = parse_cookies(headers).get(self.cookie_name)
        if session_id:
            self._sessions.pop(self._session_key(session_id), None)

    def _new_session(self, token: str) -> str:
        session_id = secrets.token_urlsafe(32)
        self._sessions[self._session_key(session_id)] = token
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session_id

    def _session_key(self, session_id: str) -> str:
        # Looked up by digest, so the lookup's timing says nothing about stored ids.
        return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()

    def _sign(self, payload: dict[str, Any]) -> str:
        data = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        return f"{data}.{self._mac(data)}"

    def _unsign(self, value: str | None) -> dict[str, Any] | None:
        if not value or "." not in value:
            return None
        data, _, mac = value.rpartition(".")
        if not same_secret(mac, self._mac(data)):
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        except ValueError:
            return None
        return payload if isinstance(payload, dict) else None

    def _mac(self, data: str) -> str:
        return hmac.new(self.secret, data.encode(), hashlib.sha256).hexdigest()

    # -- lifetime and activity --------------------------------------------------------------

    async def run(
        self,
        *,
        last_activity: Callable[[], float | None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep one connection pool to the Hub and report activity until cancelled.

        ``last_activity`` gives the trio time of the latest traffic trioproxy saw besides
        requests (e.g. WebSocket messages counted by the supervisors).
        """
        async with self._new_client() as client:
            self._client = client
            try:
                task_status.started()
                if not self.settings.activity_url:
                    await trio.sleep_forever()
                await self._report_activity_forever(client, last_activity)
            finally:
                self._client = None

    async def _report_activity_forever(
        self, client: httpx.AsyncClient, last_activity: Callable[[], float | None] | None
    ) -> None:
        reported = trio.current_time()
        while True:
            await trio.sleep(self.settings.activity_interval)
            latest = max(self._last_activity, (last_activity() if last_activity else None) or -math.inf)
            if latest > reported and await self._report_activity(client, latest):
                reported = latest

    async def _report_activity(self, client: httpx.AsyncClient, when: float) -> bool:
        stamp = _iso_utc(when)
        body = {"servers": {self.settings.server_name: {"last_activity": stamp}}, "last_activity": stamp}
        try:
            response = await client.post(
                self.settings.activity_url,
                json=body,
                headers={"Authorization": f"token {self.settings.api_token}"},
            )
        except httpx.HTTPError as exc:
            log.warning("cannot report activity to the Hub: %s: %s", type(exc).__name__, exc)
            return False
        if response.status_code >= 400:
            log.warning("the Hub refused the activity report: %d", response.status_code)
            return False
        return True


def _iso_utc(trio_time: float) -> str:
    """The wall-clock time, as JupyterHub's ISO 8601 with "Z", of a trio clock reading."""
    moment = datetime.now(timezone.utc) - timedelta(seconds=trio.current_time() - trio_time)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        document = response.json()
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _is_https(request: Any) -> bool:
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return bool(request.scheme == "https" or forwarded == "https")


def _redirect(location: str) -> Response:
    return Response("", status=302, headers={"Location": location})


def _no_store(response: Response) -> None:
    response.headers["Cache-Control"] = "no-store"


def _page(status: int, message: str) -> Response:
    content_type, body = render_error(status, message, as_json=False)
    response = Response(body, status=status, content_type=content_type.decode())
    _no_store(response)
    return response
