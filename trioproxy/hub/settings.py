"""What JupyterHub tells the server it spawns, read from ``JUPYTERHUB_*`` variables. Pure."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class HubSettings:
    """Where to listen, how to reach the Hub, and who may come in."""

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


def scopes_allow(required: Iterable[str], held: Iterable[str]) -> bool:
    """Whether ``held`` grants any of ``required``.

    A scope without a filter covers all its filtered forms (``access:servers`` covers
    ``access:servers!user=alice``), as in JupyterHub. Group filters cannot be resolved here
    and grant nothing unless they match exactly.
    """
    have = set(held)
    return any(scope in have or scope.partition("!")[0] in have for scope in required)


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
