"""Telling an app who its user is: the ``forward_user`` option and the identity headers.

With ``forward_user`` on, every request and WebSocket handshake trioproxy relays to that
server carries who trioproxy authenticated, and a signature the app can check:

    X-Trioproxy-User: alice
    X-Trioproxy-Groups: staff,physics
    X-Trioproxy-Scopes: access:servers!user=alice read:users:name!user=alice
    X-Trioproxy-User-Signature: t=1764770000, n=5f0c…(32 hex), v1=3b1e…(64 hex)

Each value is UTF-8, percent-encoded but for ASCII letters, digits and ``SAFE``; groups are
joined with commas and scopes with spaces (both encoded inside a name). ``v1`` is the hex
HMAC-SHA256, keyed with the server's secret (the bytes of ``TRIOPROXY_USER_SECRET`` as the child
reads it from its environment), of :func:`signed_string`: ``trioproxy-user-v1``, ``t`` (Unix
seconds), ``n`` (a nonce) and the three values, joined with line feeds. An app accepts a request
whose signature matches and whose ``t`` is within :data:`FRESHNESS` seconds of its clock; one
that also remembers the nonces it saw for that long refuses every replay.

The headers name trioproxy's own authentication: standalone, the user trioproxy runs as (its
token's holder; groups and scopes empty); under JupyterHub the Hub's user, their groups and the
scopes of their token. With ``--no-auth`` nobody is authenticated and no identity is sent.

Whatever a client sends under those names (any case, ``_`` for ``-``, repeated) is removed
before any backend sees the request, on every route and with ``forward_user`` off too
(:func:`is_identity_header`, called where upstream headers are built): a header the app sees
under those names is trioproxy's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from .auth import Identity, learn_secrets

USER = b"x-trioproxy-user"
GROUPS = b"x-trioproxy-groups"
SCOPES = b"x-trioproxy-scopes"
SIGNATURE = b"x-trioproxy-user-signature"
IDENTITY_HEADERS = frozenset({USER, GROUPS, SCOPES, SIGNATURE})
SECRET_VARIABLE = "TRIOPROXY_USER_SECRET"
VERSION = "trioproxy-user-v1"
FRESHNESS = 60  # seconds: what the documentation tells apps to accept
# Kept as they are in a value (visible ASCII but "%", ",", '"', "\" and the space).
SAFE = "!#$&'()*+-./:;<=>?@[]^_`{|}~"
MIN_SECRET = 16  # characters of a configured secret


def is_identity_header(name: bytes) -> bool:
    """Whether a request header is (or would be read by a WSGI server as) an identity header."""
    lowered = name.lower()  # every relayed header passes here: the prefix test first
    return lowered.startswith((b"x-trioproxy", b"x_trioproxy")) and lowered.replace(b"_", b"-") in IDENTITY_HEADERS


@dataclass(frozen=True)
class ForwardUser:
    """A server's ``forward_user``: the key its identity headers are signed with."""

    secret: str = field(repr=False)
    configured: bool = False  # given in the configuration, not made by trioproxy

    @property
    def key(self) -> bytes:
        return self.secret.encode("utf-8")


def parse(value: Any, *, has_command: bool) -> ForwardUser | None:
    """What a ``forward_user`` value asks for (None: off). Raises ValueError, one line.

    ``True`` makes a secret (256 bits) the server's process gets in ``TRIOPROXY_USER_SECRET``;
    ``{"secret": "…"}`` gives one, which a server trioproxy does not start (no ``command``)
    needs, since it cannot read trioproxy's environment.
    """
    if value is None or value is False:
        return None
    if value is True:
        if not has_command:
            raise ValueError(
                "a server trioproxy does not start cannot read TRIOPROXY_USER_SECRET; "
                "give the secret: {'secret': '...'}"
            )
        return ForwardUser(secrets.token_hex(32))
    if not isinstance(value, Mapping):
        raise ValueError(f"expected true, false or {{'secret': '...'}}, got {type(value).__name__}")
    unknown = sorted(str(key) for key in value if key != "secret")
    if unknown:
        raise ValueError(f"unknown forward_user option {unknown[0]!r} (known: secret)")
    secret = value.get("secret")
    if secret is None:
        return parse(True, has_command=has_command)
    if not isinstance(secret, str) or len(secret) < MIN_SECRET or not secret.isprintable() or not secret.isascii():
        raise ValueError(f"forward_user secret must be at least {MIN_SECRET} printable ASCII characters")
    learn_secrets([secret])  # masked wherever it might be quoted
    return ForwardUser(secret, configured=True)


