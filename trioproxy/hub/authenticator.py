"""HubAuth: who a request is from, when JupyterHub decides (an :class:`~trioproxy.auth.Authenticator`).

Browsers come with the session cookie their login through the Hub gave them
(:mod:`.oauth`); API clients with ``Authorization: token <hub token>`` (or ``Bearer``). Either
way the user's token is checked with the Hub (cached briefly, :mod:`.client`), so a token the
Hub revokes or expires ends the session, and an unreachable Hub lets nobody in.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import trio

from ..auth import Authenticator, Identity, authorization_token, parse_cookies, remove_cookie
from ..relay.headers import Headers
from .activity import hub_reporter, latest_of, report_activity_forever
from .client import HubClient, HubUnavailable
from .oauth import HubOAuth, Sessions
from .settings import HubSettings, group_filtered, scopes_allow
from .version import HEADER as VERSION_HEADER
from .version import announced_version, installed_version, is_token

log = logging.getLogger("trioproxy.hub")


@dataclass
class HubAuth:
    """Authentication through JupyterHub; the same interface as :class:`~trioproxy.auth.TokenAuth`."""

    settings: HubSettings
    cache_max_age: float = 60.0  # how long the Hub's word on a token is trusted
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    # The X-JupyterHub-Version to send; None: ask the Hub for its own when run() starts.
    jupyterhub_version: str | None = field(default_factory=installed_version)
    _last_activity: float = field(default=-math.inf, init=False, repr=False)

    def __post_init__(self) -> None:
        self.client = HubClient(self.settings)
        self.sessions = Sessions()
        # Headers every answer carries (trioproxy.app.Settings.response_headers is this list):
        # filled here, or by run() before trioproxy listens.
        self.response_headers: list[tuple[bytes, bytes]] = []
        if self.jupyterhub_version:
            self._announce(self.jupyterhub_version)

    def _announce(self, version: str) -> None:
        if not is_token(version):
            log.warning("not sending X-JupyterHub-Version %r: not a version", version)
            return
        self.response_headers[:] = [(VERSION_HEADER, version.encode("ascii"))]

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
        # Subdomain deployments (JUPYTERHUB_COOKIE_HOST_PREFIX_ENABLED): "__Host-", which a
        # browser only takes from this very host, Secure and at Path=/ (hub.oauth sees to those).
        digest = hashlib.sha256(self.settings.client_id.encode()).hexdigest()[:10]
        prefix = "__Host-" if self.settings.cookie_host_prefix else ""
        return f"{prefix}trioproxy-hub-{digest}"

    @cached_property
    def oauth(self) -> HubOAuth:
        return HubOAuth(
            self.settings,
            self.client,
            session_cookie=self.cookie_name,
            sessions=self.sessions,
            user_for_token=self.user_for_token,
            may_access=self._may_access,
            secret=self.secret,
        )

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
            known, model = self.client.cache.get(token)
            if known and model is not None:
                headers = [(n, v) for n, v in headers if n != b"authorization"]
        return headers

    def end_session(self, headers: Headers) -> None:
        """Forget the session whose cookie ``headers`` carry (logging out)."""
        session_id = parse_cookies(headers).get(self.cookie_name)
        if session_id:
            self.sessions.end(session_id)

    # -- who a request is from --------------------------------------------------------------

    async def _by_header(self, headers: Headers) -> Identity | None:
        token = authorization_token(headers)
        if token is None:
            return None
        model = await self._allowed_user(token)
        return _identity(model, "hub-token") if model is not None else None

    async def _by_session(self, headers: Headers) -> Identity | None:
        session_id = parse_cookies(headers).get(self.cookie_name)
        if not session_id:
            return None
        token = self.sessions.token(session_id)
        if token is None:
            return None
        model = await self._allowed_user(token)
        if model is None:
            self.sessions.end(session_id)  # revoked or expired at the Hub: log in again
            return None
        return _identity(model, "hub-cookie")

    async def _allowed_user(self, token: str) -> dict[str, Any] | None:
        """The Hub's user model for ``token`` if that user may use this server."""
        try:
            model = await self.user_for_token(token)
        except HubUnavailable as exc:
            log.warning("cannot check a token with the Hub: %s", exc)
            return None
        if model is None or not await self._may_access(model):
            return None
        return model

    async def user_for_token(self, token: str) -> dict[str, Any] | None:
        """The Hub's user model for ``token``, or None if the Hub does not accept it."""
        return await self.client.user_for_token(token, self.cache_max_age)

    async def _may_access(self, model: dict[str, Any]) -> bool:
        held = model.get("scopes")
        if not isinstance(held, list):
            return False  # a Hub too old to report scopes: refuse rather than guess
        required = self.settings.access_scopes
        if scopes_allow(required, held):
            return True
        if not group_filtered(held, required):
            return False
        try:
            groups = await self.owner_groups()
        except HubUnavailable as exc:
            log.warning("cannot ask the Hub for the groups of this server's owner: %s", exc)
            return False
        return scopes_allow(required, held, groups)

    async def owner_groups(self) -> list[str]:
        """The groups of this server's owner, as the Hub says now (trusted ``cache_max_age``).

        Asked with the server's own token, whose model is its owner's; JupyterHub lets a token
        read its owner's groups. A service (no user) has none. Raises HubUnavailable.
        """
        model = await self.client.user_for_token(self.settings.api_token, self.cache_max_age)
        if model is None or model.get("kind", "user") != "user" or model.get("name") != self.settings.user:
            return []
        groups = model.get("groups")
        return [group for group in groups if isinstance(group, str)] if isinstance(groups, list) else []

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
        async with self.client.open():
            if not self.response_headers:
                announced = await announced_version(self.client)
                if announced is not None:
                    self._announce(announced)
            task_status.started()
            if not self.settings.activity_url:
                await trio.sleep_forever()
            sources = [lambda: self._last_activity] + ([last_activity] if last_activity else [])
            await report_activity_forever(
                self.settings.activity_interval, latest_of(*sources), hub_reporter(self.client)
            )


def _identity(model: dict[str, Any], via: str) -> Identity:
    """Who the Hub says a token is: the user's name, groups and the token's scopes (what
    ``forward_user`` tells apps). A Hub that leaves groups out (the token may not read them)
    gives none."""

    def strings(key: str) -> tuple[str, ...]:
        value = model.get(key)
        return tuple(item for item in value if isinstance(item, str)) if isinstance(value, list) else ()

    return Identity(model["name"], via=via, groups=strings("groups"), scopes=strings("scopes"))


if TYPE_CHECKING:
    _: type[Authenticator] = HubAuth  # mypy checks that it is one
