"""Who may use trioproxy: Jupyter-style token authentication.

A request is let in when it carries the token (``?token=``, ``Authorization: token …`` or
``Bearer …``) or the signed cookie a browser gets after presenting the token once. The cookie
is an HMAC under a secret made at start-up, so restarting trioproxy ends every session, and it
never contains the token itself. Tokens are compared in constant time.

An authenticator (:class:`Authenticator`; this module's :class:`TokenAuth`, or
:class:`trioproxy.hub.HubAuth` under JupyterHub) has three jobs: decide (``authenticate``),
say how a browser may log in (``login_url``), and take its own credentials out of what is
relayed (``strip_credentials``), so backends never see trioproxy's token or cookie.

Secrets must not leak through logs or error pages either: :func:`mask_secrets` blanks them
out of any text, and :class:`MaskingFormatter` applies it to every log line. A server's
command line and environment are shown through :func:`mask_argv` and
:func:`mask_environment`, and the secrets found in them are learned (:func:`learn_secrets`)
so that later lines (the server printing its own password) are masked too.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, quote, unquote_plus, urlencode, urlsplit

from .relay.headers import Headers


@dataclass
class Identity:
    """Who a request is from; ``set_cookie`` is a Set-Cookie header value to add, if any."""

    name: str
    set_cookie: bytes | None = None
    via: str = "token"
    groups: tuple[str, ...] = ()  # under JupyterHub: the user's groups, as the Hub says
    scopes: tuple[str, ...] = ()  # under JupyterHub: the scopes of the user's token


class Authenticator(Protocol):
    """What the dispatcher and the login pages need from an authenticator."""

    @property
    def enabled(self) -> bool: ...

    @property
    def base_url(self) -> str: ...

    @property
    def cookie_name(self) -> str: ...

    @property
    def oauth(self) -> OAuthFlow | None:
        """The login flow through another site, or None: trioproxy's own login form."""

    async def authenticate(self, scope: dict[str, Any]) -> Identity | None: ...

    def login_url(self, next_url: str) -> str: ...

    def strip_credentials(self, headers: Headers) -> Headers: ...

    def known_secrets(self) -> list[str]: ...

    def end_session(self, headers: Headers) -> None:
        """Forget the session the request's cookie stands for, if it is kept here (logout)."""


# -- logging in through another site (OAuth), in terms of no web framework -------------------


@dataclass(frozen=True)
class CookieSpec:
    """A cookie to set (HttpOnly, SameSite=Lax) or, with ``max_age=0``, to delete."""

    name: str
    value: str
    path: str
    max_age: int | None = None  # None: for the browser session
    secure: bool = False


@dataclass(frozen=True)
class LoginRequest:
    """What a login step gets to see of a request."""

    args: Mapping[str, str]  # the query
    cookies: Mapping[str, str]
    https: bool  # as the browser sees it (X-Forwarded-Proto only from trusted proxies)


@dataclass(frozen=True)
class LoginAnswer:
    """A login step's answer: a redirect to ``location``, or an error page with ``message``."""

    status: int
    location: str = ""
    message: str = ""
    cookies: tuple[CookieSpec, ...] = ()


class OAuthFlow(Protocol):
    """The two steps of a login through another site: off there, and back."""

    async def begin(self, request: LoginRequest) -> LoginAnswer: ...

    async def finish(self, request: LoginRequest) -> LoginAnswer: ...

    async def logout(self, request: LoginRequest) -> LoginAnswer:
        """End the request's session here and delete its cookie (as it was set: same path, same flags)."""


def generate_token() -> str:
    return secrets.token_hex(24)  # 192 bits


def _cookie_header(headers: Headers) -> str:
    return "; ".join(v.decode("latin-1") for n, v in headers if n == b"cookie")