_parsed: weakref.WeakKeyDictionary[Any, ForwardUser | None] = weakref.WeakKeyDictionary()


def forward_user(process: Any) -> ForwardUser | None:
    """The ``forward_user`` of a ``ServerProcess``, its secret made once for its life (a
    restarted process gets the same one). Raises ValueError as :func:`parse`."""
    if process in _parsed:
        return _parsed[process]
    setting = parse(getattr(process, "forward_user", None), has_command=bool(process.command))
    _parsed[process] = setting
    return setting


def secret_environment(process: Any) -> dict[str, str]:
    """What a server's process gets in its environment for ``forward_user``."""
    setting = forward_user(process)
    return {SECRET_VARIABLE: setting.secret} if setting is not None else {}


def encode(value: str) -> str:
    return quote(value, safe=SAFE)


def signed_string(timestamp: str, nonce: str, user: str, groups: str, scopes: str) -> bytes:
    """What the signature covers: the header values as sent."""
    return "\n".join((VERSION, timestamp, nonce, user, groups, scopes)).encode("latin-1")


def sign(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def identity_headers(
    identity: Identity, setting: ForwardUser, *, now: float | None = None, nonce: str | None = None
) -> list[tuple[bytes, bytes]]:
    """The identity headers for ``identity``; none for nobody (``--no-auth``)."""
    if identity.via == "none":
        return []
    user = encode(identity.name)
    groups = ",".join(encode(group) for group in identity.groups)
    scopes = " ".join(encode(scope) for scope in identity.scopes)
    timestamp = str(int(time.time() if now is None else now))
    nonce = secrets.token_hex(16) if nonce is None else nonce
    signature = sign(setting.key, signed_string(timestamp, nonce, user, groups, scopes))
    return [
        (USER, user.encode("ascii")),
        (GROUPS, groups.encode("ascii")),
        (SCOPES, scopes.encode("ascii")),
        (SIGNATURE, f"t={timestamp}, n={nonce}, v1={signature}".encode("ascii")),
    ]


def signed_headers(identity: Identity, process: Any) -> list[tuple[bytes, bytes]]:
    """The identity headers to add to a request (the client's copies were never taken:
    :func:`is_identity_header`), none unless the server forwards its user."""
    setting = forward_user(process)
    return identity_headers(identity, setting) if setting is not None else []


def verify(headers: Mapping[str, str], secret: str, *, now: float | None = None, max_age: float = FRESHNESS) -> str | None:
    """The user a request's identity headers vouch for, or None (trioproxy's reference for
    apps; README has the same in ten lines). ``headers`` with lower-case names."""
    fields = dict(
        part.strip().split("=", 1) for part in headers.get("x-trioproxy-user-signature", "").split(",") if "=" in part
    )
    values = [headers.get(name, "") for name in ("x-trioproxy-user", "x-trioproxy-groups", "x-trioproxy-scopes")]
    timestamp, nonce = fields.get("t", ""), fields.get("n", "")
    expected = sign(secret.encode("utf-8"), signed_string(timestamp, nonce, *values))
    if not hmac.compare_digest(expected, fields.get("v1", "")):
        return None
    if abs((time.time() if now is None else now) - int(timestamp)) > max_age:
        return None
    return unquote(values[0])


def describe(process: Any) -> dict[str, Any] | None:
    """What the API shows of a server's ``forward_user`` (never the secret)."""
    try:
        setting = forward_user(process)
    except ValueError:
        return None
    if setting is None:
        return None
    return {
        "headers": [name.decode() for name in (USER, GROUPS, SCOPES, SIGNATURE)],
        "secret": "configured" if setting.configured else f"${SECRET_VARIABLE}",
    }
