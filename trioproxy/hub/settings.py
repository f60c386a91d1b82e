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
    default_url: str = ""  # where the root of the prefix sends browsers, relative to it ("" for the launcher)
    cookie_host_prefix: bool = False  # __Host- cookies at Path=/ (subdomain deployments)
    public_url: str = ""  # this server's public URL, if the Hub says (JUPYTERHUB_PUBLIC_URL)

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
            default_url=_default_url(env.get("JUPYTERHUB_DEFAULT_URL", "")),
            cookie_host_prefix=_flag(env, "JUPYTERHUB_COOKIE_HOST_PREFIX_ENABLED"),
            public_url=env.get("JUPYTERHUB_PUBLIC_URL", ""),
        )


def scopes_allow(required: Iterable[str], held: Iterable[str], owner_groups: Iterable[str] = ()) -> bool:
    """Whether ``held`` grants any of ``required``.

    A scope without a filter covers all its filtered forms (``access:servers`` covers
    ``access:servers!user=alice``), as in JupyterHub. A group filter
    (``access:servers!group=staff``) covers a required ``!user=`` or ``!server=`` scope when
    the server's owner is in that group: ``owner_groups`` are the owner's groups.
    """
    have = set(held)
    groups = set(owner_groups)
    for scope in required:
        if scope in have:
            return True
        base, _, filter_ = scope.partition("!")
        if base in have:
            return True
        if filter_.startswith(("user=", "server=")) and any(f"{base}!group={group}" in have for group in groups):
            return True
    return False


def group_filtered(held: Iterable[str], required: Iterable[str]) -> bool:
    """Whether ``held`` has a group-filtered form of a base in ``required`` (then the owner's
    groups decide, and are worth asking the Hub for)."""
    bases = {scope.partition("!")[0] for scope in required}
    return any(scope.partition("!")[0] in bases and scope.partition("!")[2].startswith("group=") for scope in held)


def _slashed(path: str) -> str:
    """``path`` with exactly one slash at each end ("/" for an empty one)."""
    inner = path.strip("/")
    return f"/{inner}/" if inner else "/"


def _default_url(raw: str) -> str:
    """JUPYTERHUB_DEFAULT_URL as a path relative to the prefix ("/rstudio" -> "rstudio").

    As in jupyterhub-singleuser, the default URL is always below the server's prefix: a
    full URL or one that climbs out with ".." is refused rather than followed.
    """
    value = raw.strip()
    if not value:
        return ""
    if "://" in value or value.startswith("//") or "\\" in value or any(ord(c) < 0x21 for c in value):
        raise ConfigError(f"JUPYTERHUB_DEFAULT_URL must be a path below the server's prefix, not {raw!r}")
    path, _, _query = value.partition("?")
    if ".." in path.split("/"):
        raise ConfigError(f"JUPYTERHUB_DEFAULT_URL must not leave the server's prefix: {raw!r}")
    if not path.strip("/"):
        return ""  # the root itself: the launcher, no redirect (which would loop)
    return value.lstrip("/")


def _flag(env: Mapping[str, str], name: str) -> bool:
    # As JupyterHub's own reading (jupyterhub.utils._bool_env): unset, "" and "0" are off.
    return env.get(name, "") not in ("", "0")


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