def parse_cookies(headers: Headers) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(_cookie_header(headers))
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def remove_cookie(headers: Headers, cookie_name: str) -> Headers:
    """Headers with one cookie taken out of every Cookie header (the others kept as sent)."""
    out: Headers = []
    prefix = cookie_name.encode("latin-1") + b"="
    for name, value in headers:
        if name != b"cookie":
            out.append((name, value))
            continue
        kept = [part for part in value.split(b";") if not part.strip().startswith(prefix)]
        if any(part.strip() for part in kept):
            out.append((name, b";".join(kept).strip()))
    return out


def query_token(query_string: bytes) -> str | None:
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key == "token":
            return value
    return None


def strip_token_from_query(query_string: bytes) -> bytes:
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return urlencode([(k, v) for k, v in pairs if k != "token"]).encode("latin-1")


# Bytes of a query string that may name a secret parameter (checked before parsing anything).
_QUERY_SECRET_HINT = re.compile(rb"(?i)token|pass|secret|key")


def query_for_log(query_string: bytes) -> str:
    """A query string fit for the access log: ``token`` left out (as relayed), and the values
    of parameters named like secrets (``access_token``, ``password``, ``api_key``: marimo and
    code-server take their passwords so) shown as ``[secret]``; the rest as the client sent it."""
    text = query_string.decode("latin-1")
    if not _QUERY_SECRET_HINT.search(query_string):
        return text
    kept = []
    for piece in text.split("&"):
        raw_name, equals, _ = piece.partition("=")
        name = unquote_plus(raw_name).lower()
        if name == "token":
            continue
        kept.append(f"{raw_name}={MASK}" if equals and _SECRET_OPTION.search(name) else piece)
    return "&".join(kept)


def authorization_token(headers: Headers) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credential = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() in ("token", "bearer") and credential.strip():
                return credential.strip()
    return None


@dataclass
class TokenAuth:
    """Token authentication; ``token=None`` lets everyone in (``--no-auth``)."""

    token: str | None
    base_url: str = "/"
    secure_cookie: bool = False
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    # Who holds the token: the user trioproxy runs as (what forward_user tells apps).
    user: str = field(default_factory=lambda: local_user())

    @property
    def enabled(self) -> bool:
        return self.token is not None

    @cached_property
    def cookie_name(self) -> str:
        # Distinct per token, so two trioproxies on one host (cookies ignore ports) with
        # different tokens do not overwrite each other's sessions.
        digest = hashlib.sha256((self.token or "").encode()).hexdigest()[:10]
        return f"trioproxy-{digest}"

    def _cookie_value(self) -> str:
        return self._session_value

    @cached_property
    def _session_value(self) -> str:
        return hmac.new(self.secret, b"trioproxy-session-v1", hashlib.sha256).hexdigest()

    def _matches(self, candidate: str | None) -> bool:
        if candidate is None or self.token is None:
            return False
        return same_secret(candidate, self.token)

    def make_cookie(self) -> bytes:
        attributes = [
            f"{self.cookie_name}={self._cookie_value()}",
            f"Path={self.base_url}",
            "HttpOnly",
            "SameSite=Lax",
        ]
        if self.secure_cookie:
            attributes.append("Secure")
        return "; ".join(attributes).encode("latin-1")

    async def authenticate(self, scope: dict[str, Any]) -> Identity | None:
        if self.token is None:
            return Identity("anonymous", via="none")
        headers: Headers = scope["headers"]
        if self._matches(authorization_token(headers)):
            return Identity(self.user, via="header")
        cookie = parse_cookies(headers).get(self.cookie_name)
        if cookie is not None and same_secret(cookie, self._cookie_value()):
            return Identity(self.user, via="cookie")
        if self._matches(query_token(scope.get("query_string", b""))):
            return Identity(self.user, set_cookie=self.make_cookie(), via="query")
        return None

    def check_token(self, candidate: str) -> bool:
        return self._matches(candidate)

    @property
    def oauth(self) -> None:
        return None  # the login form takes the token

    def end_session(self, headers: Headers) -> None:
        pass  # the cookie is the whole session: deleting it (logout) ends it

    def known_secrets(self) -> list[str]:
        return [self.token] if self.token else []

    def login_url(self, next_url: str) -> str:
        return f"{self.base_url}login?next={quote(next_url, safe='/')}"

    def strip_credentials(self, headers: Headers) -> Headers:
        """Take trioproxy's cookie, and an Authorization header carrying its token, out."""
        headers = remove_cookie(headers, self.cookie_name)
        token = authorization_token(headers)
        if token is not None and self._matches(token):
            headers = [(n, v) for n, v in headers if n != b"authorization"]
        return headers


