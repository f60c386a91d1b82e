"""The rules a server's option values must follow before trioproxy relies on them.

Pure checks (the one exception: whether a ``unix_socket`` path is a directory). Each raises
:class:`OptionError` naming the option and, in one line, what is wrong with it. They run when
the configuration is loaded or reloaded (:func:`check_server`), and again on what a callable or
a template produced, right before it is used (the command and environment at each start, the
request headers at each request): a value the OS or HTTP would refuse never gets that far.

Header names are RFC 9110 tokens; header values are field-values: visible ASCII, spaces and tabs
inside, and obs-text (U+0080 to U+00FF, sent as those bytes, as latin-1), without leading or
trailing whitespace. Characters beyond U+00FF have no one-byte form on the wire and are refused.
"""

from __future__ import annotations

import math
import os
import re
import string
import sys
from collections.abc import Iterable, Mapping
from typing import Any

# Ten years: no timeout, delay or window is meant to be longer; a larger value is a mistake
# (milliseconds written as seconds, a duration in the wrong unit).
MAX_SECONDS = 10 * 365.25 * 86400

# What templates are checked with at load time: the real values only exist at a start.
SAMPLE_VARIABLES: Mapping[str, Any] = {"port": 0, "unix_socket": "", "base_url": "/", "public_prefix": "/"}

# RFC 9110 §5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" /
# "_" / "`" / "|" / "~" / DIGIT / ALPHA
_TCHAR = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
# RFC 9110 §5.5: field-value = *field-content, field-vchar = VCHAR / obs-text, with SP and
# HTAB only between visible characters.
_FIELD_CHAR = re.compile(r"[\t \x21-\x7e\x80-\xff]*")
# Headers trioproxy sets for each request itself: the body's framing and the connection's
# management. An override of those would make the backend read another body than was sent.
RESERVED_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
    # forward_user's (trioproxy.identity): only trioproxy may say who the user is.
    | {"x-trioproxy-user", "x-trioproxy-groups", "x-trioproxy-scopes", "x-trioproxy-user-signature"}
)
_IDENTITY = frozenset(name for name in RESERVED_HEADERS if name.startswith("x-trioproxy-"))
# sun_path holds 108 bytes on Linux, 104 on the BSDs and macOS, the terminating NUL included.
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103


class OptionError(ValueError):
    """An option value that cannot work: ``option`` names it, ``detail`` says why."""

    def __init__(self, option: str, detail: str) -> None:
        super().__init__(f"option {option!r}: {detail}")
        self.option = option
        self.detail = detail


def header_name_problem(name: Any) -> str | None:
    """Why ``name`` is not a header name (an RFC 9110 token), or None."""
    if not isinstance(name, str):
        return f"header name {name!r} is not a string"
    if not name:
        return "a header name is empty"
    bad = next((char for char in name if char not in _TCHAR), None)
    if bad is not None:
        return f"header name {name!r} contains {_describe(bad)}, which a header name may not (RFC 9110 token)"
    return None


