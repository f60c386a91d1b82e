"""Calls to the Hub's API: who a token belongs to, the OAuth code exchange, activity reports.

Every call goes through httpx with the internal-TLS files the Hub gives (``JUPYTERHUB_SSL_*``).
The Hub's word on a token is cached briefly, and bounded, since a client can send any number of
made-up tokens.
"""

from __future__ import annotations

import hashlib
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from ..httpx_clients import async_client
from .settings import HubSettings

MAX_CACHED_TOKENS = 4096
HUB_TIMEOUT = 10.0


class HubUnavailable(Exception):
    """The Hub could not be reached or answered with a server error."""


def ssl_context(settings: HubSettings) -> ssl.SSLContext | None:
    """The TLS context for calls to the Hub under internal SSL, or None without it."""
    if not (settings.client_ca or settings.certfile):
        return None
    context = ssl.create_default_context(cafile=settings.client_ca or None)
    if settings.certfile:
        context.load_cert_chain(settings.certfile, settings.keyfile or None)
    return context


class TokenCache:
    """The Hub's answers about tokens (a user model, or None for "not a valid token").

    Keys are digests so the tokens themselves are not kept longer than needed; the least
    recently stored go first beyond ``max_entries``.
    """

    def __init__(self, max_entries: int = MAX_CACHED_TOKENS) -> None:
        self._entries: OrderedDict[str, tuple[float, dict[str, Any] | None]] = OrderedDict()
        self._max_entries = max_entries

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()

    def get(self, token: str) -> tuple[bool, dict[str, Any] | None]:
        """(known, model): whether the Hub's answer is still fresh, and that answer."""
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


class HubClient:
    """The Hub's API, through one connection pool while :meth:`open` runs (else one per call)."""

    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.cache = TokenCache()
        self._pool: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Keep one connection pool to the Hub for the duration."""
        async with self._new_client() as pool:
            self._pool = pool
            try:
                yield
            finally:
                self._pool = None

    def _new_client(self) -> httpx.AsyncClient:
        context = ssl_context(self.settings)
        # trust_env=False: the Hub's API is internal, and HTTP(S)_PROXY or .netrc must not
        # see the tokens sent to it.
        return async_client(
            verify=context if context is not None else True,
            timeout=HUB_TIMEOUT,
            follow_redirects=False,
            trust_env=False,
        )

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._pool is not None:
            yield self._pool
            return
        async with self._new_client() as client:
            yield client

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            async with self._client() as client:
                response = await client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise HubUnavailable(f"{type(exc).__name__} calling {url}: {exc}") from None
        if response.status_code >= 500:
            raise HubUnavailable(f"{url} answered {response.status_code}")
        return response

    async def user_for_token(self, token: str, max_age: float) -> dict[str, Any] | None:
        """The Hub's user model for ``token``, or None if the Hub does not accept it.

        The answer, either way, is trusted for ``max_age`` seconds. Raises HubUnavailable.
        """
        known, model = self.cache.get(token)
        if known:
            return model
        response = await self._call(
            "GET", f"{self.settings.api_url}/user", headers={"Authorization": f"token {token}"}
        )
        model = _json_object(response) if response.status_code == 200 else None
        if model is not None and not isinstance(model.get("name"), str):
            model = None
        self.cache.put(token, model, max_age)
        return model

    async def token_for_code(self, code: str, verifier: str) -> str | None:
        """The user's token for an OAuth ``code`` (with its PKCE ``verifier``), or None."""
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

    async def hub_version(self) -> str | None:
        """The Hub's version, from its API's root (no token needed). Raises HubUnavailable."""
        response = await self._call("GET", f"{self.settings.api_url}/")
        version = response.headers.get("x-jupyterhub-version")
        if not version and response.status_code == 200:
            document = _json_object(response)
            version = document.get("version") if document else None
        return version if isinstance(version, str) and version else None

    async def report_activity(self, stamp: str) -> None:
        """Tell the Hub the server was last used at ``stamp`` (ISO 8601). Raises HubUnavailable."""
        settings = self.settings
        body = {"servers": {settings.server_name: {"last_activity": stamp}}, "last_activity": stamp}
        response = await self._call(
            "POST", settings.activity_url, json=body, headers={"Authorization": f"token {settings.api_token}"}
        )
        if response.status_code >= 400:
            raise HubUnavailable(f"the Hub refused the activity report: {response.status_code}")


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        document = response.json()
    except ValueError:
        return None
    return document if isinstance(document, dict) else None