def local_user() -> str:
    """The name of the user this process runs as ("token-holder" if the system has none)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # no login name and no passwd entry (a bare container)
        return "token-holder"


def same_secret(candidate: str, expected: str) -> bool:
    """Constant-time comparison that accepts any text a client may send.

    ``hmac.compare_digest`` refuses ``str`` with non-ASCII characters (a TypeError, which
    would be a 500 for a forged cookie), so both sides are compared as UTF-8 bytes.
    """
    return hmac.compare_digest(candidate.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


# -- redirects after login -------------------------------------------------------------------


def local_redirect(value: str | None, base_url: str) -> str:
    """``value`` if it is a path under ``base_url`` on this site, else ``base_url``.

    Browsers are lenient: they read ``/\\evil.com`` as ``//evil.com`` and drop tabs and
    line breaks, so anything but a plain absolute path made of visible ASCII is refused
    rather than cleaned up, to leave no open redirect to another site.
    """
    if not value or not value.startswith("/") or value.startswith("//"):
        return base_url
    if any(not 0x21 <= ord(char) < 0x7F or char == "\\" for char in value):
        return base_url
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return base_url
    root = base_url.rstrip("/")
    if value != root and not value.startswith(root + "/"):
        return base_url
    return value


# -- keeping secrets out of logs and pages ---------------------------------------------------

MASK = "[secret]"
# Shorter known secrets (a "--token t" in a test) would blank ordinary words out of every
# line; they are still masked where they appear as token=… or in an Authorization header.
MIN_KNOWN_SECRET = 6
# Words that make a command-line option's value a secret: --token X, --token=X,
# --token-password X (marimo), --NotebookApp.token=X, --auth-token X, --api-key X.
_SECRET_OPTION = re.compile(r"(?:^|[-_.])(?:token|password|passwd|secret|api[-_]?key|access[-_]?key|private[-_]?key)(?:[-_.]|$)")
# Environment variables that hold secrets: *_TOKEN, *_PASSWORD (PGPASSWORD too), *_SECRET,
# *_KEY (API_KEY, AWS_SECRET_ACCESS_KEY), and names with those as a word (GITHUB_TOKEN_FILE
# is masked as well: a path shown as [secret] costs less than a token shown).
_SECRET_VARIABLE = re.compile(r"(?:^|_)(?:[A-Z0-9]*(?:TOKEN|PASSWORD|PASSWD|SECRET)|KEY|APIKEY)(?:_|$)")
# A query parameter whose name ends in "token" (token=, access_token=, api_token=), the
# credential of an Authorization header, and the value of a secret-looking option on a
# command line (--token-password X, --password=X), wherever they appear in a line.
_SECRET_PATTERNS = (
    # Anchored where a run of name characters starts (not at every \b inside it), so that a
    # long line is scanned once rather than once per word in it.
    re.compile(r"(?i)((?<![\w-])[\w-]*token=)[^&\s#\"'<>;,]+"),
    re.compile(r"(?i)(\bauthorization\b[\"']?\s*[:=,]\s*[\"']?(?:token|bearer|basic)\s+)[^\s\"'<>,;]+"),
    re.compile(
        r"(?i)((?<![\w-])--?(?:[^\W_]+[-_.])*(?:token|password|passwd|secret|api[-_]?key)(?:[-_.][^\W_]+)*(?:=|[ \t]+))"
        r"(?!-)[^\s\"'<>,;&]+"
    ),
)
# Secret values seen on the command lines and in the environments of started servers
# (process-wide, as logging is): a server that prints its own password is masked too. The
# latest MAX_LEARNED are kept (a server given a new token at each start must not make every
# log line slower for ever), in the order learned (a dict as an ordered set).
MAX_LEARNED = 256
_learned: dict[str, None] = {}


def mask_known(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with ``known`` and the learned secrets (:func:`learn_secrets`) blanked, and
    nothing else: the cheap half of :func:`mask_secrets`, for lines without free text."""
    for secret in (*known, *_learned):
        if len(secret) >= MIN_KNOWN_SECRET and secret in text:
            text = text.replace(secret, MASK)
    return text


