"""The browser's login through the Hub: the OAuth code flow with PKCE, and the sessions it opens.

``<prefix>login`` sends the browser to the Hub's ``authorize`` page with a random ``state``
(kept, signed, in a short-lived cookie only sent to the callback) and a PKCE challenge;
``<prefix>oauth_callback`` checks the state, exchanges the code for the user's token, asks the
Hub who that is, and lets the user in only if the token carries one of the access scopes for
this server. The session cookie holds a random session id; the user's token stays in memory
here (:class:`Sessions`).

Both steps answer in :mod:`trioproxy.auth`'s terms (:class:`~trioproxy.auth.LoginAnswer`);
the web framework is :mod:`trioproxy.api`'s business.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from ..auth import CookieSpec, LoginAnswer, LoginRequest, local_redirect, same_secret
from .client import HubClient, HubUnavailable
from .settings import HubSettings

log = logging.getLogger("trioproxy.hub")

STATE_MAX_AGE = 600  # seconds a login may take between the Hub's page and the callback
MAX_SESSIONS = 10_000


class Sessions:
    """Logged-in browsers: session id (in the cookie) to the user's Hub token (kept here).

    Bounded: beyond ``max_sessions`` the oldest are forgotten (those users log in again).
    """

    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        self._tokens: OrderedDict[str, str] = OrderedDict()
        self._max = max_sessions

    def open(self, token: str) -> str:
        """A new session for ``token``; its id, for the cookie."""
        session_id = secrets.token_urlsafe(32)
        self._tokens[_digest(session_id)] = token
        while len(self._tokens) > self._max:
            self._tokens.popitem(last=False)
        return session_id

    def token(self, session_id: str) -> str | None:
        return self._tokens.get(_digest(session_id))

    def end(self, session_id: str) -> None:
        self._tokens.pop(_digest(session_id), None)


def _digest(session_id: str) -> str:
    # Looked up by digest, so the lookup's timing says nothing about stored ids.
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()


class HubOAuth:
    """The login flow (:class:`trioproxy.auth.OAuthFlow`) for one server under the Hub.

    ``allowed_user`` gives the Hub's user model for a token if that user may use this server.
    """

    def __init__(
        self,
        settings: HubSettings,
        client: HubClient,
        *,
        session_cookie: str,
        sessions: Sessions,
        user_for_token: Callable[[str], Awaitable[dict[str, Any] | None]],
        may_access: Callable[[dict[str, Any]], Awaitable[bool]],
        secret: bytes,
    ) -> None:
        self.settings = settings
        self.client = client
        self.session_cookie = session_cookie
        self.sessions = sessions
        self._user_for_token = user_for_token
        self._may_access = may_access
        self._secret = secret

    async def begin(self, request: LoginRequest) -> LoginAnswer:
        """Send the browser to the Hub's authorize page, remembering where it was going."""
        settings = self.settings
        next_url = local_redirect(request.args.get("next"), settings.prefix)
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = urlencode(
            {
                "client_id": settings.client_id,
                "redirect_uri": settings.callback_url,
                "response_type": "code",
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        # SameSite=Lax: sent on the Hub's top-level redirect back to us, not on others.
        flow = CookieSpec(
            self._state_cookie_name(state),
            self._sign({"state": state, "next": next_url, "verifier": verifier}),
            path=self._callback_path(),
            max_age=STATE_MAX_AGE,
            secure=self._secure(request),
        )
        return LoginAnswer(302, location=f"{settings.authorize_url}?{query}", cookies=(flow,))

    async def finish(self, request: LoginRequest) -> LoginAnswer:
        """Finish the login: check the state, get the user's token, check the user."""
        args = request.args
        if args.get("error"):
            return LoginAnswer(403, message=f"The Hub refused the login: {args.get('error')}.")
        code, state = args.get("code"), args.get("state")
        if not code or not state:
            return LoginAnswer(400, message="The login callback needs a code and a state.")
        cookie_name = self._state_cookie_name(state)
        flow = self._unsign(request.cookies.get(cookie_name))
        if flow is None or not same_secret(str(flow.get("state", "")), state):
            return LoginAnswer(403, message="This login was not started here or has expired; please try again.")
        try:
            token = await self.client.token_for_code(code, str(flow["verifier"]))
            model = await self._user_for_token(token) if token is not None else None
        except HubUnavailable as exc:
            log.warning("login failed: %s", exc)
            return LoginAnswer(502, message="The Hub could not be reached to finish the login.")
        if token is None or model is None:
            return LoginAnswer(403, message="The Hub did not accept this login; please try again.")
        if not await self._may_access(model):
            log.warning("refused Hub user %r: no access scope for this server", model["name"])
            return LoginAnswer(403, message=f"User {model['name']!r} is not allowed to access this server.")
        log.info("Hub user %r logged in", model["name"])
        session = CookieSpec(
            self.session_cookie, self.sessions.open(token), path=self.cookie_path, secure=self._secure(request)
        )
        spent = CookieSpec(cookie_name, "", path=self._callback_path(), max_age=0, secure=self._secure(request))
        return LoginAnswer(
            302, location=local_redirect(str(flow.get("next", "")), self.settings.prefix), cookies=(session, spent)
        )

    async def logout(self, request: LoginRequest) -> LoginAnswer:
        """Forget the session and delete its cookie; the browser goes to the login again."""
        session_id = request.cookies.get(self.session_cookie)
        if session_id:
            self.sessions.end(session_id)
        gone = CookieSpec(self.session_cookie, "", path=self.cookie_path, max_age=0, secure=self._secure(request))
        return LoginAnswer(302, location=self.settings.prefix + "login", cookies=(gone,))

    @property
    def cookie_path(self) -> str:
        """The session cookie's path: the prefix, or "/" for ``__Host-`` cookies (RFC 6265bis)."""
        return "/" if self.settings.cookie_host_prefix else self.settings.prefix

    def _secure(self, request: LoginRequest) -> bool:
        # As JupyterHub's HubOAuth: Secure over https as the browser sees it (or as the Hub says
        # this server is reached), and always for __Host- cookies, which browsers refuse otherwise.
        settings = self.settings
        return request.https or settings.cookie_host_prefix or urlsplit(settings.public_url).scheme == "https"

    def _callback_path(self) -> str:
        if self.settings.cookie_host_prefix:
            return "/"
        return urlsplit(self.settings.callback_url).path or self.settings.prefix

    def _state_cookie_name(self, state: str) -> str:
        # One cookie per login in flight, so two tabs logging in at once do not collide.
        return f"{self.session_cookie}-oauth-{hashlib.sha256(state.encode('utf-8', 'replace')).hexdigest()[:12]}"

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
        return hmac.new(self._secret, data.encode(), hashlib.sha256).hexdigest()