def header_value_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not a field-value for header ``name``, or None."""
    if not isinstance(value, str):
        return f"header {name!r}: the value {value!r} is not a string"
    if _FIELD_CHAR.fullmatch(value) is None:
        bad = next(char for char in value if _FIELD_CHAR.fullmatch(char) is None)
        if ord(bad) > 0xFF:
            return f"header {name!r}: the value contains {_describe(bad)}, beyond latin-1 (use ASCII, or percent-encode it)"
        return f"header {name!r}: the value contains {_describe(bad)}, which a header value may not"
    if value != value.strip(" \t"):
        return f"header {name!r}: the value {value!r} starts or ends with whitespace"
    return None


def check_header(option: str, name: Any, value: Any) -> None:
    problem = header_name_problem(name) or header_value_problem(name, value)
    # "_" for "-" as well: a WSGI server reads X_Trioproxy_User as X-Trioproxy-User.
    if problem is None and (name.lower() in RESERVED_HEADERS or name.lower().replace("_", "-") in _IDENTITY):
        problem = f"header {name!r} is set by trioproxy for each request and cannot be overridden"
    if problem is not None:
        raise OptionError(option, problem)


def check_headers(option: str, headers: Any) -> None:
    if not isinstance(headers, Mapping):
        raise OptionError(option, f"expected a dict of header names and values, got {type(headers).__name__}")
    for name, value in headers.items():
        check_header(option, name, value)


def check_os_string(option: str, what: str, value: Any) -> None:
    """A string the OS gets (an argument, a path, an environment entry): no NUL, encodable."""
    if not isinstance(value, str):
        raise OptionError(option, f"{what} {value!r} is not a string")
    if "\0" in value:
        raise OptionError(option, f"{what} {value!r} contains a NUL character, which the OS cannot take")
    try:
        os.fsencode(value)
    except UnicodeError:
        raise OptionError(option, f"{what} {value!r} cannot be encoded for the OS") from None


def check_argv(argv: Iterable[Any], option: str = "command") -> None:
    for index, item in enumerate(argv):
        check_os_string(option, f"item {index}", item)


def check_environment(environment: Mapping[Any, Any], option: str = "environment") -> None:
    """Names and values the OS takes; a None value (the variable left unset) is fine."""
    for name, value in environment.items():
        check_os_string(option, "the name", name)
        if not name or "=" in name:
            raise OptionError(option, f"the name {name!r} is empty or contains '=', which no variable name can")
        if value is not None:
            check_os_string(option, f"the value of {name}", value)


def check_duration(option: str, value: Any, *, zero: bool = True) -> None:
    """A number of seconds: finite, not negative (above 0 unless ``zero``), at most ten years."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(option, f"expected a number of seconds, got {value!r}")
    if math.isnan(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "above 0"
        raise OptionError(option, f"must be a number of seconds {least}, got {value!r}")
    if value > MAX_SECONDS:
        raise OptionError(option, f"{value!r} s is more than ten years; a mistake in the unit?")


def check_keepalive(value: Any, option: str = "websocket_keepalive") -> None:
    """0 (off) or a number of seconds from 0.1: shorter would flood a client with pings."""
    check_duration(option, value)
    if 0 < value < 0.1:
        raise OptionError(option, f"must be 0 (off) or at least 0.1 s (a ping every {value!r} s floods the client), got {value!r}")


def check_count(option: str, value: Any, *, least: int, most: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
        bounds = f"from {least} to {most}" if most is not None else f"of at least {least}"
        raise OptionError(option, f"must be a whole number {bounds}, got {value!r}")


def check_unix_socket(path: Any, option: str = "unix_socket") -> None:
    """A socket path trioproxy can remove when stale and connect to."""
    check_os_string(option, "the path", path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OptionError(option, f"the path {path!r} is longer than the {MAX_SOCKET_PATH} bytes a unix socket path can have")
    if os.path.isdir(path):
        raise OptionError(option, f"the path {path!r} is a directory; name a socket file in it")


def check_template(option: str, what: str, template: str) -> str:
    """``template`` expanded with :data:`SAMPLE_VARIABLES`; an OptionError if it cannot be."""
    from .templating import TemplateError, expand

    try:
        return expand(template, SAMPLE_VARIABLES)
    except TemplateError as exc:
        raise OptionError(option, f"{what}: {exc}") from None


def check_request_path(option: str, path: Any) -> None:
    # httpx refuses control characters in a URL (and quotes the rest, spaces included).
    if not isinstance(path, str) or not path or not path.isprintable():
        raise OptionError(option, f"{path!r} is not a request path (no control characters)")


def check_server(process: Any) -> None:
    """Every rule for one server's static values (a ``ServerProcess``); callables are checked
    where they are called. Raises OptionError for the first value that cannot work."""
    from .paths import check_paths

    check_paths(process)
    for option in ("timeout", "start_timeout", "connect_timeout", "response_timeout", "pool_idle_timeout"):
        check_duration(option, getattr(process, option), zero=False)
    for option in ("start_quiet_timeout", "stop_timeout", "backoff_initial", "backoff_max", "failure_window", "stable_after", "idle_timeout"):
        check_duration(option, getattr(process, option))
    check_count("port", process.port, least=0, most=65535)
    check_count("max_connections", process.max_connections, least=1)
    check_count("max_websockets", process.max_websockets, least=1)
    check_count("max_failures", process.max_failures, least=0)
    if process.websocket_keepalive is not None:
        check_keepalive(process.websocket_keepalive)
    health = process.health
    if health is not None:
        check_duration("health_check", health.interval, zero=False)
        check_duration("health_check", health.timeout, zero=False)
        if health.path is not None:
            check_request_path("health_check", health.path)
    if not callable(process.command):
        for index, item in enumerate(process.command):
            check_os_string("command", f"item {index}", item)
            check_os_string("command", f"item {index}", check_template("command", f"item {index}", item))
    if not callable(process.environment):
        check_environment(
            {
                str(name): check_template("environment", f"the value of {name}", str(value))
                for name, value in process.environment.items()
            }
        )
    if not callable(process.request_headers_override):
        for name, value in process.request_headers_override.items():
            check_header(
                "request_headers_override",
                name,
                check_template("request_headers_override", f"header {name!r}", str(value)),
            )
    if process.cwd is not None:
        check_os_string("cwd", "the path", process.cwd)
    if isinstance(process.unix_socket, str) and process.unix_socket:
        check_unix_socket(process.unix_socket)
    if process.ready_check_path is not None:
        check_request_path("ready_check_path", process.ready_check_path)
    check_features(process)


def check_features(process: Any) -> None:
    """``forward_user`` and ``backend_tls`` (their own modules have the rules)."""
    from . import backend_tls, identity

    for option, parse in (("forward_user", identity.forward_user), ("backend_tls", backend_tls.backend_tls)):
        try:
            parse(process)
        except ValueError as exc:
            raise OptionError(option, str(exc)) from None


def check_app_options(app: Any) -> None:
    """trioproxy's own options (a ``TrioProxy``: command line and ``c.TrioProxy``), which are
    trioproxy's as a whole: a bad one is a configuration error at start-up. Raises OptionError."""
    check_count("port", app.port, least=0, most=65535)
    check_duration("graceful_timeout", app.graceful_timeout)
    check_duration("body_timeout", app.body_timeout, zero=False)
    check_count("websocket_max_message_size", app.websocket_max_message_size, least=1)
    if app.max_body_size is not None:
        check_count("max_body_size", app.max_body_size, least=0)
    if app.public_url:
        check_public_url(app.public_url)


def check_public_url(url: Any, option: str = "public_url") -> None:
    """An absolute http(s) URL with a host, no query, fragment or credentials."""
    from urllib.parse import urlsplit

    parts = urlsplit(url) if isinstance(url, str) else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
        or not url.isprintable()
        or " " in url
    ):
        raise OptionError(option, f"{url!r} is not an http:// or https:// URL with a host (no query, fragment or user)")


def _describe(char: str) -> str:
    if char == " ":
        return "a space"
    if char == "\0":
        return "a NUL character"
    if char in "\r\n":
        return f"a line break ({char!r})"
    if not char.isprintable() or ord(char) < 0x20 or ord(char) == 0x7F:
        return f"the control character {char!r}"
    if ord(char) > 0x7E:
        return f"the non-ASCII character {char!r}"
    return f"{char!r}"