def mask_secrets(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with token-like parameters, Authorization credentials, secret-looking
    command-line options, ``known`` and the learned secrets (:func:`learn_secrets`) blanked."""
    text = mask_known(text, known)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda match: match.group(1) + MASK, text)
    return text


def secret_option(arg: str) -> bool:
    """Whether ``arg`` is a command-line option whose value is a secret (``--token``,
    ``--password=…``, ``--token-password``); ``--no-token`` is not."""
    if not arg.startswith("-"):
        return False
    name = arg.lstrip("-").split("=", 1)[0].lower()
    return not name.startswith(("no-", "no_")) and _SECRET_OPTION.search(name) is not None


def secret_variable(name: str) -> bool:
    """Whether the environment variable ``name`` holds a secret (``*_TOKEN``, ``*_PASSWORD``,
    ``PGPASSWORD``, ``*_SECRET``, ``*_KEY``)."""
    return _SECRET_VARIABLE.search(name.upper()) is not None


def secret_values(argv: Iterable[str], environment: Mapping[str, str | None]) -> list[str]:
    """The values in a command line and an environment that :func:`mask_argv` and
    :func:`mask_environment` would mask."""
    found: list[str] = []
    items = list(argv)
    for index, item in enumerate(items):
        if not secret_option(item):
            continue
        if "=" in item:
            found.append(item.split("=", 1)[1])
        elif index + 1 < len(items) and not items[index + 1].startswith("-"):
            found.append(items[index + 1])
    found.extend(value for name, value in environment.items() if value and secret_variable(name))
    return [value for value in found if value]


def learn_secrets(values: Iterable[str]) -> None:
    """Mask ``values`` wherever :func:`mask_secrets` runs from now on (every log line, every
    API answer); short ones only where a pattern finds them."""
    for value in values:
        if len(value) >= MIN_KNOWN_SECRET:
            _learned.pop(value, None)
            _learned[value] = None
    while len(_learned) > MAX_LEARNED:
        del _learned[next(iter(_learned))]


def mask_argv(argv: Iterable[str], known: Iterable[str] = ()) -> list[str]:
    """A command line fit to log or show: values of secret-looking options, and anything
    :func:`mask_secrets` finds, replaced by ``[secret]``."""
    known = list(known)
    masked: list[str] = []
    mask_next = False
    for item in argv:
        if mask_next and not item.startswith("-"):
            masked.append(MASK)
            mask_next = False
            continue
        mask_next = False
        if secret_option(item):
            name, equals, value = item.partition("=")
            if equals:
                masked.append(f"{name}={MASK}" if value else item)
                continue
            mask_next = True
        masked.append(mask_secrets(item, known))
    return masked


def mask_environment(environment: Mapping[str, str | None], known: Iterable[str] = ()) -> dict[str, str | None]:
    """An environment fit to log or show: secret-looking variables' values replaced."""
    known = list(known)
    return {
        name: value if value is None else (MASK if value and secret_variable(name) else mask_secrets(value, known))
        for name, value in environment.items()
    }


class MaskingFormatter(logging.Formatter):
    """A formatter whose every line, tracebacks included, goes through :func:`mask_secrets`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.known: list[str] = []

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record), self.known)


if TYPE_CHECKING:
    _: type[Authenticator] = TokenAuth  # mypy checks that it is one
